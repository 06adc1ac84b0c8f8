"""The pipeline end to end, in process, against a real server, for both drivers:
capture → listener → dispatcher → handler in a transaction → ack."""

from __future__ import annotations

import collections
import time
from collections.abc import Sequence
from typing import Any

import anyio
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from pgreact import Event, Notification, Router
from tests.handlers.common import EFFECT, effect_row
from tests.handlers.common import effects_router as two_handler_router
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


def effects_router() -> Router:
    return two_handler_router(64)


async def test_every_change_reaches_every_handler_exactly_once(pg_dsn: str, sa_url: str) -> None:
    create_tables(pg_dsn)
    router = effects_router()
    await install(sa_url, router)
    async with running(make_settings(sa_url), router):
        sql(pg_dsn, "INSERT INTO source SELECT g, g FROM generate_series(1, 1000) g")
        sql(pg_dsn, "UPDATE source SET v = v + 1")
        sql(pg_dsn, "DELETE FROM source WHERE id % 2 = 0")
        expected = 1000 + 1000 + 500
        for handler in ("single", "batch"):
            await wait_until(
                lambda h=handler: effect_counts(pg_dsn, h)[0] >= expected,
                message=f"{handler} effects",
            )
    for handler in ("single", "batch"):
        assert effect_counts(pg_dsn, handler) == (expected, expected)
        ops = dict(
            sql(
                pg_dsn, "SELECT op, count(*) FROM effects WHERE handler = %s GROUP BY op", [handler]
            )
        )
        assert ops == {"INSERT": 1000, "UPDATE": 1000, "DELETE": 500}
    # Both handlers saw the same change ids: Event.id identifies the change, not the delivery.
    assert sql(
        pg_dsn,
        "SELECT count(*) FROM (SELECT event_id FROM effects GROUP BY event_id "
        "HAVING count(*) <> 2) x",
    ) == [(0,)]
    assert queue_state(pg_dsn) == {"live": 0, "dead": 0, "claimed": 0}


async def test_event_fields_and_a_one_megabyte_row(pg_dsn: str, sa_url: str) -> None:
    create_tables(pg_dsn)
    seen: list[Event] = []
    router = Router()

    @router.on("source", name="collect")
    async def collect(event: Event, session: AsyncSession) -> None:
        seen.append(event)

    await install(sa_url, router)
    big = "x" * (1024 * 1024)
    async with running(make_settings(sa_url), router):
        sql(pg_dsn, "INSERT INTO source VALUES (1, 10, %s)", [big])
        sql(pg_dsn, "UPDATE source SET v = 11 WHERE id = 1")
        sql(pg_dsn, "DELETE FROM source WHERE id = 1")
        await wait_until(lambda: len(seen) >= 3, message="three events")
    ins, upd, dele = seen
    assert (ins.op, upd.op, dele.op) == ("INSERT", "UPDATE", "DELETE")
    assert ins.table == "public.source" and ins.key == "1" and ins.attempt == 1
    assert ins.new is not None and ins.new["payload"] == big and ins.old is None
    assert upd.old is not None and upd.new is not None
    assert (upd.old["v"], upd.new["v"]) == (10, 11)
    assert dele.new is None and dele.old is not None and dele.old["id"] == 1
    assert ins.id < upd.id < dele.id
    assert ins.created_at.tzinfo is not None


async def test_failing_handler_retries_then_dead_letters_without_hurting_others(
    pg_dsn: str, sa_url: str
) -> None:
    create_tables(pg_dsn)
    router = Router()
    poison = {"13", "42"}
    attempts: collections.Counter[str] = collections.Counter()
    calls: list[tuple[str | None, int]] = []

    @router.on("source", name="picky")
    async def picky(event: Event, session: AsyncSession) -> None:
        attempts[str(event.key)] += 1
        calls.append((event.key, event.attempt))
        await session.execute(EFFECT, effect_row("picky", event))  # rolled back when we raise
        if event.key in poison:
            raise ValueError(f"cannot handle {event.key}")

    @router.on("source", name="calm")
    async def calm(event: Event, session: AsyncSession) -> None:
        await session.execute(EFFECT, effect_row("calm", event))

    await install(sa_url, router)
    settings = make_settings(sa_url, max_attempts=3)
    async with running(settings, router) as daemon:
        sql(pg_dsn, "INSERT INTO source SELECT g, g FROM generate_series(1, 200) g")
        await wait_until(lambda: queue_state(pg_dsn)["dead"] == 2, message="two dead letters")
        await wait_until(lambda: effect_counts(pg_dsn, "calm")[0] == 200, message="calm done")
        await wait_until(lambda: effect_counts(pg_dsn, "picky")[0] == 198, message="picky done")
        assert effect_counts(pg_dsn, "picky") == (198, 198)
        assert attempts["13"] == attempts["42"] == 3, [c for c in calls if c[0] in poison]
        dead = sql(
            pg_dsn,
            "SELECT row_key, attempts, last_error FROM pgreact.queue WHERE dead_at IS NOT NULL "
            "ORDER BY row_key",
        )
        assert [(k, a) for k, a, _ in dead] == [("13", 3), ("42", 3)]
        assert all("ValueError: cannot handle" in e for _, _, e in dead)
        handled = daemon.metrics.registry.get_sample_value
        assert handled("pgreact_events_handled_total", {"handler": "picky", "outcome": "dead"}) == 2
        assert (
            handled("pgreact_events_handled_total", {"handler": "picky", "outcome": "retry"}) == 4
        )

        # Fixed: `dead retry` redrives them, exactly once.
        poison.clear()
        sql(
            pg_dsn,
            "UPDATE pgreact.queue SET dead_at = NULL, attempts = 0, run_at = now() "
            "WHERE dead_at IS NOT NULL",
        )
        await wait_until(lambda: effect_counts(pg_dsn, "picky")[0] == 200, message="redrive")
    assert effect_counts(pg_dsn, "picky") == (200, 200)
    assert effect_counts(pg_dsn, "calm") == (200, 200)


async def test_batch_handler_isolates_the_failing_event(pg_dsn: str, sa_url: str) -> None:
    create_tables(pg_dsn)
    router = Router()

    @router.on_batch("source", name="bulk", max_size=100)
    async def bulk(events: Sequence[Event], session: AsyncSession) -> None:
        if any(e.key == "77" for e in events):
            raise RuntimeError("77 is poison")
        await session.execute(EFFECT, [effect_row("bulk", e) for e in events])

    await install(sa_url, router)
    async with running(make_settings(sa_url, max_attempts=2), router):
        sql(pg_dsn, "INSERT INTO source SELECT g, g FROM generate_series(1, 300) g")
        await wait_until(lambda: queue_state(pg_dsn)["dead"] == 1, message="one dead letter")
        await wait_until(lambda: effect_counts(pg_dsn)[0] == 299, message="the rest handled")
    assert effect_counts(pg_dsn) == (299, 299)
    assert sql(pg_dsn, "SELECT row_key FROM pgreact.queue WHERE dead_at IS NOT NULL") == [("77",)]


async def test_hanging_handler_times_out_and_the_queue_keeps_moving(
    pg_dsn: str, sa_url: str
) -> None:
    create_tables(pg_dsn)
    router = Router()

    @router.on("source", name="sleepy")
    async def sleepy(event: Event, session: AsyncSession) -> None:
        if event.key == "5":
            await anyio.sleep(3600)  # a Python-level hang
        if event.key == "6":
            await session.execute(text("SELECT pg_sleep(3600)"))  # an SQL-level hang
        await session.execute(EFFECT, effect_row("sleepy", event))

    await install(sa_url, router)
    settings = make_settings(sa_url, handler_timeout=0.5, max_attempts=2)
    async with running(settings, router) as daemon:
        sql(pg_dsn, "INSERT INTO source SELECT g, g FROM generate_series(1, 50) g")
        await wait_until(lambda: effect_counts(pg_dsn)[0] == 48, message="others handled")
        await wait_until(lambda: queue_state(pg_dsn)["dead"] == 2, message="hangs dead-lettered")
        # The daemon is still healthy: later changes flow.
        sql(pg_dsn, "INSERT INTO source SELECT g, g FROM generate_series(51, 60) g")
        await wait_until(lambda: effect_counts(pg_dsn)[0] == 58, message="later changes")
        sample = daemon.metrics.registry.get_sample_value
        assert sample("pgreact_events_handled_total", {"handler": "sleepy", "outcome": "dead"}) == 2
    errors = [r[0] for r in sql(pg_dsn, "SELECT last_error FROM pgreact.queue")]
    assert len(errors) == 2 and all("timed out" in e for e in errors)
    # No connection is left idle in a transaction by the cancelled calls.
    assert sql(
        pg_dsn,
        "SELECT count(*) FROM pg_stat_activity WHERE state LIKE 'idle in transaction%%' "
        "AND datname = current_database()",
    ) == [(0,)]


async def test_per_key_order_holds_with_concurrency(pg_dsn: str, sa_url: str) -> None:
    create_tables(pg_dsn)
    router = Router()

    @router.on("source", name="ordered")
    async def ordered(event: Event, session: AsyncSession) -> None:
        await anyio.sleep(0.001 * (hash(event.id) % 3))  # jitter interleavings across keys
        await session.execute(EFFECT, effect_row("ordered", event))

    await install(sa_url, router)
    settings = make_settings(sa_url, concurrency=8, batch_size=5)
    async with running(settings, router):
        sql(pg_dsn, "INSERT INTO source SELECT g, 0 FROM generate_series(1, 20) g")
        for _ in range(10):
            sql(pg_dsn, "UPDATE source SET v = v + 1")
        await wait_until(lambda: effect_counts(pg_dsn)[0] == 220, message="all events")
    # Per key, effects were written in capture order: v strictly increases with seq.
    rows = sql(pg_dsn, "SELECT k, v, event_id FROM effects ORDER BY seq")
    last: dict[str, tuple[int, int]] = {}
    for key, v, event_id in rows:
        if key in last:
            assert (v, event_id) > last[key], f"key {key} out of order"
        last[key] = (v, event_id)
    assert all(v == 10 for v, _ in last.values())


async def test_nothing_is_lost_when_the_listener_is_killed(pg_dsn: str, sa_url: str) -> None:
    create_tables(pg_dsn)
    router = effects_router()
    await install(sa_url, router)
    # A long sweep interval: recovery must come from the reconnect catch-up, not the sweep.
    async with running(make_settings(sa_url, sweep_interval=60), router) as daemon:
        sample = daemon.metrics.registry.get_sample_value

        def connected() -> bool:
            return sample("pgreact_listener_connected") == 1

        kills = 0
        for i in range(10):
            sql(
                pg_dsn,
                "INSERT INTO source SELECT g, g FROM generate_series(%s::int, %s::int) g",
                [i * 100 + 1, i * 100 + 100],
            )
            if i % 3 == 1:
                await wait_until(connected, message="listener connected")
                sql(
                    pg_dsn,
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE application_name = 'pgreact-listener'",
                )
                kills += 1
                await wait_until(
                    lambda k=kills: (sample("pgreact_listener_reconnects_total") or 0) >= k,
                    timeout=5,
                    message=f"reconnect #{kills}",
                )
        await wait_until(lambda: effect_counts(pg_dsn)[0] == 2000, message="all effects")
        reconnects = sample("pgreact_listener_reconnects_total")
        assert reconnects is not None and reconnects >= 3
    assert effect_counts(pg_dsn, "single") == (1000, 1000)
    assert effect_counts(pg_dsn, "batch") == (1000, 1000)


async def test_on_notify_survives_bad_payloads(pg_dsn: str, sa_url: str) -> None:
    create_tables(pg_dsn)
    router = effects_router()
    got: list[Notification] = []

    @router.on_notify("cache_invalidation", name="invalidate")
    async def invalidate(note: Notification) -> None:
        if not note.payload.isdigit():
            raise ValueError(f"bad payload {note.payload!r}")
        got.append(note)

    await install(sa_url, router)
    async with running(make_settings(sa_url), router) as daemon:
        sample = daemon.metrics.registry.get_sample_value
        # Plain NOTIFY is at-most-once: nothing is delivered before the listener is up.
        await wait_until(lambda: sample("pgreact_listener_connected") == 1, message="listening")
        for payload in ["1", "garbage", "", "2", "\u00e9\u00e9", "3"]:
            sql(pg_dsn, "SELECT pg_notify('cache_invalidation', %s)", [payload])
        await wait_until(lambda: len(got) == 3, message="three good notifications")
        await wait_until(
            lambda: (
                sample("pgreact_events_handled_total", {"handler": "invalidate", "outcome": "dead"})
                == 3
            ),
            message="three failures counted",
        )
        assert (
            sample("pgreact_notifications_received_total", {"channel": "cache_invalidation"}) == 6
        )
        # Durable handlers still work after the bad payloads.
        sql(pg_dsn, "INSERT INTO source VALUES (1, 1)")
        await wait_until(lambda: effect_counts(pg_dsn)[0] == 2, message="durable effects")
    assert [n.payload for n in got] == ["1", "2", "3"]
    assert all(n.channel == "cache_invalidation" and n.pid > 0 for n in got)


async def test_an_on_notify_handler_raising_system_exit_does_not_stop_the_daemon(
    pg_dsn: str, sa_url: str
) -> None:
    create_tables(pg_dsn)
    router = effects_router()
    got: list[str] = []

    @router.on_notify("cache_invalidation", name="invalidate")
    async def invalidate(note: Notification) -> None:
        if note.payload == "exit":
            raise SystemExit(1)
        if note.payload == "interrupt":
            raise KeyboardInterrupt
        got.append(note.payload)

    await install(sa_url, router)
    async with running(make_settings(sa_url), router) as daemon:
        sample = daemon.metrics.registry.get_sample_value
        await wait_until(lambda: sample("pgreact_listener_connected") == 1, message="listening")
        for payload in ["exit", "interrupt", "1"]:
            sql(pg_dsn, "SELECT pg_notify('cache_invalidation', %s)", [payload])
        await wait_until(lambda: got == ["1"], message="the notification after them")
        failed = {"handler": "invalidate", "outcome": "dead"}
        assert sample("pgreact_events_handled_total", failed) == 2
        sql(pg_dsn, "INSERT INTO source VALUES (1, 1)")
        await wait_until(lambda: effect_counts(pg_dsn)[0] == 2, message="durable effects")


async def test_a_crash_suspect_runs_while_other_handlers_claim_beside_it(
    pg_dsn: str, sa_url: str
) -> None:
    """One crash suspect may be in flight per process. Every sweep wakes the quiet handlers
    registered before its own, whose claims take and free that slot: the suspect's handler,
    refused meanwhile, must be woken again to claim it (a version that did not stranded it
    for good whenever its claim lost that race)."""
    create_tables(pg_dsn)
    router = Router()
    handled: list[str] = []

    async def note(event: Event, _session: AsyncSession) -> None:
        handled.append(event.table)

    for name in [f"quiet{i}" for i in range(6)] + ["suspect"]:
        router.on("source", name=name)(note)
    await install(sa_url, router)
    sql(pg_dsn, "INSERT INTO source VALUES (1, 1)")
    sql(pg_dsn, "DELETE FROM pgreact.queue WHERE handler <> 'suspect'")
    sql(
        pg_dsn,
        "UPDATE pgreact.queue SET crashed = true, attempts = 1, last_error = 'claim abandoned'",
    )
    async with running(make_settings(sa_url, sweep_interval=0.2), router):
        await wait_until(
            lambda: queue_state(pg_dsn)["live"] == 0, timeout=5, message="the suspect handled"
        )
    assert handled == ["public.source"]


async def misuse(how: str, session: AsyncSession) -> None:
    """What a handler must not do to pgreact's transaction."""
    if how == "commit":
        await session.commit()
    elif how == "close":
        async with session:  # closes the session on the way out
            pass
    elif how == "rollback through the connection":
        await (await session.connection()).rollback()


@pytest.mark.parametrize("how", ["commit", "close", "rollback through the connection"])
async def test_a_handler_that_ends_the_transaction_fails_loudly_and_nothing_is_doubled(
    pg_dsn: str, sa_url: str, how: str
) -> None:
    create_tables(pg_dsn)
    router = Router()

    @router.on("source", name="one")
    async def one(event: Event, session: AsyncSession) -> None:
        await session.execute(EFFECT, effect_row("one", event))
        if event.key == "2":
            await misuse(how, session)

    await install(sa_url, router)
    sql(pg_dsn, "INSERT INTO source SELECT g, g FROM generate_series(1, 3) g")  # one claim
    async with running(make_settings(sa_url, max_attempts=1), router):
        await wait_until(lambda: queue_state(pg_dsn)["live"] == 0, message="all settled")
    # 2 is dead, without its write; 1 and 3, which shared its transaction, commit once.
    assert sql(pg_dsn, "SELECT k, count(*) FROM effects GROUP BY k ORDER BY k") == [
        ("1", 1),
        ("3", 1),
    ]
    assert sql(pg_dsn, "SELECT row_key FROM pgreact.queue WHERE dead_at IS NOT NULL") == [("2",)]
    (error,) = sql(pg_dsn, "SELECT last_error FROM pgreact.queue")[0]
    assert "HandlerMisuse" in error and ("must not" in error or "transaction ended" in error)


async def test_failures_whose_transaction_a_handler_ended_are_still_recorded(
    pg_dsn: str, sa_url: str
) -> None:
    """Only failures to commit, and the commit refused (a handler ended the transaction without
    sending a statement): they are recorded on their own, so the events still spend their
    attempts and end dead, instead of being given back and failing forever."""
    create_tables(pg_dsn)
    router = Router()

    @router.on("source", name="one")
    async def one(event: Event, session: AsyncSession) -> None:
        assert isinstance(session.bind, AsyncConnection)
        await session.bind.rollback()
        raise RuntimeError(f"{event.key} after ending the transaction")

    await install(sa_url, router)
    sql(pg_dsn, "INSERT INTO source SELECT g, g FROM generate_series(1, 2) g")
    async with running(make_settings(sa_url, max_attempts=2), router):
        await wait_until(lambda: queue_state(pg_dsn)["dead"] == 2, message="both dead")
    assert sql(pg_dsn, "SELECT DISTINCT attempts FROM pgreact.queue") == [(2,)]


async def test_copy_rows_commits_with_the_batch(pg_dsn: str, sa_url: str) -> None:
    from pgreact.copy import copy_rows

    create_tables(pg_dsn)
    router = Router()
    fail_once = {"77"}

    @router.on_batch("source", name="copier", max_size=200)
    async def copier(events: Sequence[Event], session: AsyncSession) -> None:
        rows = [("copier", e.id, e.key, e.op, (e.new or {}).get("v"), e.attempt) for e in events]
        await copy_rows(
            session, "public.effects", ["handler", "event_id", "k", "op", "v", "attempt"], rows
        )
        if any(e.key in fail_once for e in events):
            fail_once.clear()
            raise RuntimeError("after the COPY: it must roll back with the batch")

    await install(sa_url, router)
    async with running(make_settings(sa_url), router):
        sql(pg_dsn, "INSERT INTO source SELECT g, g FROM generate_series(1, 500) g")
        await wait_until(lambda: effect_counts(pg_dsn)[0] >= 500, message="copied")
        await wait_until(lambda: queue_state(pg_dsn)["live"] == 0, message="acked")
    assert effect_counts(pg_dsn) == (500, 500)


async def test_doorbell_rings_once_until_a_consumer_rearms_it(pg_dsn: str, sa_url: str) -> None:
    import psycopg

    create_tables(pg_dsn)
    router = effects_router()
    await install(sa_url, router)
    with psycopg.connect(pg_dsn, autocommit=True) as listener:
        listener.execute("LISTEN pgreact_events")
        for i in range(50):  # fifty writer transactions, no consumer running
            sql(pg_dsn, "INSERT INTO source VALUES (%s, 0)", [i])
        rings = list(listener.notifies(timeout=0.5))
        assert len(rings) == 1  # the first writer rang; the other 49 only read the bell
        assert sql(pg_dsn, "SELECT armed FROM pgreact.doorbell") == [(False,)]
        async with running(make_settings(sa_url), router):
            await wait_until(lambda: effect_counts(pg_dsn)[0] == 100, message="drained")
            # Idle again: the consumer re-armed the bell, so the next change rings at once.
            await wait_until(
                lambda: sql(pg_dsn, "SELECT armed FROM pgreact.doorbell") == [(True,)],
                message="re-armed",
            )
            sql(pg_dsn, "INSERT INTO source VALUES (1000, 0)")
            await wait_until(lambda: effect_counts(pg_dsn)[0] == 102, timeout=2, message="rang")


async def test_a_notify_storm_costs_a_bounded_number_of_claims(
    pg_dsn: str, sa_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Anyone who may connect can NOTIFY pgreact's channel. A 2 s storm (one NOTIFY per
    transaction, as fast as one connection sends them) against an idle daemon with two
    handlers: a few claims a second, not one per notification. A real change still goes
    through at once after it."""
    import psycopg

    from pgreact.dispatcher import QUIET_AFTER_EMPTY
    from pgreact.store import Store

    create_tables(pg_dsn)
    router = effects_router()
    await install(sa_url, router)
    claims: list[str] = []
    claim = Store.claim

    async def counted(
        self: Store, conn: AsyncConnection, handler: str, *args: Any, **kwargs: Any
    ) -> Any:
        claims.append(handler)
        return await claim(self, conn, handler, *args, **kwargs)

    monkeypatch.setattr(Store, "claim", counted)
    # No sweep during the test: only notifications wake the handlers.
    async with running(make_settings(sa_url, sweep_interval=60.0), router):
        sql(pg_dsn, "INSERT INTO source VALUES (1, 1)")
        await wait_until(lambda: effect_counts(pg_dsn)[0] == 2, message="first change")
        await anyio.sleep(0.5)  # idle: the doorbell re-armed

        def storm(seconds: float) -> int:
            sent = 0
            with psycopg.connect(pg_dsn, autocommit=True) as conn:
                deadline = time.monotonic() + seconds
                while time.monotonic() < deadline:
                    conn.execute("NOTIFY pgreact_events, 'public.source'")
                    sent += 1
            return sent

        before, began = len(claims), time.monotonic()
        sent = await anyio.to_thread.run_sync(storm, 2.0)
        await anyio.sleep(0.5)  # the last wake-ups held back
        during, took = len(claims) - before, time.monotonic() - began
        sql(pg_dsn, "INSERT INTO source VALUES (2, 2)")
        await wait_until(lambda: effect_counts(pg_dsn)[0] == 4, message="a change after it")
    assert sent > 500, f"only {sent} notifications: not a storm"
    # Two handlers: at most one claim each per quiet interval (0.2 s), and a few more. (Before:
    # ~1,000 claims for ~3,000 notifications.)
    bound = 2 * (took / QUIET_AFTER_EMPTY + 6)  # + the claims at each window's edge
    assert during <= bound, f"{during} claims for {sent} notifications in {took:.1f} s"
