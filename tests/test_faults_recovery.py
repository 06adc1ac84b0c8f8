"""Faults the daemon has to ride out rather than reconnect through: poison events, a server with
no connection to spare, a listener pointed at a server in recovery. Counted like
tests/test_faults.py (lost, duplicated, out of order against the source table), for both
drivers; ``make chaos`` runs them longer (PGREACT_CHAOS_SCALE)."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from statistics import median
from typing import Any

import anyio
import httpx
import pytest
import structlog
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

from pgreact import Event, Router
from pgreact.devserver import EmbeddedPostgres
from pgreact.installer import wake_channel
from pgreact.listeners import backend_for
from pgreact.runtime import Daemon
from pgreact.store import Store
from tests.conftest import TestServer, to_sa_url
from tests.faults.harness import HANDLERS, SCALE, assert_clean, drained, prepared
from tests.faults.hog import ConnectionHog
from tests.faults.standby import HotStandby
from tests.faults.workload import POISON, Workload, recovery_time, report, verdict
from tests.handlers.common import EFFECT, effect_row
from tests.support import CountingBackend, make_settings, running, sql, wait_until

pytestmark = pytest.mark.anyio


# -- 9: poison events --------------------------------------------------------------------------


class PoisonError(Exception):
    pass


class PoisonHandlers:
    """The two effect handlers, refusing every row whose payload is 'poison' until fixed.
    ``clean_calls`` counts, per handler, the calls each clean event was part of."""

    def __init__(self) -> None:
        self.fixed = False
        self.clean_calls: Counter[str] = Counter()

    def check(self, handler: str, event: Event) -> None:
        image = event.new or event.old or {}
        if image.get("payload") != POISON:
            self.clean_calls[handler] += 1
        elif not self.fixed:
            raise PoisonError(f"cannot handle row {event.key}")

    def router(self) -> Router:
        router = Router()

        @router.on("source", name="single")
        async def single(event: Event, session: AsyncSession) -> None:
            self.check("single", event)
            await session.execute(EFFECT, effect_row("single", event))

        @router.on_batch("public.source", name="batch", max_size=BATCH_MAX)
        async def batch(events: Sequence[Event], session: AsyncSession) -> None:
            for event in events:
                self.check("batch", event)
            await session.execute(EFFECT, [effect_row("batch", e) for e in events])

        return router


BURST_BASE = 10**9  # burst keys: above the workload's, below the probes'
MAX_ATTEMPTS = 3
BATCH_MAX = 50
ROUNDS = 12  # poisoned bursts, each followed by a clean one
BURST_ROWS = round(2400 * SCALE)  # most of a second in CI: shorter bursts are start and tail
# Throughput with 1 % poison over clean, below which the case fails. Where it sits, measured
# with this estimator (2,400-row bursts, median of the rounds; both drivers, on a 2-core machine
# shared with other test runs): with no poison at all 0.89-1.09 (nine rounds) and 0.91-1.04
# (twelve); with 1 % poison 0.87-0.99; with the poison path slowed on purpose (the batch's
# blame ignored, bisection by halves, a transaction per step) 0.52-0.60.
POISON_FLOOR = 0.75


class Bursts:
    """Measures how fast each handler gets through a burst of new rows committed at once."""

    def __init__(self, dsn: str, daemon: Daemon, rows: int, handlers: PoisonHandlers) -> None:
        self.dsn = dsn
        self.daemon = daemon
        self.rows = rows
        self.handlers = handlers
        self.number = 0
        # Per handler, calls of clean events beyond one each, and poison rows, over the bursts.
        self.reruns: Counter[str] = Counter()
        self.poisoned = 0

    def _count(self, handler: str, outcome: str) -> float:
        sample = self.daemon.metrics.registry.get_sample_value
        value = sample("pgreact_events_handled_total", {"handler": handler, "outcome": outcome})
        return value or 0.0

    async def run(self, poison_every: int = 0) -> dict[str, float]:
        """Commit one burst (every ``poison_every``-th row poison); return, per handler, the
        rate (events/s) at which its clean events were handled. Returns once the poison rows
        are dead-lettered too, so the next burst starts clean."""
        first = BURST_BASE + self.number * self.rows
        self.number += 1
        payload = (
            f"CASE WHEN g % {poison_every} = 0 THEN '{POISON}' END" if poison_every else "NULL"
        )
        last = first + self.rows - 1
        poisoned = last // poison_every - (first - 1) // poison_every if poison_every else 0
        clean = self.rows - poisoned
        ok = {h: self._count(h, "ok") for h in HANDLERS}
        dead = {h: self._count(h, "dead") for h in HANDLERS}
        calls = dict(self.handlers.clean_calls)
        sql(
            self.dsn,
            f"INSERT INTO source (id, v, payload) SELECT g, 0, {payload} "
            f"FROM generate_series({first}, {last}) g",
        )
        started = time.monotonic()
        elapsed: dict[str, float] = {}

        def clean_done() -> bool:
            for h in HANDLERS:
                if h not in elapsed and self._count(h, "ok") - ok[h] >= clean:
                    elapsed[h] = time.monotonic() - started
            return len(elapsed) == len(HANDLERS)

        await wait_until(clean_done, timeout=60, interval=0.005, message="the clean events")
        await wait_until(
            lambda: all(self._count(h, "dead") - dead[h] >= poisoned for h in HANDLERS),
            timeout=30 * SCALE,
            message=f"{poisoned} poison rows dead-lettered",
        )
        for h in HANDLERS:
            self.reruns[h] += self.handlers.clean_calls[h] - calls.get(h, 0) - clean
        self.poisoned += poisoned
        return {h: clean / elapsed[h] for h in HANDLERS}


def poison_changes(dsn: str) -> int:
    """Changes of poison rows: each is one dead letter per handler until the handler is fixed."""
    (row,) = sql(
        dsn, "SELECT count(*) + coalesce(sum(v), 0) FROM source WHERE payload = %s", [POISON]
    )
    return int(row[0])


async def dead_retry_all(sa_url: str) -> int:
    """What `pgreact dead retry --all` does: requeue every dead letter, ring the wake channel."""
    engine = create_async_engine(sa_url)
    try:
        async with engine.connect() as conn:
            count = await Store("pgreact").dead_retry(conn, None)
            await conn.execute(
                text("SELECT pg_notify(:channel, '')"), {"channel": wake_channel("pgreact")}
            )
            await conn.commit()
        return count
    finally:
        await engine.dispose()


async def test_poison_is_dead_lettered_without_slowing_the_rest_and_retried_once_fixed(
    pg_server: TestServer, driver: str
) -> None:
    handlers = PoisonHandlers()
    dsn, sa_url, router = await prepared(pg_server, driver, handlers.router())
    async with running(make_settings(sa_url, max_attempts=MAX_ATTEMPTS), router) as daemon:
        # Throughput: bursts with 1 % poison, each between two bursts without (same size, same
        # daemon), compared with the mean of its two neighbours, which cancels the machine's
        # drift; the median of the rounds, which damps its noise.
        bursts = Bursts(dsn, daemon, rows=BURST_ROWS, handlers=handlers)
        await bursts.run()  # warm-up: pooled connections, prepared plans
        clean, poisoned = [await bursts.run()], []
        for _ in range(ROUNDS):
            poisoned.append(await bursts.run(poison_every=100))
            clean.append(await bursts.run())
        ratio = {
            h: median(
                p[h] / ((before[h] + after[h]) / 2)
                for p, before, after in zip(poisoned, clean, clean[1:], strict=False)
            )
            for h in HANDLERS
        }
        rates = {h: (median(b[h] for b in clean), median(b[h] for b in poisoned)) for h in HANDLERS}
        # Then poison keeps arriving while changes flow, and poison rows get updated: each
        # change of one is a dead letter of its own, after the previous one (per-key order).
        workload = Workload(dsn, rate=400, poison_every=50)
        await workload.run(1.5 * SCALE)
        dead = poison_changes(dsn)
        await wait_until(
            lambda: all(verdict(dsn, h).dead == dead for h in HANDLERS),
            timeout=60 * SCALE,
            message=f"{dead} dead letters per handler",
        )
        before = await drained(dsn)
        attempts = sql(dsn, "SELECT DISTINCT attempts FROM pgreact.queue WHERE dead_at IS NOT NULL")
        # The handler is fixed and redeployed; an operator requeues the dead letters.
        handlers.fixed = True
        retried_at = time.monotonic()
        assert await dead_retry_all(sa_url) == dead * len(HANDLERS)
        await wait_until(
            lambda: all(verdict(dsn, h).dead == 0 for h in HANDLERS), message="requeued"
        )
        verdicts = await drained(dsn)
        recovery = time.monotonic() - retried_at
    for v in verdicts:
        clean_rate, poisoned_rate = rates[v.handler]
        note = (
            f"throughput with 1% poison {ratio[v.handler]:.2f}x clean (median of {ROUNDS} "
            f"rounds; {poisoned_rate:.0f} vs {clean_rate:.0f} ev/s; clean events re-run "
            f"{bursts.reruns[v.handler]} times for {bursts.poisoned} poison rows); {dead} dead "
            "letters, then retried"
        )
        report("poison, dead retry", driver, [v], recovery, note)
    assert attempts == [(MAX_ATTEMPTS,)]
    # What the poison costs the other events, counted rather than timed (a timing this short
    # cannot resolve a few per cent). A poison handler raises before writing: an ``on`` group
    # keeps the calls before it and runs none twice; an ``on_batch`` call stopped at the poison
    # runs once more without it, so each poison row re-runs at most a batch's other events.
    assert bursts.poisoned > 0
    assert bursts.reruns["single"] == 0, bursts.reruns
    assert 0 < bursts.reruns["batch"] <= bursts.poisoned * (BATCH_MAX - 1), bursts.reruns
    for v in before:  # while poisoned: every poison change dead, nothing else missing
        assert v.dead == dead > 0 and v.lost == v.duplicates == v.out_of_order == 0, v
    assert_clean(verdicts)  # after the retry: each retried event handled exactly once, in order
    for v in verdicts:
        assert v.dead == 0 and v.effects == v.changes, v
    # The criterion is 0.9, but a burst of a second on a shared 2-core machine reads anywhere
    # in 0.89-1.09 against itself (POISON_FLOOR): CI holds the line below that noise, where a
    # stall, a retry storm or a poison search that redoes work falls; the soak's longer bursts
    # report the figure of every run.
    assert min(ratio.values()) >= POISON_FLOOR, ratio


# -- 12: no connection to spare ---------------------------------------------------------------

MAX_CONNECTIONS = 30


async def test_exhausted_connections_leave_the_listener_up_and_drain_after_release(
    private_pg_server: TestServer, driver: str
) -> None:
    server = private_pg_server
    sql(server.dsn("postgres"), f"ALTER SYSTEM SET max_connections = {MAX_CONNECTIONS}")
    await anyio.to_thread.run_sync(server.restart)
    dsn, sa_url, router = await prepared(server, driver)
    workload = Workload(dsn, rate=300)
    hog = ConnectionHog(dsn)
    exhausted_for = 2 * SCALE
    async with running(make_settings(sa_url), router) as daemon, httpx.AsyncClient() as http:
        sample = daemon.metrics.registry.get_sample_value

        async def readyz() -> tuple[int, dict[str, str]]:
            response = await http.get(f"http://127.0.0.1:{daemon.http_port}/readyz", timeout=10)
            return response.status_code, response.json()["down"]

        def listener_pids(query: Callable[[str], list[tuple[Any, ...]]]) -> list[int]:
            rows = query(
                "SELECT pid FROM pg_stat_activity WHERE application_name = 'pgreact-listener'"
            )
            return [r[0] for r in rows]

        await wait_until(lambda: sample("pgreact_listener_connected") == 1, message="listener")
        pids = listener_pids(lambda q: sql(dsn, q))
        seen: list[tuple[int, dict[str, str], float | None]] = []
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(workload.run, 4 + exhausted_for)
                await anyio.sleep(1)
                # Another client takes every slot; the daemon's pooled connections are dropped
                # (a failover, an idle timeout) and cannot be replaced. Writers already connected
                # keep writing.
                held = await anyio.to_thread.run_sync(lambda: hog.exhaust(evict="pgreact"))
                pending_before = hog.query("SELECT count(*) FROM pgreact.queue")[0][0]
                until = time.monotonic() + exhausted_for
                while time.monotonic() < until:
                    status, down = await readyz()
                    seen.append((status, down, sample("pgreact_listener_connected")))
                    await anyio.sleep(0.2)
                pending_after, last_id = hog.query("SELECT count(*), max(id) FROM pgreact.queue")[0]
                pids_during = listener_pids(hog.query)
                hog.release()
                released_at = time.monotonic()
                await wait_until(
                    lambda: _ready(readyz), timeout=10, interval=0.1, message="/readyz 200"
                )
                ready_after = time.monotonic() - released_at
                recovery = await recovery_time(dsn, "single")
                # Everything committed before the release, claims stranded by the dropped
                # connections included, is handled within seconds.
                await wait_until(
                    lambda: not sql(dsn, "SELECT 1 FROM pgreact.queue WHERE id <= %s", [last_id]),
                    timeout=30,
                    interval=0.1,
                    message="the backlog of the exhaustion",
                )
                backlog_drained = time.monotonic() - released_at
        finally:
            hog.release()
        verdicts = await drained(dsn)
        reconnects = sample("pgreact_listener_reconnects_total")
    report(
        "connections exhausted",
        driver,
        verdicts,
        recovery,
        f"{held} slots held {exhausted_for:g} s; backlog {pending_before}->{pending_after}; "
        f"after release: /readyz 200 in {ready_after:.2f}s, backlog drained in "
        f"{backlog_drained:.2f}s",
    )
    assert_clean(verdicts)
    assert held > 0
    assert pending_after > pending_before  # the fault was real: nothing drained meanwhile
    assert seen and all(
        status == 503 and "database" in down and "listener" not in down and connected == 1
        for status, down, connected in seen
    ), seen
    assert pids_during == pids and len(pids) == 1  # the same LISTEN session throughout
    assert reconnects == 0
    assert ready_after < 5, ready_after
    # The probe queues behind the backlog built while exhausted (capture order); that backlog
    # grows with the time spent exhausted.
    assert recovery < 3 + exhausted_for, recovery
    assert backlog_drained < 3 + exhausted_for, backlog_drained


async def _ready(readyz: Callable[[], Awaitable[tuple[int, dict[str, str]]]]) -> bool:
    return (await readyz())[0] == 200


# -- 14: the listener's server is a hot standby ------------------------------------------------


def _embedded(server: TestServer) -> EmbeddedPostgres:
    assert isinstance(server.control, EmbeddedPostgres), "needs an embedded server"
    return server.control


async def test_standby_leaves_the_daemon_unready_and_quiet_until_promoted(
    private_pg_server: TestServer, driver: str
) -> None:
    primary_dsn, _, router = await prepared(private_pg_server, driver)
    database = primary_dsn.rsplit("/", 1)[1]
    standby_for = 3 * SCALE
    standby = await anyio.to_thread.run_sync(HotStandby, _embedded(private_pg_server))
    with standby, structlog.testing.capture_logs() as logs:
        await anyio.to_thread.run_sync(standby.start)
        dsn = standby.dsn(database)
        # The daemon's database is failing over: its URLs name the server that is a standby
        # until it is promoted. Meanwhile changes are committed on the old primary and
        # replicated (queue rows included).
        settings = make_settings(to_sa_url(dsn, driver))
        workload = Workload(primary_dsn, rate=300)
        backend = CountingBackend(backend_for(driver))
        async with (
            running(settings, router, listener_backend=backend) as daemon,
            httpx.AsyncClient() as http,
        ):
            sample = daemon.metrics.registry.get_sample_value

            async def readyz() -> tuple[int, dict[str, str]]:
                response = await http.get(f"http://127.0.0.1:{daemon.http_port}/readyz", timeout=10)
                return response.status_code, response.json()["down"]

            seen: list[tuple[int, dict[str, str], float | None]] = []
            started_logs, started_attempts = len(logs), backend.attempts
            async with anyio.create_task_group() as tg:
                tg.start_soon(workload.run, standby_for)
                until = time.monotonic() + standby_for
                while time.monotonic() < until:
                    status, down = await readyz()
                    seen.append((status, down, sample("pgreact_listener_connected")))
                    await anyio.sleep(0.25)
            await wait_until(standby.caught_up, message="the standby to replay everything")
            standby_logs = logs[started_logs:]
            attempts = backend.attempts - started_attempts
            handled_meanwhile = sql(dsn, "SELECT count(*) FROM effects")[0][0]
            await anyio.to_thread.run_sync(standby.promote)
            promoted_at = time.monotonic()
            recovery = 0.0

            async def probe() -> None:
                nonlocal recovery
                # The new primary takes writes at once; the probe queues behind the
                # replicated backlog.
                recovery = await recovery_time(dsn, "single")

            async with anyio.create_task_group() as tg:
                tg.start_soon(probe)
                await wait_until(lambda: _ready(readyz), timeout=10, message="/readyz 200")
                ready_after = time.monotonic() - promoted_at
            workload.dsn = dsn
            await workload.run(1.5 * SCALE)
            verdicts = await drained(dsn)
    # What an operator sees at the default level (debug lines may not even be captured: the
    # level filter is global, and another test may have configured it).
    shown = [e for e in standby_logs if e["log_level"] != "debug"]
    failures = [e for e in shown if e["event"].startswith("listener connect")]
    report(
        "listener on a standby, promoted",
        driver,
        verdicts,
        recovery,
        f"{standby_for:g} s as a standby: {attempts} LISTEN attempts, {len(shown)} log "
        f"lines at info or above; /readyz 200 {ready_after:.2f}s after promotion",
    )
    assert_clean(verdicts)
    assert handled_meanwhile == 0
    assert seen and all(
        status == 503 and "listener" in down and connected == 0 for status, down, connected in seen
    ), seen
    # ... and says why, in the log and in /readyz.
    assert any("cannot execute LISTEN during recovery" in e.get("error", "") for e in failures)
    assert any("cannot execute LISTEN during recovery" in down["listener"] for _, down, _ in seen)
    # Retried all along, with back-off (at most one attempt per 0.5 s once it reaches its
    # cap of 1 s), and logged once per distinct message instead of once per attempt.
    assert 2 <= attempts <= standby_for / 0.5 + 4, attempts
    assert 1 <= len(failures) <= 1 + standby_for // 30, failures
    assert len(shown) <= 8 * (1 + standby_for // 30), [(e["event"], e.get("error")) for e in shown]
    assert ready_after < 5, ready_after
    # The probe queues behind the replicated backlog, which grows with the time as a standby.
    assert recovery < 2 + standby_for, recovery
