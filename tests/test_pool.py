"""The write pool's pre-ping: idle connections are pinged at checkout, busy ones are not."""

from __future__ import annotations

import anyio
import pytest
from sqlalchemy import text

from service import db
from service.db import create_write_engine
from tests.support import make_settings, sql

pytestmark = pytest.mark.anyio


async def test_a_pooled_connection_killed_while_idle_is_replaced_at_checkout(
    sa_url: str, pg_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(db, "PING_AFTER_IDLE", 0.05)
    engine = create_write_engine(make_settings(sa_url, pool_size=1, max_overflow=0))
    try:
        async with engine.connect() as conn:
            first = await conn.scalar(text("SELECT pg_backend_pid()"))
        sql(pg_dsn, "SELECT pg_terminate_backend(%s)", [first])
        await anyio.sleep(0.2)  # idle for longer than PING_AFTER_IDLE: pinged, found dead
        async with engine.connect() as conn:
            second = await conn.scalar(text("SELECT pg_backend_pid()"))
        assert second != first
    finally:
        await engine.dispose()


async def test_a_connection_used_a_moment_ago_is_not_pinged(
    sa_url: str, pg_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without a ping, the dead connection surfaces on first use (and the dispatcher retries)."""
    monkeypatch.setattr(db, "PING_AFTER_IDLE", 60.0)
    engine = create_write_engine(make_settings(sa_url, pool_size=1, max_overflow=0))
    try:
        async with engine.connect() as conn:
            first = await conn.scalar(text("SELECT pg_backend_pid()"))
        sql(pg_dsn, "SELECT pg_terminate_backend(%s)", [first])
        await anyio.sleep(0.2)
        with pytest.raises(Exception, match=r"(?i)connection|terminat|closed"):
            async with engine.connect() as conn:
                await conn.scalar(text("SELECT pg_backend_pid()"))
        async with engine.connect() as conn:  # the pool replaced it after the failure
            assert await conn.scalar(text("SELECT pg_backend_pid()")) != first
    finally:
        await engine.dispose()
