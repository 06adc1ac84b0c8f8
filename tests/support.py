"""Helpers for tests that run the daemon: schema for effects, fast settings, an in-process
daemon runner, and polling with a deadline (no sleeps that guess)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any
from unittest import mock

import anyio
import psycopg
import structlog
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

from pgreact import installer
from pgreact.events import Event
from pgreact.listeners import (
    ListenerBackend,
    ListenerConnectError,
    ListenerConnection,
    NotificationCallback,
)
from pgreact.logging import configure_logging
from pgreact.router import Router
from pgreact.runtime import Daemon
from pgreact.settings import Settings, load_settings

ROOT = Path(__file__).resolve().parents[1]

# Effects deliberately have no unique constraint: duplicates must be countable.
TABLES_SQL = """
CREATE TABLE IF NOT EXISTS source (id bigint PRIMARY KEY, v integer, payload text);
CREATE TABLE IF NOT EXISTS effects (
    seq bigserial, handler text, event_id bigint, k text, op text, v integer,
    attempt integer, at timestamptz DEFAULT clock_timestamp()
);
"""

FAST: dict[str, Any] = {
    "heartbeat_interval": 0.5,
    "heartbeat_timeout": 1.0,
    "connect_timeout": 3.0,
    "sweep_interval": 0.5,
    "stats_interval": 0.5,
    "retry_base": 0.05,
    "retry_max": 0.2,
    "handler_timeout": 5.0,
    "shutdown_timeout": 5.0,
    "http_host": "127.0.0.1",
    "http_port": 0,
    "log_level": "WARNING",
}


def libpq(url: str) -> str:
    return url.replace("postgresql+asyncpg://", "postgresql://").replace(
        "postgresql+psycopg://", "postgresql://"
    )


def make_settings(sa_url: str, **overrides: Any) -> Settings:
    values = {**FAST, "database_url": sa_url, **overrides}
    return load_settings(None, environ={}, **values)


def sql(dsn: str, statement: str, params: Any = None) -> list[tuple[Any, ...]]:
    """Run one statement with autocommit and return its rows (empty for no result)."""
    with psycopg.connect(libpq(dsn), autocommit=True) as conn, conn.cursor() as cur:
        cur.execute(statement, params)
        return cur.fetchall() if cur.description else []


def create_tables(dsn: str) -> None:
    with psycopg.connect(libpq(dsn), autocommit=True) as conn:
        conn.execute(TABLES_SQL)


async def install(
    sa_url: str, router: Router, schema: str = "pgreact", *, up_to: int | None = None
) -> installer.InstallPlan:
    """``pgreact install``; with ``up_to``, as a release whose newest migration was that one
    (to test upgrades from it)."""
    engine = create_async_engine(sa_url)
    try:
        if up_to is None:
            return await installer.install(engine, router, schema)
        older = [m for m in installer.migration_files() if m[0] <= up_to]
        with mock.patch.object(installer, "migration_files", return_value=older):
            return await installer.install(engine, router, schema)
    finally:
        await engine.dispose()


async def queue_for_noop_handler(dsn: str, sa_url: str, rows: int, name: str = "h") -> None:
    """The test tables, a no-op ``on`` handler on ``source`` installed, ``rows`` changes queued
    for it (no daemon runs: for tests of the queue's own SQL)."""
    create_tables(dsn)
    router = Router()

    @router.on("public.source", name=name)
    async def noop(_event: Event, _session: AsyncSession) -> None:
        return None

    await install(sa_url, router)
    sql(dsn, f"INSERT INTO source SELECT g, g FROM generate_series(1, {rows}) g")


@contextlib.asynccontextmanager
async def running(settings: Settings, router: Router, **kwargs: Any) -> AsyncIterator[Daemon]:
    """Run a daemon in this event loop for the duration of the block, then stop it cleanly."""
    daemon = Daemon(settings, router, **kwargs)
    async with anyio.create_task_group() as tg:
        await tg.start(daemon.run)
        try:
            yield daemon
        finally:
            daemon.stop()


async def wait_until(
    predicate: Callable[[], Awaitable[bool] | bool],
    timeout: float = 20.0,
    interval: float = 0.05,
    message: str = "condition",
) -> None:
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {message}")
        await anyio.sleep(interval)


def effect_counts(dsn: str, handler: str | None = None) -> tuple[int, int]:
    """(rows, distinct event ids) in effects, optionally for one handler."""
    rows = sql(
        dsn,
        "SELECT count(*), count(DISTINCT event_id) FROM effects "
        "WHERE %(h)s::text IS NULL OR handler = %(h)s",
        {"h": handler},
    )
    return int(rows[0][0]), int(rows[0][1])


def queue_state(dsn: str, schema: str = "pgreact") -> dict[str, int]:
    row = sql(
        dsn,
        f"""SELECT count(*) FILTER (WHERE dead_at IS NULL),
                   count(*) FILTER (WHERE dead_at IS NOT NULL),
                   count(*) FILTER (WHERE lease_until IS NOT NULL)
            FROM "{schema}".queue""",
    )[0]
    return {"live": int(row[0]), "dead": int(row[1]), "claimed": int(row[2])}


def pgreact_cli(
    *args: str, env: Mapping[str, str], timeout: float = 60, cwd: Path = ROOT
) -> subprocess.CompletedProcess[str]:
    """Run the real CLI in a subprocess (``python -m pgreact.cli``)."""
    full_env = {**os.environ, **env, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}
    return subprocess.run(
        [sys.executable, "-m", "pgreact.cli", *args],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        check=False,
    )


def spawn_daemon(env: Mapping[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    """Start ``pgreact run`` as a real process (for signal and multi-process tests)."""
    full_env = {**os.environ, **env, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}
    log = log_path.open("wb")
    return subprocess.Popen(
        [sys.executable, "-m", "pgreact.cli", "run"],
        env=full_env,
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
    )


# The daemon under test logs like in production, minus the debug chatter. The level is applied
# by a processor, not the logger wrapper, so `structlog.testing.capture_logs` (which replaces
# the processors) still sees every level.
_LEVELS = {"debug": 10, "info": 20, "warning": 30, "warn": 30, "error": 40, "critical": 50}
_MIN_LEVEL = _LEVELS[os.environ.get("PGREACT_TEST_LOG_LEVEL", "WARNING").lower()]


def _below_min_level(_logger: object, method: str, event: Any) -> Any:
    if _LEVELS.get(method, 50) < _MIN_LEVEL:
        raise structlog.DropEvent
    return event


configure_logging("console", "DEBUG", cache=False)
structlog.configure(processors=[_below_min_level, *structlog.get_config()["processors"]])


class CountingBackend:
    """Wraps a backend to count connect attempts and failures (works for every backend)."""

    def __init__(self, inner: ListenerBackend) -> None:
        self.inner = inner
        self.name = inner.name
        self.attempts = 0
        self.failures = 0

    async def connect(
        self,
        dsn: str,
        *,
        application_name: str,
        on_notification: NotificationCallback,
        connect_timeout: float,
    ) -> ListenerConnection:
        self.attempts += 1
        try:
            return await self.inner.connect(
                dsn,
                application_name=application_name,
                on_notification=on_notification,
                connect_timeout=connect_timeout,
            )
        except ListenerConnectError:
            self.failures += 1
            raise
