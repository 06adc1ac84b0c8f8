"""``pgreact check``: is this configuration and this database ready to run the daemon?

Each check yields ``ok``, ``warn`` or ``fail`` with a message that says what to do. Only ``fail``
makes the command exit non-zero.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import urlsplit

import anyio
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from listeners import backend_for
from listeners.protocol import Notification
from service import installer
from service.db import create_write_engine
from service.errors import PgreactError
from service.router import Router, load_routers
from service.settings import Settings, mask_url

Level = Literal["ok", "warn", "fail"]
BUDGET_WARN = 0.8
SELF_TEST_TIMEOUT = 5.0
PGBOUNCER_PORT = 6432


@dataclass
class CheckReport:
    results: list[tuple[Level, str, str]] = field(default_factory=list)

    def add(self, level: Level, name: str, message: str) -> None:
        self.results.append((level, name, message))

    @property
    def ok(self) -> bool:
        return all(level != "fail" for level, _, _ in self.results)

    def lines(self) -> list[str]:
        out = [f"[{level.upper():4}] {name}: {message}" for level, name, message in self.results]
        fails = sum(1 for lvl, _, _ in self.results if lvl == "fail")
        warns = sum(1 for lvl, _, _ in self.results if lvl == "warn")
        out.append(f"{'OK' if self.ok else 'FAILED'}: {fails} failure(s), {warns} warning(s)")
        return out


async def run_checks(settings: Settings) -> CheckReport:
    report = CheckReport()
    router: Router | None = None
    try:
        router = load_routers(settings.require_handlers())
        report.add(
            "ok", "handlers", f"{len(router.durable)} durable, {len(router.notify)} on_notify"
        )
    except PgreactError as exc:
        report.add("fail", "handlers", str(exc))
    await _check_write_database(settings, router, report)
    await _check_listener(settings, report)
    return report


async def _check_write_database(
    settings: Settings, router: Router | None, report: CheckReport
) -> None:
    url = settings.require_database_url()
    port = urlsplit(url.replace("+asyncpg", "").replace("+psycopg", "")).port
    if port == PGBOUNCER_PORT and settings.pooler == "none":
        report.add(
            "warn",
            "pooler",
            f"PGREACT_DATABASE_URL uses port {PGBOUNCER_PORT}, PgBouncer's usual port, while "
            "PGREACT_POOLER=none: behind a transaction-mode PgBouncer set "
            "PGREACT_POOLER=pgbouncer-transaction",
        )
    engine = create_write_engine(settings)
    try:
        with anyio.fail_after(settings.connect_timeout + 5):
            async with engine.connect() as conn:
                row = (
                    await conn.execute(
                        text(
                            "SELECT current_setting('server_version'), "
                            "current_setting('max_connections')::int, "
                            "current_setting('superuser_reserved_connections')::int, "
                            "coalesce(current_setting('reserved_connections', true), '0')::int, "
                            "pg_is_in_recovery()"
                        )
                    )
                ).one()
                version, max_conn, su_reserved, reserved, in_recovery = row
                report.add(
                    "ok", "database", f"connected to PostgreSQL {version} at {mask_url(url)}"
                )
                if in_recovery:
                    report.add(
                        "fail",
                        "database",
                        "the write URL reaches a server in recovery (a standby): point "
                        "PGREACT_DATABASE_URL at the primary",
                    )
                _check_budget(settings, int(max_conn) - int(su_reserved) - int(reserved), report)
                if router is not None:
                    await _check_install(conn, settings, router, report)
    except PgreactError:
        raise
    except Exception as exc:
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        report.add(
            "fail",
            "database",
            f"cannot use PGREACT_DATABASE_URL ({mask_url(url)}): {type(exc).__name__}: "
            f"{mask_url(first)}",
        )
    finally:
        await engine.dispose()


def _check_budget(settings: Settings, available: int, report: CheckReport) -> None:
    per_process = settings.pool_size + settings.max_overflow + 1
    needed = per_process * settings.replicas
    detail = (
        f"(PGREACT_POOL_SIZE {settings.pool_size} + PGREACT_MAX_OVERFLOW "
        f"{settings.max_overflow} + 1 listener) x {settings.replicas} replica(s) = {needed} of "
        f"{available} connections available"
    )
    if needed > available:
        report.add(
            "fail",
            "connections",
            f"{detail}: lower the pool size or replicas, put PgBouncer in front of the write "
            "URL, or raise max_connections",
        )
    elif needed > BUDGET_WARN * available:
        report.add(
            "warn", "connections", f"{detail}: above {BUDGET_WARN:.0%}; little room for others"
        )
    else:
        report.add("ok", "connections", detail)


async def _check_install(
    conn: AsyncConnection, settings: Settings, router: Router, report: CheckReport
) -> None:
    schema = settings.schema_name
    version = await installer.schema_version(conn, schema)
    latest = installer.latest_version()
    if version < latest:
        report.add(
            "fail",
            "schema",
            f"schema {schema!r} is at version {version}, this pgreact needs {latest}: "
            "run `pgreact install`",
        )
        return
    report.add("ok", "schema", f"schema {schema!r} at version {version}")
    triggers = await installer.installed_triggers(conn, schema)
    subscribed = {
        r[0] for r in await conn.execute(text(f'SELECT handler FROM "{schema}".subscriptions'))
    }
    problems = []
    for handler in router.durable:
        have = triggers.get(handler.table, set())
        missing_ops = sorted(handler.ops - have)
        if handler.name not in subscribed:
            problems.append(f"{handler.name} is not subscribed")
        if missing_ops:
            problems.append(f"{handler.table} lacks capture of {', '.join(missing_ops)}")
    if problems:
        report.add("fail", "triggers", "; ".join(problems) + ": run `pgreact install`")
    else:
        report.add("ok", "triggers", f"capture in place for {len(router.durable)} handler(s)")


async def _check_listener(settings: Settings, report: CheckReport) -> None:
    """Round trip a NOTIFY through the listen URL: a transaction-mode pooler accepts LISTEN but
    never delivers, which is exactly what this catches."""
    received = anyio.Event()
    channel = f"pgreact_check_{secrets.token_hex(6)}"

    def on_notification(note: Notification) -> None:
        if note.channel == channel:
            received.set()

    backend = backend_for(settings.listener_driver)
    url = settings.effective_listen_url
    try:
        conn = await backend.connect(
            settings.listen_dsn,
            application_name=f"{settings.application_name}-check",
            on_notification=on_notification,
            connect_timeout=settings.connect_timeout,
        )
    except Exception as exc:
        report.add("fail", "listener", f"cannot connect to {mask_url(url)} ({backend.name}): {exc}")
        return
    try:
        await conn.listen([channel])
        await conn.notify(channel, "check")
        with anyio.move_on_after(SELF_TEST_TIMEOUT):
            await received.wait()
        if received.is_set():
            report.add("ok", "listener", f"LISTEN/NOTIFY round trip through {mask_url(url)}")
        else:
            report.add(
                "fail",
                "listener",
                f"a NOTIFY sent through {mask_url(url)} did not come back within "
                f"{SELF_TEST_TIMEOUT:g} s: PGREACT_LISTEN_URL probably goes through a "
                "transaction-mode pooler; point it at PostgreSQL directly or at a "
                "session-mode pool",
            )
    except Exception as exc:
        report.add("fail", "listener", f"LISTEN failed on {mask_url(url)}: {exc}")
    finally:
        await conn.aclose()
