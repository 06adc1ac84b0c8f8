"""pgreact behind a real PgBouncer in transaction mode, for both drivers (docs/pgbouncer.md).

- the write engine's connection arguments per driver and pooler setting;
- no server-side prepared statement survives a transaction with ``PGREACT_POOLER`` set;
- the integration core through PgBouncer: two daemons, fan-out exactly once, retries, per-key
  order, ``on_batch`` + ``copy_rows``; writes through PgBouncer, LISTEN direct;
- the failure users see without ``PGREACT_POOLER`` and what ``pgreact check`` tells them;
- a listener pointed at PgBouncer: ``pgreact check`` fails with the fix, the daemon reports
  itself unready and keeps handling events by polling.

PgBouncer comes from the ``pgbouncer`` Debian package (``scripts/install-test-tools.sh``);
without it these tests skip, except under ``CI=true``, where they fail.
"""

from __future__ import annotations

import collections
import socket
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import anyio
import httpx
import pytest
from conftest import to_sa_url
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from pgreact import Event, Router
from pgreact.checks import run_checks
from pgreact.copy import copy_rows
from pgreact.db import KEEPALIVE_IDLE, create_write_engine, write_connect_args
from tests.handlers.effects import router as effects_router
from tests.support import (
    create_tables,
    effect_counts,
    install,
    make_settings,
    pgreact_cli,
    queue_state,
    running,
    sql,
    wait_until,
)

if TYPE_CHECKING:  # imported at run time by pytest_plugins (a plain import would come first)
    from tests.pgbouncer import PgBouncer

pytest_plugins = ["tests.pgbouncer"]
pytestmark = pytest.mark.anyio

POOLED = "pgbouncer-transaction"
EFFECT = text(
    "INSERT INTO effects (handler, event_id, k, op, v, attempt) VALUES (:h, :e, :k, :op, :v, :a)"
)
EFFECT_COLUMNS = ["handler", "event_id", "k", "op", "v", "attempt"]
PREPARED_ERROR = {
    "asyncpg": r'prepared statement "__asyncpg_stmt_\w+__" (does not exist|already exists)',
    "psycopg": r'prepared statement "_pg3_\d+" (does not exist|already exists)',
}


# -- connection arguments (no database) -------------------------------------------------------


def test_connect_args_follow_the_pooler_setting(driver: str) -> None:
    url = f"postgresql+{driver}://app@db:6432/app"
    direct = write_connect_args(make_settings(url))
    pooled = write_connect_args(make_settings(url, pooler=POOLED))
    if driver == "asyncpg":
        assert "statement_cache_size" not in direct
        assert direct["server_settings"]["statement_timeout"] == "6000"  # handler_timeout 5 + 1
        assert pooled["statement_cache_size"] == 0
        assert pooled["prepared_statement_cache_size"] == 0  # SQLAlchemy's own cache
        assert pooled["server_settings"] == {"application_name": "pgreact"}  # nothing else
        assert pooled["command_timeout"] == direct["command_timeout"] == 7.0
    else:
        assert "prepare_threshold" not in direct
        assert "statement_timeout=6000" in direct["options"]
        assert pooled["prepare_threshold"] is None
        assert "options" not in pooled  # PgBouncer refuses it
        assert pooled["keepalives_idle"] == direct["keepalives_idle"] == KEEPALIVE_IDLE
    # What the URL says wins: it is passed through verbatim.
    overridden = write_connect_args(
        make_settings(f"{url}?command_timeout=99&keepalives_idle=7", pooler=POOLED)
    )
    assert "command_timeout" not in overridden and "keepalives_idle" not in overridden


async def test_write_connections_send_tcp_keepalives(pg_dsn: str, driver: str) -> None:
    engine = create_write_engine(make_settings(to_sa_url(pg_dsn, driver)))
    try:
        async with engine.connect() as conn:
            raw = (await conn.get_raw_connection()).driver_connection
            if driver == "asyncpg":
                sock = raw._transport.get_extra_info("socket")
                assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
                assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == KEEPALIVE_IDLE
            else:
                params = raw.info.get_parameters()
                assert params["keepalives_idle"] == str(KEEPALIVE_IDLE)
    finally:
        await engine.dispose()


# -- no prepared statements through the pooler ------------------------------------------------


async def test_no_server_side_prepared_statements_survive_a_transaction(
    start_pgbouncer: Callable[..., PgBouncer], pg_dsn: str, driver: str
) -> None:
    # One server connection: every transaction of every client lands on it, so a statement
    # prepared by any of them would be visible to the last query.
    bouncer = start_pgbouncer(pool_size=1)
    engine = create_write_engine(
        make_settings(to_sa_url(bouncer.via(pg_dsn), driver), pooler=POOLED)
    )
    try:

        async def client() -> None:
            for i in range(8):  # past psycopg's prepare_threshold (5)
                async with engine.begin() as conn:
                    await conn.execute(text("SELECT CAST(:i AS int) + 1"), {"i": i})

        async with anyio.create_task_group() as tg:
            for _ in range(3):
                tg.start_soon(client)
        async with engine.connect() as conn:
            prepared = (await conn.execute(text("SELECT name FROM pg_prepared_statements"))).all()
        assert prepared == []
    finally:
        await engine.dispose()


# -- the integration core through PgBouncer ---------------------------------------------------


def core_router(fail_first: set[str]) -> Router:
    router = Router()

    @router.on("source", name="single")
    async def single(event: Event, session: AsyncSession) -> None:
        image = event.new or event.old or {}
        await session.execute(
            EFFECT,
            {
                "h": "single",
                "e": event.id,
                "k": event.key,
                "op": event.op,
                "v": image.get("v"),
                "a": event.attempt,
            },
        )
        if event.attempt == 1 and event.key in fail_first:
            raise RuntimeError("first attempt fails; its effect is rolled back")

    @router.on_batch("source", name="copier", max_size=50)
    async def copier(events: Sequence[Event], session: AsyncSession) -> None:
        rows = [
            ("copier", e.id, e.key, e.op, (e.new or e.old or {}).get("v"), e.attempt)
            for e in events
        ]
        await copy_rows(session, "public.effects", EFFECT_COLUMNS, rows)
        if any(e.attempt == 1 and e.key in fail_first for e in events):
            raise RuntimeError("after the COPY: the rows roll back with the batch")

    return router


def assert_per_key_order(dsn: str, handler: str) -> None:
    rows = sql(dsn, "SELECT k, event_id FROM effects WHERE handler = %s ORDER BY seq", [handler])
    last: dict[str, int] = {}
    for key, event_id in rows:
        assert event_id > last.get(key, 0), f"{handler}: key {key} out of capture order"
        last[key] = event_id


async def test_core_through_pgbouncer(pgbouncer: PgBouncer, pg_dsn: str, driver: str) -> None:
    create_tables(pg_dsn)
    fail_first = {str(k) for k in range(7, 200, 37)}
    router = core_router(fail_first)
    await install(to_sa_url(pg_dsn, driver), router)
    settings = make_settings(
        to_sa_url(pgbouncer.via(pg_dsn), driver),
        pooler=POOLED,
        listen_url=pg_dsn,  # LISTEN direct: the supported layout
        pool_size=4,  # small: PgBouncer multiplexes (docs/pgbouncer.md)
        max_overflow=0,
        concurrency=4,
        batch_size=20,
    )
    async with running(settings, router) as one, running(settings, router) as two:
        sql(pg_dsn, "INSERT INTO source SELECT g, 0 FROM generate_series(1, 200) g")
        for _ in range(2):
            sql(pg_dsn, "UPDATE source SET v = v + 1")
        sql(pg_dsn, "DELETE FROM source WHERE id % 4 = 0")
        expected = 200 + 400 + 50
        await wait_until(lambda: effect_counts(pg_dsn)[0] >= 2 * expected, message="effects")
        await wait_until(lambda: queue_state(pg_dsn)["live"] == 0, message="all acked")
        handled = [
            sum(
                d.metrics.registry.get_sample_value(
                    "pgreact_events_handled_total", {"handler": h, "outcome": "ok"}
                )
                or 0
                for h in ("single", "copier")
            )
            for d in (one, two)
        ]
    for handler in ("single", "copier"):
        assert effect_counts(pg_dsn, handler) == (expected, expected), handler
        assert_per_key_order(pg_dsn, handler)
    retried = sql(pg_dsn, "SELECT DISTINCT handler, k FROM effects WHERE attempt > 1 ORDER BY 1, 2")
    assert {k for h, k in retried if h == "single"} == fail_first
    assert {k for h, k in retried if h == "copier"} >= fail_first
    assert sum(handled) == 2 * expected
    # It all went through PgBouncer: it counted the transactions of this database.
    stats = {row[0]: row for row in pgbouncer.admin("SHOW STATS")}
    assert stats[pg_dsn.rsplit("/", 1)[1]][1] > expected // 20  # total_xact_count


# -- without PGREACT_POOLER: the failure users see, and what check says -----------------------


async def interleave(engine: AsyncEngine) -> None:
    """Client A runs a statement in a few transactions (past psycopg's prepare threshold), then
    B holds a transaction, so A's next transaction gets another server connection."""
    statement = text("SELECT CAST(:i AS int) + 1")
    async with engine.connect() as a, engine.connect() as b:
        for i in range(8):
            await a.execute(statement, {"i": i})
            await a.commit()
        await b.execute(statement, {"i": 0})  # B's transaction stays open
        await a.execute(statement, {"i": 9})
        await a.commit()
        await b.rollback()


async def test_without_the_pooler_setting_prepared_statements_break(
    start_pgbouncer: Callable[..., PgBouncer], pg_dsn: str, driver: str
) -> None:
    # A PgBouncer told to ignore the timeouts pgreact sends at startup, as many are: the
    # connection succeeds, and prepared statements fail at the first change of server.
    from tests.pgbouncer import LENIENT

    bouncer = start_pgbouncer(pool_size=2, ignore_startup_parameters=LENIENT)
    url = to_sa_url(bouncer.via(pg_dsn), driver)
    broken = create_write_engine(make_settings(url))
    try:
        with pytest.raises(Exception, match=PREPARED_ERROR[driver]):
            await interleave(broken)
    finally:
        await broken.dispose()
    fixed = create_write_engine(make_settings(url, pooler=POOLED))
    try:
        await interleave(fixed)
    finally:
        await fixed.dispose()


async def test_check_tells_what_to_set(pgbouncer: PgBouncer, pg_dsn: str, driver: str) -> None:
    create_tables(pg_dsn)
    await install(to_sa_url(pg_dsn, driver), effects_router)
    url = to_sa_url(pgbouncer.via(pg_dsn), driver)
    handlers = "tests.handlers.effects"
    # The default PgBouncer refuses the timeouts as startup parameters: check says both what
    # it sees (a transaction-mode pooler) and what to do.
    report = await run_checks(make_settings(url, handlers=handlers, listen_url=pg_dsn))
    failed = {name: message for level, name, message in report.results if level == "fail"}
    assert set(failed) == {"pooler", "database"}, report.lines()
    assert "transaction-mode pooler" in failed["pooler"]
    assert "set PGREACT_POOLER=pgbouncer-transaction" in failed["pooler"]
    assert "unsupported startup parameter" in failed["database"]
    assert "set PGREACT_POOLER=pgbouncer-transaction" in failed["database"]
    # Set: it passes, and says the role lacks the server-side timeouts.
    report = await run_checks(
        make_settings(url, handlers=handlers, listen_url=pg_dsn, pooler=POOLED)
    )
    assert report.ok, report.lines()
    levels = {name: level for level, name, _ in report.results}
    assert levels["pooler"] == "ok" and levels["timeouts"] == "warn"
    (timeouts,) = [m for _, name, m in report.results if name == "timeouts"]
    assert "ALTER ROLE" in timeouts and "statement_timeout = '6s'" in timeouts


def test_check_cli_without_the_pooler_setting(pgbouncer: PgBouncer, pg_dsn: str) -> None:
    env = {
        "PGREACT_DATABASE_URL": to_sa_url(pgbouncer.via(pg_dsn), "asyncpg"),
        "PGREACT_LISTEN_URL": pg_dsn,
        "PGREACT_HANDLERS": "tests.handlers.effects",
        "PGREACT_CONNECT_TIMEOUT": "3",
    }
    result = pgreact_cli("check", env=env)
    assert result.returncode == 1, result.stdout + result.stderr
    (pooler,) = [line for line in result.stdout.splitlines() if line.startswith("[FAIL] pooler")]
    assert "set PGREACT_POOLER=pgbouncer-transaction" in pooler


# -- the listener must not go through a transaction-mode pooler -------------------------------


async def test_check_catches_a_listener_behind_pgbouncer(
    pgbouncer: PgBouncer,
    start_pgbouncer: Callable[..., PgBouncer],
    pg_dsn: str,
    driver: str,
) -> None:
    write = to_sa_url(pgbouncer.via(pg_dsn), driver)
    session_mode = start_pgbouncer(pool_mode="session", pool_size=2)
    cases: dict[str, dict[str, Any]] = {
        "listen URL through PgBouncer": {"listen_url": pgbouncer.via(pg_dsn)},
        "listen URL unset (the write URL)": {},
        "session-mode PgBouncer": {"listen_url": session_mode.via(pg_dsn)},
    }
    results = {}
    for case, overrides in cases.items():
        settings = make_settings(
            write, handlers="tests.handlers.effects", pooler=POOLED, **overrides
        )
        report = await run_checks(settings)
        (results[case],) = [(lvl, m) for lvl, name, m in report.results if name == "listener"]
    for case in list(cases)[:2]:
        level, message = results[case]
        assert level == "fail", (case, message)
        assert "transaction-mode pooler" in message, message
        assert "set PGREACT_LISTEN_URL to a URL that reaches PostgreSQL directly" in message
    level, message = results["session-mode PgBouncer"]
    assert level == "ok" and "round trip" in message, message


async def test_daemon_with_its_listener_behind_pgbouncer_is_unready_and_polls(
    pgbouncer: PgBouncer, pg_dsn: str, driver: str
) -> None:
    create_tables(pg_dsn)
    router = core_router(set())
    await install(to_sa_url(pg_dsn, driver), router)
    # The common mistake: PgBouncer for the writes, PGREACT_LISTEN_URL left unset.
    settings = make_settings(to_sa_url(pgbouncer.via(pg_dsn), driver), pooler=POOLED)
    seen: collections.Counter[tuple[float | None, int]] = collections.Counter()
    async with running(settings, router) as daemon, httpx.AsyncClient() as http:
        sample = daemon.metrics.registry.get_sample_value

        async def observe() -> None:
            ready = await http.get(f"http://127.0.0.1:{daemon.http_port}/readyz")
            if ready.status_code == 503:
                assert "listener" in ready.json()["down"]
            seen[(sample("pgreact_listener_connected"), ready.status_code)] += 1

        for i in range(1, 21):  # 2 s of changes, handled by the sweep (every 0.5 s)
            sql(pg_dsn, "INSERT INTO source VALUES (%s, %s)", [i, i])
            await observe()
            await anyio.sleep(0.1)
        await wait_until(lambda: effect_counts(pg_dsn)[0] == 40, message="handled by polling")
        await observe()
    # A listener that notified itself would see its heartbeat come back through a
    # transaction-mode PgBouncer and look connected: delivery is proven from another session.
    assert set(seen) == {(0.0, 503)}, f"(listener_connected, /readyz) seen {dict(seen)}"
