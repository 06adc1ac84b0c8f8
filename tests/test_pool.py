"""The write pool's pre-ping: idle connections are pinged at checkout, busy ones are not."""

from __future__ import annotations

import time

import anyio
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from pgreact import db
from pgreact.db import create_write_engine
from tests.support import make_settings, sql, wait_until

pytestmark = pytest.mark.anyio


async def backend_pid(engine: AsyncEngine) -> int:
    async with engine.connect() as conn:
        return int(await conn.scalar(text("SELECT pg_backend_pid()")))


async def kill_idle_connection(engine: AsyncEngine, pg_dsn: str, idle_for: float = 0.0) -> int:
    """Use the pool's one connection, terminate its backend and wait until it has exited, let
    the connection sit idle for at least ``idle_for`` s; its old pid."""
    pid = await backend_pid(engine)
    used_at = time.monotonic()
    sql(pg_dsn, "SELECT pg_terminate_backend(%s)", [pid])
    await wait_until(
        lambda: not sql(pg_dsn, "SELECT 1 FROM pg_stat_activity WHERE pid = %s", [pid]),
        timeout=10,
        interval=0.02,
        message=f"backend {pid} to exit",
    )
    await anyio.sleep(max(0.0, used_at + idle_for - time.monotonic()))
    return pid


async def test_a_pooled_connection_killed_while_idle_is_replaced_at_checkout(
    sa_url: str, pg_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(db, "PING_AFTER_IDLE", 0.05)
    engine = create_write_engine(make_settings(sa_url, pool_size=1, max_overflow=0))
    try:
        first = await kill_idle_connection(engine, pg_dsn, idle_for=0.1)  # > PING_AFTER_IDLE
        assert await backend_pid(engine) != first
    finally:
        await engine.dispose()


async def test_a_connection_used_a_moment_ago_is_not_pinged(
    sa_url: str, pg_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without a ping, the dead connection surfaces on first use (and the dispatcher retries)."""
    monkeypatch.setattr(db, "PING_AFTER_IDLE", 60.0)
    engine = create_write_engine(make_settings(sa_url, pool_size=1, max_overflow=0))
    try:
        first = await kill_idle_connection(engine, pg_dsn)
        with pytest.raises(Exception, match=r"(?i)connection|terminat|closed"):
            async with engine.connect() as conn:
                await conn.scalar(text("SELECT pg_backend_pid()"))
        assert await backend_pid(engine) != first  # the pool replaced it after the failure
    finally:
        await engine.dispose()
