"""How a failing event is found and isolated without giving up the rest of its group
(service/executor.py), end to end against a real server, for both drivers. Each test queues
its events before the daemon starts, so that one claim takes them all."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

import anyio
import pytest
import sqlalchemy.exc
import structlog.testing
from sqlalchemy import bindparam, text
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from pgreact import Event, Router, copy_rows
from pgreact.db import (
    connection_alive,
    create_write_engine,
    discard_after_driver_error,
    handler_failure_is_transient,
    is_transient,
)
from tests.handlers.common import EFFECT, effect_row
from tests.support import (
    create_tables,
    effect_counts,
    install,
    make_settings,
    queue_state,
    running,
    sql,
    wait_until,
)

pytestmark = pytest.mark.anyio


def keys(events: Sequence[Event]) -> list[int]:
    return [int(e.key or 0) for e in events]


async def run_until_settled(pg_dsn: str, sa_url: str, router: Router, rows: int) -> None:
    """Queue ``rows`` changes, run the daemon until none is live, with one attempt each."""
    await install(sa_url, router)
    sql(pg_dsn, f"INSERT INTO source SELECT g, g FROM generate_series(1, {rows}) g")
    async with running(make_settings(sa_url, max_attempts=1), router):
        await wait_until(lambda: queue_state(pg_dsn)["live"] == 0, message="all settled")


def dead_keys(pg_dsn: str) -> list[str]:
    rows = sql(pg_dsn, "SELECT row_key FROM pgreact.queue WHERE dead_at IS NOT NULL ORDER BY 1")
    return [r[0] for r in rows]


class Base(DeclarativeBase):
    pass


class EffectRow(Base):
    """The effects table, mapped: for a handler that writes through the ORM."""

    __tablename__ = "effects"
    seq: Mapped[int] = mapped_column(primary_key=True)
    handler: Mapped[str]
    event_id: Mapped[int]
    k: Mapped[str | None]


async def write_effect(how: str, event: Event, session: AsyncSession) -> None:
    if how == "statement":
        await session.execute(EFFECT, effect_row("one", event))
    elif how == "pending":  # added, not flushed: the next flush would write it
        session.add(EffectRow(handler="one", event_id=event.id, k=event.key))
    elif how == "driver":  # beneath SQLAlchemy, with the session's connection
        conn = await session.connection()
        driver: Any = (await conn.get_raw_connection()).driver_connection
        row = ("one", event.id, event.key)
        if conn.dialect.driver == "asyncpg":
            await driver.execute(
                "INSERT INTO effects (handler, event_id, k) VALUES ($1, $2, $3)", *row
            )
        else:
            await driver.execute(
                "INSERT INTO effects (handler, event_id, k) VALUES (%s, %s, %s)", row
            )
    elif how == "copy":
        await copy_rows(
            session, "public.effects", ["handler", "event_id", "k"], [("one", event.id, event.key)]
        )


def refusing_router(calls: list[int], poison: str, wrote: str = "nothing") -> Router:
    """An ``on`` handler that notes each call and raises at key ``poison``, after writing what
    ``wrote`` says."""
    router = Router()

    @router.on("source", name="one")
    async def one(event: Event, session: AsyncSession) -> None:
        calls.append(int(event.key or 0))
        if event.key == poison:
            await write_effect(wrote, event, session)
            raise RuntimeError(f"{poison} is poison")
        await session.execute(EFFECT, effect_row("one", event))

    return router


@pytest.mark.parametrize("wrote", ["nothing", "statement", "pending", "copy", "driver"])
async def test_on_handler_reruns_the_calls_before_a_failing_one_only_if_it_wrote(
    pg_dsn: str, sa_url: str, wrote: str
) -> None:
    create_tables(pg_dsn)
    calls: list[int] = []
    await run_until_settled(pg_dsn, sa_url, refusing_router(calls, "3", wrote), 8)
    if wrote == "nothing":
        # The transaction is as 3 found it: 1 and 2 keep their writes, 4-8 go on.
        assert calls == [1, 2, 3, 4, 5, 6, 7, 8]
    else:
        # 3's write went with 1's and 2's: they run again, then 4-8.
        assert calls == [1, 2, 3, 1, 2, 4, 5, 6, 7, 8]
    assert effect_counts(pg_dsn) == (7, 7)
    assert sql(pg_dsn, "SELECT count(*) FROM effects WHERE k = '3'") == [(0,)]
    assert dead_keys(pg_dsn) == ["3"]


async def test_retries_run_alone_first_and_a_crash_suspect_before_them(
    pg_dsn: str, sa_url: str
) -> None:
    create_tables(pg_dsn)
    calls: list[int] = []
    router = refusing_router(calls, "5")
    await install(sa_url, router)
    sql(pg_dsn, "INSERT INTO source SELECT g, g FROM generate_series(1, 8) g")
    # 5 raised on its first attempt; 7's process died while handling it.
    sql(pg_dsn, "UPDATE pgreact.queue SET attempts = 1, last_error = 'boom' WHERE row_key = '5'")
    sql(
        pg_dsn,
        "UPDATE pgreact.queue SET attempts = 1, crashed = true, last_error = 'claim abandoned' "
        "WHERE row_key = '7'",
    )
    async with running(make_settings(sa_url, max_attempts=2), router):
        await wait_until(lambda: queue_state(pg_dsn)["live"] == 0, message="all settled")
    # One claim took all eight: the crash suspect alone and committed alone, then the retry
    # alone (failing, it rolls back nothing else), then the others.
    assert calls == [7, 5, 1, 2, 3, 4, 6, 8]
    assert effect_counts(pg_dsn) == (7, 7)
    assert dead_keys(pg_dsn) == ["5"]


async def test_batch_handler_gets_the_event_its_iteration_stopped_at_blamed(
    pg_dsn: str, sa_url: str
) -> None:
    create_tables(pg_dsn)
    router = Router()
    calls: list[list[int]] = []

    @router.on_batch("source", name="bulk", max_size=8)
    async def bulk(events: Sequence[Event], session: AsyncSession) -> None:
        calls.append(keys(events))
        for event in events:  # validation that stops at the first bad event
            if event.key == "6":
                raise ValueError("6 is malformed")
        await session.execute(EFFECT, [effect_row("bulk", e) for e in events])

    await run_until_settled(pg_dsn, sa_url, router, 8)
    # No bisection: 6 alone to confirm it, then the other seven at once.
    assert calls == [[1, 2, 3, 4, 5, 6, 7, 8], [6], [1, 2, 3, 4, 5, 7, 8]]
    assert effect_counts(pg_dsn) == (7, 7)
    assert dead_keys(pg_dsn) == ["6"]


async def test_batch_bisection_does_not_rerun_a_half_known_to_fail(
    pg_dsn: str, sa_url: str
) -> None:
    """Batch of 8, event 6 poison, found only after the handler has seen every event: after
    [1-8] fails and [1-4] succeeds, [5-8] must hold the failure, so it is split without being
    run whole again."""
    create_tables(pg_dsn)
    router = Router()
    calls: list[list[int]] = []

    @router.on_batch("source", name="bulk", max_size=8)
    async def bulk(events: Sequence[Event], session: AsyncSession) -> None:
        calls.append(keys(events))
        if 6 in calls[-1]:
            raise RuntimeError("6 is poison")
        await session.execute(EFFECT, [effect_row("bulk", e) for e in events])

    await run_until_settled(pg_dsn, sa_url, router, 8)
    assert calls == [
        [1, 2, 3, 4, 5, 6, 7, 8],
        [1, 2, 3, 4],
        [5, 6],  # not [5, 6, 7, 8]
        [5],
        [6],
        [7, 8],
    ]
    assert effect_counts(pg_dsn) == (7, 7)
    assert dead_keys(pg_dsn) == ["6"]


async def test_a_failing_commit_is_pinned_on_its_event(pg_dsn: str, sa_url: str) -> None:
    """A deferred constraint fails at COMMIT, after every call succeeded: no call and no
    savepoint can be blamed, so the group runs a transaction per segment until the culprit is
    alone. Everything else commits exactly once."""
    create_tables(pg_dsn)
    sql(
        pg_dsn,
        "CREATE TABLE taken (k text UNIQUE DEFERRABLE INITIALLY DEFERRED);"
        "INSERT INTO taken VALUES ('5')",
    )
    router = Router()

    @router.on_batch("source", name="bulk", max_size=8)
    async def bulk(events: Sequence[Event], session: AsyncSession) -> None:
        await session.execute(text("INSERT INTO taken VALUES (:k)"), [{"k": e.key} for e in events])
        await session.execute(EFFECT, [effect_row("bulk", e) for e in events])

    await run_until_settled(pg_dsn, sa_url, router, 8)
    assert effect_counts(pg_dsn) == (7, 7)
    assert dead_keys(pg_dsn) == ["5"]
    (error,) = sql(pg_dsn, "SELECT last_error FROM pgreact.queue")[0]
    assert "IntegrityError" in error and "taken" in error
    assert sql(pg_dsn, "SELECT count(*), count(DISTINCT k) FROM taken") == [(8, 8)]


async def test_a_failure_after_a_failure_in_the_same_group_keeps_what_succeeded(
    pg_dsn: str, sa_url: str
) -> None:
    """Several poison events in one group of an ``on`` handler: each costs a savepoint, the
    others commit once, and the log of calls shows no event run more than twice."""
    create_tables(pg_dsn)
    router = Router()
    calls: list[int] = []

    @router.on("source", name="one")
    async def one(event: Event, session: AsyncSession) -> None:
        calls.append(int(event.key or 0))
        await session.execute(EFFECT, effect_row("one", event))
        if int(event.key or 0) % 7 == 0:  # after writing: the savepoint must undo it
            raise RuntimeError("multiples of 7 are poison")

    await run_until_settled(pg_dsn, sa_url, router, 50)
    assert effect_counts(pg_dsn) == (43, 43)
    assert dead_keys(pg_dsn) == sorted(str(k) for k in range(7, 50, 7))
    assert max(calls.count(k) for k in set(calls)) == 2


async def test_an_error_message_no_driver_can_send_is_recorded(pg_dsn: str, sa_url: str) -> None:
    """PostgreSQL text cannot hold NUL, and no driver encodes a lone surrogate: the failure
    must still be recorded, not lost in a second error while recording it (which looped)."""
    create_tables(pg_dsn)
    router = Router()

    @router.on("source", name="one")
    async def one(event: Event, session: AsyncSession) -> None:
        bad = "\x00" if event.key == "1" else "\udcff"  # NUL; a byte decoded by surrogateescape
        raise ValueError(f"bad byte in {event.key}: {bad}")

    await run_until_settled(pg_dsn, sa_url, router, 2)
    assert dead_keys(pg_dsn) == ["1", "2"]
    errors = [r[0] for r in sql(pg_dsn, "SELECT last_error FROM pgreact.queue ORDER BY id")]
    assert errors == ["ValueError: bad byte in 1: \\0", "ValueError: bad byte in 2: \\udcff"]


async def test_a_batch_that_hangs_in_sql_is_cancelled_and_its_event_isolated(
    pg_dsn: str, sa_url: str
) -> None:
    """A timeout leaves the connection's state unknown: the transaction is given up with the
    connection, what had succeeded in it runs again in the next one, and the event the handler
    hung on is dead after its one attempt."""
    create_tables(pg_dsn)
    router = Router()

    @router.on_batch("source", name="bulk", max_size=8)
    async def bulk(events: Sequence[Event], session: AsyncSession) -> None:
        for event in events:
            if event.key == "3":
                await session.execute(text("SELECT pg_sleep(3600)"))
        await session.execute(EFFECT, [effect_row("bulk", e) for e in events])

    await install(sa_url, router)
    sql(pg_dsn, "INSERT INTO source SELECT g, g FROM generate_series(1, 8) g")
    settings = make_settings(sa_url, max_attempts=1, handler_timeout=0.5)
    async with running(settings, router):
        await wait_until(lambda: queue_state(pg_dsn)["live"] == 0, message="all settled")
        assert effect_counts(pg_dsn) == (7, 7)
        assert dead_keys(pg_dsn) == ["3"]
        (error,) = sql(pg_dsn, "SELECT last_error FROM pgreact.queue")[0]
        assert "timed out after 0.5 s" in error
        # Neither the cancelled query nor its transaction outlives the timeout.
        await wait_until(
            lambda: (
                sql(
                    pg_dsn,
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                    "AND (query LIKE '%%pg_sleep(3600)%%' AND state = 'active' "
                    "     OR state LIKE 'idle in transaction%%') AND pid <> pg_backend_pid()",
                )
                == [(0,)]
            ),
            message="no hung query, no open transaction",
        )


async def test_the_traceback_of_a_repeated_failure_is_logged_once(pg_dsn: str, sa_url: str) -> None:
    """Formatting a traceback costs more than handling an event: the same failure (handler,
    exception type, line) logs its traceback once a minute, every failure still logs a line."""
    create_tables(pg_dsn)
    router = Router()

    @router.on("source", name="one")
    async def one(event: Event, session: AsyncSession) -> None:
        if event.key == "4":
            raise KeyError("four")  # a second failure site
        raise ValueError(f"cannot handle {event.key}")

    with structlog.testing.capture_logs() as logs:
        await run_until_settled(pg_dsn, sa_url, router, 4)
    failed = [line for line in logs if line["event"] == "handler_failed"]
    assert sorted(line["event_id"] for line in failed) == [1, 2, 3, 4]
    with_traceback = [line for line in failed if "exc_info" in line]
    assert sorted(type(line["exc_info"]).__name__ for line in with_traceback) == [
        "KeyError",
        "ValueError",
    ]
    for line in failed:
        assert ("exc_info" in line) != ("traceback" in line), line


# -- what a handler raises is an attempt; only database trouble is not --------------------------


class Fatal(BaseException):
    """A BaseException of the handler's own."""


@pytest.mark.parametrize(
    "raised",
    [SystemExit(3), KeyboardInterrupt(), Fatal("fatal"), asyncio.CancelledError("its own")],
    ids=["SystemExit", "KeyboardInterrupt", "BaseException", "CancelledError"],
)
async def test_a_base_exception_is_an_attempt_and_the_daemon_goes_on(
    pg_dsn: str, sa_url: str, raised: BaseException
) -> None:
    create_tables(pg_dsn)
    router = Router()

    @router.on("source", name="one")
    async def one(event: Event, session: AsyncSession) -> None:
        if event.key == "2":
            raise raised
        await session.execute(EFFECT, effect_row("one", event))

    await install(sa_url, router)
    sql(pg_dsn, "INSERT INTO source SELECT g, g FROM generate_series(1, 3) g")
    async with running(make_settings(sa_url, max_attempts=2), router):
        await wait_until(lambda: queue_state(pg_dsn)["dead"] == 1, message="2 dead")
        # Still running: a change made now is handled.
        sql(pg_dsn, "INSERT INTO source VALUES (4, 4)")
        await wait_until(lambda: effect_counts(pg_dsn) == (3, 3), message="1, 3 and 4")
    ((attempts, error),) = sql(pg_dsn, "SELECT attempts, last_error FROM pgreact.queue")
    assert attempts == 2
    assert error.startswith("HandlerAborted: the handler raised " + type(raised).__name__)


async def test_an_oserror_of_the_handler_is_an_attempt(pg_dsn: str, sa_url: str) -> None:
    """An HTTP client's ConnectionRefusedError is not database trouble: backed off, counted,
    dead-lettered (it was retried at once, forever, with no attempt counted)."""
    create_tables(pg_dsn)
    router = Router()

    @router.on("source", name="one")
    async def one(event: Event, session: AsyncSession) -> None:
        await session.execute(EFFECT, effect_row("one", event))  # it wrote, then failed
        if event.key == "2":
            raise ConnectionRefusedError(111, "Connection refused (http://localhost:9)")

    await install(sa_url, router)
    sql(pg_dsn, "INSERT INTO source SELECT g, g FROM generate_series(1, 3) g")
    async with running(make_settings(sa_url, max_attempts=3), router):
        await wait_until(lambda: queue_state(pg_dsn)["dead"] == 1, message="2 dead")
    ((attempts, error),) = sql(pg_dsn, "SELECT attempts, last_error FROM pgreact.queue")
    assert attempts == 3
    assert error.startswith("ConnectionRefusedError")
    assert sql(pg_dsn, "SELECT k FROM effects ORDER BY k") == [("1",), ("3",)]


@pytest.mark.parametrize("reraised", ["as is", "as an OSError of its own"])
async def test_losing_the_sessions_connection_is_not_an_attempt(
    pg_dsn: str, sa_url: str, reraised: str
) -> None:
    """The other side: the handler's own connection dies under it (here it kills its backend
    through the session). Whatever the handler makes of the error, the event is given back
    without an attempt, and runs again once."""
    create_tables(pg_dsn)
    router = Router()
    killed: list[int] = []

    @router.on("source", name="one")
    async def one(event: Event, session: AsyncSession) -> None:
        if event.key == "2" and not killed:
            killed.append(event.id)
            try:
                await session.execute(text("SELECT pg_terminate_backend(pg_backend_pid())"))
            except Exception as exc:
                if reraised == "as is":
                    raise
                raise OSError("the database went away") from exc
        await session.execute(EFFECT, effect_row("one", event))

    await install(sa_url, router)
    sql(pg_dsn, "INSERT INTO source SELECT g, g FROM generate_series(1, 3) g")
    async with running(make_settings(sa_url, max_attempts=1), router):
        await wait_until(lambda: queue_state(pg_dsn)["live"] == 0, message="all handled")
    assert killed
    # Every event once, each on its first (and only) attempt: nothing was charged.
    assert sql(pg_dsn, "SELECT k, attempt FROM effects ORDER BY k") == [
        ("1", 1),
        ("2", 1),
        ("3", 1),
    ]
    assert queue_state(pg_dsn)["dead"] == 0


# More bind parameters than either driver can send (asyncpg: 32767, libpq: 65535): refused on
# the client side, on a connection that stays healthy, without a SQLSTATE.
TOO_MANY = 70_000
TOO_MANY_IDS = text("SELECT 1 WHERE 1 IN :ids").bindparams(bindparam("ids", expanding=True))


async def test_a_statement_the_driver_refuses_is_an_attempt(pg_dsn: str, sa_url: str) -> None:
    """asyncpg's InterfaceError (psycopg's OperationalError) for too many parameters is the
    handler's bug, not a lost connection: counted and dead-lettered. It was taken for a
    disconnect (asyncpg) or a transient error (psycopg): retried at once forever, attempts 0,
    no last_error, and on asyncpg the whole pool invalidated at each retry."""
    create_tables(pg_dsn)
    router = Router()

    @router.on("source", name="one")
    async def one(event: Event, session: AsyncSession) -> None:
        if event.key == "2":
            await session.execute(TOO_MANY_IDS, {"ids": list(range(TOO_MANY))})
        await session.execute(EFFECT, effect_row("one", event))

    await install(sa_url, router)
    sql(pg_dsn, "INSERT INTO source SELECT g, g FROM generate_series(1, 3) g")
    async with running(make_settings(sa_url, max_attempts=2), router):
        await wait_until(lambda: queue_state(pg_dsn)["dead"] == 1, message="2 dead")
    ((key, attempts, error),) = sql(
        pg_dsn, "SELECT row_key, attempts, last_error FROM pgreact.queue"
    )
    assert (key, attempts) == ("2", 2)
    assert error.startswith(("InterfaceError", "OperationalError")), error[:200]
    assert sql(pg_dsn, "SELECT k, attempt FROM effects ORDER BY k") == [("1", 1), ("3", 1)]


async def too_many_beneath_sqlalchemy(raw: Any, driver: str) -> None:
    """The refused statement sent with the driver itself (as ``store.DriverStatement`` does)."""
    if driver == "asyncpg":
        marks = ", ".join(f"${i + 1}" for i in range(TOO_MANY))
        await raw.execute(f"SELECT 1 WHERE 1 IN ({marks})", *range(TOO_MANY))
    else:
        marks = ", ".join(["%s"] * TOO_MANY)
        await raw.execute(f"SELECT 1 WHERE 1 IN ({marks})", list(range(TOO_MANY)))


async def test_a_driver_error_on_a_live_connection_is_no_disconnect(
    pg_dsn: str, sa_url: str, driver: str
) -> None:
    """The classification beneath the test above, on the write engine: the refused statement
    leaves the connection valid and usable, and is neither transient for pgreact's own work
    nor for a handler; raised beneath SQLAlchemy, it is not taken for a lost server either.
    A connection that really died still is all of these."""
    engine = create_write_engine(make_settings(sa_url, pool_size=1, max_overflow=0))
    try:
        async with engine.connect() as conn:
            with pytest.raises(sqlalchemy.exc.DBAPIError) as refused:
                await conn.execute(TOO_MANY_IDS, {"ids": list(range(TOO_MANY))})
            assert not refused.value.connection_invalidated
            assert not conn.invalidated and await connection_alive(conn)
            assert not is_transient(refused.value)
            assert not handler_failure_is_transient(refused.value, conn.info, alive=True)
            await conn.rollback()
            assert (await conn.execute(text("SELECT 1"))).scalar() == 1  # the same connection

            raw: Any = (await conn.get_raw_connection()).driver_connection
            with pytest.raises(Exception, match=r"32767|65535") as beneath:
                await too_many_beneath_sqlalchemy(raw, driver)
            assert not await discard_after_driver_error(conn, beneath.value)

        async with engine.connect() as conn:
            pid = (await conn.execute(text("SELECT pg_backend_pid()"))).scalar()
            sql(pg_dsn, f"SELECT pg_terminate_backend({pid})")
            with pytest.raises(sqlalchemy.exc.DBAPIError) as lost:
                await conn.execute(text("SELECT 1"))
            assert is_transient(lost.value)
            assert not await connection_alive(conn)
    finally:
        await engine.dispose()


# -- a handler that ends pgreact's transaction ----------------------------------------------


async def end_transaction(how: str, session: AsyncSession) -> None:
    if how == "connection.exec_driver_sql":
        await (await session.connection()).exec_driver_sql("COMMIT")
    else:
        await session.execute(text(how))


@pytest.mark.parametrize(
    "how", ["COMMIT", "END", "COMMIT AND CHAIN", "connection.exec_driver_sql", "ROLLBACK"]
)
async def test_a_raw_commit_fails_the_offender_and_never_duplicates_the_others(
    pg_dsn: str, sa_url: str, how: str
) -> None:
    """Good events before and after the offender in one group: each one's effect exactly once.
    (It was three times: the group ran again after the commit, and again split in halves.)"""
    create_tables(pg_dsn)
    router = Router()
    calls: list[int] = []

    @router.on("source", name="one")
    async def one(event: Event, session: AsyncSession) -> None:
        calls.append(int(event.key or 0))
        await session.execute(EFFECT, effect_row("one", event))
        if event.key == "3":
            await end_transaction(how, session)

    await run_until_settled(pg_dsn, sa_url, router, 6)
    good = sql(pg_dsn, "SELECT k, count(*) FROM effects WHERE k <> '3' GROUP BY k ORDER BY k")
    assert good == [(k, 1) for k in ("1", "2", "4", "5", "6")]
    assert dead_keys(pg_dsn) == ["3"]
    (error,) = sql(pg_dsn, "SELECT last_error FROM pgreact.queue")[0]
    assert "HandlerMisuse" in error and "ended pgreact's transaction" in error
    if how == "ROLLBACK":
        assert calls == [1, 2, 3, 1, 2, 4, 5, 6]  # what it rolled back runs again
    else:
        assert calls == [1, 2, 3, 4, 5, 6]  # what it committed is acked, not run again


# -- a handler that blocks the event loop -----------------------------------------------------


async def test_a_handler_blocking_the_loop_is_charged_and_the_others_are_spared(
    pg_dsn: str, sa_url: str
) -> None:
    """``blocker`` sleeps 2.5 s without awaiting (handler timeout 1 s) while ``bystander``
    awaits a 0.6 s sleep: the bystander's call must not be charged the stall (its timer
    fired late, during it), the blocker is, and the log says who stopped the loop."""
    create_tables(pg_dsn)
    router = Router()
    bystander_started = anyio.Event()

    @router.on("source", name="bystander")
    async def bystander(event: Event, session: AsyncSession) -> None:
        bystander_started.set()
        await anyio.sleep(0.6)
        await session.execute(EFFECT, effect_row("bystander", event))

    @router.on("source", name="blocker")
    async def blocker(event: Event, session: AsyncSession) -> None:
        with anyio.fail_after(10):
            await bystander_started.wait()
        time.sleep(2.5)  # noqa: ASYNC251 - what this test is about
        await session.execute(EFFECT, effect_row("blocker", event))

    await install(sa_url, router)
    sql(pg_dsn, "INSERT INTO source VALUES (1, 1)")
    settings = make_settings(sa_url, max_attempts=1, handler_timeout=1.0)
    with structlog.testing.capture_logs() as logs:
        async with running(settings, router):
            await wait_until(lambda: queue_state(pg_dsn)["live"] == 0, message="both settled")
    assert sql(pg_dsn, "SELECT handler, attempt FROM effects") == [("bystander", 1)]
    ((handler, error),) = sql(pg_dsn, "SELECT handler, last_error FROM pgreact.queue")
    assert handler == "blocker"
    assert "EventLoopBlocked: the handler blocked the event loop for" in error
    blocked = [line for line in logs if line["event"] == "event_loop_blocked"]
    assert blocked and blocked[0]["handler_call"] == {"handler": "blocker", "event_id": 1}
    assert "test_executor.py" in blocked[0]["where"]


def test_describe_cuts_an_error_quoting_a_huge_statement() -> None:
    from pgreact.executor import DESCRIBE_LIMIT, describe

    text = describe(ValueError("x" * 100_000))
    assert text.startswith("ValueError: xxx")
    assert len(text) < DESCRIBE_LIMIT + 50
    assert text.endswith(f"({100_000 + len('ValueError: ') - DESCRIBE_LIMIT} more characters)")
    assert describe(ValueError("short")) == "ValueError: short"
