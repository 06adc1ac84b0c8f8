"""``python -m benchmarks.run``: pgreact's end-to-end benchmark (``make bench``).

What it measures (each ``--runs`` times; median and min-max are reported):

1. **Throughput**, for a single-event handler (one INSERT per event through the session) and two
   batch handlers (one executemany per batch; one COPY per batch with ``copy_rows``), each on
   asyncpg and psycopg, and with ``--pgbouncer`` also with the write engine going through a
   transaction-mode PgBouncer (``PGREACT_POOLER=pgbouncer-transaction``, the listener direct):
   - *drain*: ``--events`` changes are written by 4 writers (10 rows per INSERT) while no daemon
     runs; a daemon then starts and the clock runs from "started" until the last event's
     transaction has committed;
   - *live*: the daemon runs while 4 writers write ``--live-events`` changes as fast as they can;
     the clock runs from the first write to the last event handled.
   Daemon CPU (its own ``getrusage``) and server CPU (all PostgreSQL processes, from /proc) per
   1000 events, and the daemon's peak RSS, come with each number.
2. **Latency** commit → handled at a steady ``--latency-rate`` (small autocommit transactions
   from a few writers), three views: writer-observed commit → handler's COMMIT returned; the
   source row's ``clock_timestamp()`` → same; pgreact's own ``pgreact_event_lag_seconds``.
3. **Writer cost** of the capture trigger: pgbench single-row INSERTs with 1/4/16 clients, table
   without vs with the trigger (one handler subscribed, no daemon running).
4. **Baselines**: a bare asyncpg loop draining an equivalent plain job table (claim 100 with
   ``FOR UPDATE SKIP LOCKED``, insert the effects, delete the jobs, commit), per-row INSERTs,
   executemany and COPY, against which the drain numbers are given as per-run-pair ratios; the
   same loop with no handler at all (claim, delete, commit; batch 100 and 1000), the ceiling of
   any SKIP LOCKED drain; and, when ``pgqueuer`` is installed (``pip install 'pgreact[bench]'``),
   one PgQueuer consumer draining the same jobs with the same one-INSERT handler, against which
   the single-event drain is given as a ratio.

Every run checks that each change produced exactly one effect (count and distinct) and that the
queue is empty; any loss or duplicate fails the whole invocation (exit 1) after printing.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import unquote, urlsplit

import anyio
import orjson
import psycopg
from sqlalchemy.ext.asyncio import create_async_engine

from benchmarks import writers
from benchmarks.pgbench import run_pgbench
from benchmarks.report import (
    Row,
    Summary,
    histogram_quantile,
    percentile,
    ratios,
    render_table,
)
from benchmarks.server import Server, cpu_stall_us, machine_info, open_server
from benchmarks.worker import (
    HAVE_PGQUEUER,
    BaselineJob,
    BaselineStyle,
    BenchFailure,
    DaemonJob,
    Handle,
    Job,
    Measurement,
    PgQueuerJob,
    log_warnings,
    start,
    warm_up,
)
from benchmarks.workload import (
    FILL_JOBS_SQL,
    JOBS_SQL,
    KINDS,
    PAYLOADS_SQL,
    PGQUEUER_ENTRYPOINT,
    SCHEMA,
    TABLES_SQL,
    Kind,
    fill_bare_jobs_sql,
    make_router,
)
from pgreact import installer

if TYPE_CHECKING:
    from tests.pgbouncer_core import PgBouncer

DRIVERS = ("asyncpg", "psycopg")
# Without --latency-rate, latency is measured at no more than this share of the single
# handler's drain rate: small transactions cost the daemon far more per event than a backlog.
LATENCY_SHARE = 0.25
SECTIONS = ("drain", "live", "latency", "writers")
# The bare asyncpg loop's style for each handler kind: the same write, without pgreact.
BASELINE_STYLE: dict[Kind, BaselineStyle] = {
    "single": "per-row",
    "batch": "executemany",
    "copy": "copy",
}
POOLED = "pgbouncer-transaction"
PgBouncerChoice = Literal["auto", "yes", "no"]


@dataclass(frozen=True)
class Plan:
    runs: int = 3
    events: int = 5_000
    live_events: int = 2_500
    writers: int = 4
    rows_per_statement: int = 10
    batch_max_size: int = 100
    baseline_workers: int = 4
    latency_rate: float = 2500.0
    # Without an explicit --latency-rate, the rate is capped at LATENCY_SHARE of the single
    # handler's median drain rate: near capacity, "latency" only measures a growing backlog.
    latency_rate_capped: bool = True
    latency_seconds: float = 10.0
    latency_warmup: float = 1.0
    latency_writers: int = 4
    latency_rows_per_tx: int = 5
    pgbench_seconds: float = 2.0
    pgbench_transactions: int | None = None  # total per measurement instead of a duration
    pgbench_clients: tuple[int, ...] = (1, 4, 16)
    drivers: tuple[str, ...] = DRIVERS
    sections: tuple[str, ...] = SECTIONS
    settings: tuple[tuple[str, str], ...] = ()  # pgreact settings for the daemons (--set)
    # --ab: a second configuration measured right after the default one, pair by pair
    ab: tuple[tuple[str, str], ...] = ()
    # --pgbouncer: drain and live again with the write URL through a transaction-mode PgBouncer
    # (auto: when the pgbouncer binary is installed)
    pgbouncer: PgBouncerChoice = "auto"
    pgbouncer_pool_size: int = 20  # PgBouncer's default_pool_size: above the daemon's pool
    # the bare drain (claim, delete, commit; no handler): a larger backlog, it is fast
    bare_events: int = 50_000
    bare_batches: tuple[int, ...] = (100, 1000)
    # PgQueuer (when installed): jobs fetched per dequeue, and the pool its handler writes with
    # (pgreact's defaults: PGREACT_BATCH_SIZE 100, PGREACT_POOL_SIZE 10)
    pgqueuer_batch_size: int = 100
    pgqueuer_pool_size: int = 10

    def variants(self, *, pgbouncer: bool = False) -> list[Variant]:
        """The daemon configurations each scenario runs in, one after the other per run: the
        default, the --ab one, and (for drain and live) the PgBouncer one."""
        out = [Variant("", "", self.settings)]
        if self.ab:
            label = ",".join(f"{k}={v}" for k, v in self.ab)
            out.append(Variant(label, f" [{label}]", (*self.settings, *self.ab), db_suffix="_b"))
        if pgbouncer:
            out.append(
                Variant(
                    "pgbouncer",
                    " via pgbouncer",
                    (*self.settings, ("pooler", POOLED)),
                    db_suffix="_pgb",
                    pgbouncer=True,
                )
            )
        return out


@dataclass(frozen=True)
class Variant:
    label: str  # "" for the default configuration
    suffix: str  # appended to row names
    settings: tuple[tuple[str, str], ...]
    db_suffix: str = ""  # appended to scratch database names
    pgbouncer: bool = False  # write URL through PgBouncer, PGREACT_LISTEN_URL direct


QUICK = Plan(
    runs=1,
    events=300,
    live_events=300,
    latency_rate=300.0,
    latency_seconds=1.5,
    latency_warmup=0.3,
    pgbench_transactions=160,
    bare_events=3_000,
)


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass(frozen=True, slots=True)
class Check:
    """What a run left behind: every change must have exactly one effect, the queue empty."""

    sources: int
    effects: int
    distinct: int
    lost: int
    phantom: int
    leftover: int

    @property
    def duplicated(self) -> int:
        return self.effects - self.distinct

    def problems(self, expected: int) -> list[str]:
        out = []
        if self.sources != expected:
            out.append(f"{self.sources} source rows, expected {expected}")
        if self.lost:
            out.append(f"{self.lost} changes without an effect (lost)")
        if self.duplicated:
            out.append(f"{self.duplicated} duplicated effects")
        if self.phantom:
            out.append(f"{self.phantom} effects for rows that do not exist")
        if self.leftover:
            out.append(f"{self.leftover} rows left in the queue")
        return out


class Bench:
    def __init__(
        self,
        server: Server,
        plan: Plan,
        workdir: Path,
        profile: Path | None,
        bouncer: PgBouncer | None = None,
    ) -> None:
        self.server = server
        self.plan = plan
        self.bouncer = bouncer
        self.workdir = workdir
        self.profile = profile
        self.rows: dict[str, Row] = {}
        self.failures: list[str] = []
        self.notes: list[str] = []
        self.empty: dict[Kind, str] = {}
        self.loaded: dict[Kind, str] = {}
        self.loaded_base = ""
        self.loaded_bare = ""
        self.loaded_pgqueuer = ""
        self._pgbench_dbs: dict[str, str] = {}
        self._profilers: list[subprocess.Popen[bytes]] = []
        self.seconds: dict[str, float] = {}  # wall time spent per section, for tuning sizes

    # -- helpers ----------------------------------------------------------------------------

    def row(self, section: str, name: str, **params: Any) -> Row:
        if name not in self.rows:
            self.rows[name] = Row(section, name, params)
        return self.rows[name]

    def sql(self, database: str, statement: str) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.server.url(database), autocommit=True) as conn:
            cur = conn.execute(statement.encode())
            return cur.fetchall() if cur.description else []

    def check(self, database: str, name: str, expected: int, leftover_table: str) -> Check:
        (r,) = self.sql(
            database,
            f"""
            SELECT (SELECT count(*) FROM source),
                   (SELECT count(*) FROM effects),
                   (SELECT count(DISTINCT source_id) FROM effects),
                   (SELECT count(*) FROM source s
                     WHERE NOT EXISTS (SELECT 1 FROM effects e WHERE e.source_id = s.id)),
                   (SELECT count(*) FROM effects e
                     WHERE NOT EXISTS (SELECT 1 FROM source s WHERE s.id = e.source_id)),
                   (SELECT count(*) FROM {leftover_table})
            """,
        )
        check = Check(*(int(v) for v in r))
        row = self.rows.get(name)
        if row is not None:
            row.lost += check.lost + max(0, expected - check.sources)
            row.duplicated += check.duplicated
        if problems := check.problems(expected):
            message = f"{name}: " + "; ".join(problems)
            self.failures.append(message)
            _log(f"!!! EXACTLY-ONCE CHECK FAILED: {message}")
        return check

    def _log_path(self, name: str) -> str:
        return str(self.workdir / (name.replace(" ", "_") + ".log"))

    def _start(self, job: Job, name: str) -> Handle:
        handle = start(job)
        if self.profile is not None and handle.pid is not None:
            out = self.profile / (name.replace(" ", "_") + ".txt")
            self._profilers.append(
                subprocess.Popen(
                    [
                        _py_spy(),
                        *("record", "--pid", str(handle.pid), "--rate", "250"),
                        *("--format", "raw", "--output", str(out), "--nonblocking"),
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
            time.sleep(0.3)  # let py-spy attach before the work starts
        return handle

    def _finish(self, name: str, job: Job) -> None:
        if (n := log_warnings(job.log_path)) > 0:
            note = f"{name}: the measured process logged {n} warning(s), see {job.log_path}"
            if note not in self.notes:
                self.notes.append(note)

    def _timeout(self, events: int) -> float:
        return 120.0 + events / 50

    # -- preparation ------------------------------------------------------------------------

    def prepare(self) -> None:
        p = self.plan
        for kind in KINDS:
            db = self.server.create_db(f"empty_{kind}")
            self.sql(db, TABLES_SQL)
            anyio.run(self._install, db, kind)
            self.empty[kind] = db
        if "drain" in p.sections:
            for kind in KINDS:
                db = self.server.create_db(f"loaded_{kind}", template=self.empty[kind])
                result = self._write(db, p.events)
                self.sql(db, "ANALYZE")
                self.loaded[kind] = db
                self.notes.append(
                    f"preload for {kind}: {p.events:,} changes by {p.writers} writers, "
                    f"{p.rows_per_statement} rows per INSERT, capture trigger on: "
                    f"{result.rate:,.0f} rows/s"
                )
                _log(f"prepared {db}: {p.events} changes queued ({result.rate:,.0f} rows/s)")
            db = self.server.create_db("loaded_base")
            self.sql(db, TABLES_SQL + JOBS_SQL)
            self._write(db, p.events)
            self.sql(db, FILL_JOBS_SQL)
            self.sql(db, "ANALYZE")
            self.loaded_base = db
            db = self.server.create_db("loaded_bare")
            self.sql(db, TABLES_SQL + JOBS_SQL)
            self.sql(db, fill_bare_jobs_sql(p.bare_events))
            self.sql(db, "ANALYZE")
            self.loaded_bare = db
            if HAVE_PGQUEUER:
                db = self.server.create_db("loaded_pgqueuer")
                self.sql(db, TABLES_SQL)
                self._write(db, p.events)
                rate = anyio.run(self._enqueue_pgqueuer, db)
                self.sql(db, "ANALYZE")
                self.loaded_pgqueuer = db
                self.notes.append(
                    f"PgQueuer preload: {p.events:,} jobs enqueued by {p.writers} connections, "
                    f"{p.rows_per_statement} per Queries.enqueue call: {rate:,.0f} jobs/s"
                )
        if "writers" in p.sections:
            plain = self.server.create_db("pgbench_plain")
            self.sql(plain, TABLES_SQL)
            trig = self.server.create_db("pgbench_trigger", template=self.empty["single"])
            self._pgbench_dbs = {"plain": plain, "trigger": trig}

    async def _enqueue_pgqueuer(self, database: str) -> float:
        """Install PgQueuer's schema and enqueue one job per source row (payload: the row image
        as JSON), ``rows_per_statement`` jobs per batched ``Queries.enqueue`` call from
        ``writers`` connections, as the writers insert the rows pgreact captures."""
        import asyncpg
        from pgqueuer.db import AsyncpgDriver
        from pgqueuer.queries import Queries

        p = self.plan
        url = self.server.url(database)
        payloads = [str(r[0]).encode() for r in self.sql(database, PAYLOADS_SQL)]
        conns = [await asyncpg.connect(url) for _ in range(p.writers)]
        try:
            await Queries(AsyncpgDriver(conns[0])).install()
            chunks = [
                payloads[i : i + p.rows_per_statement]
                for i in range(0, len(payloads), p.rows_per_statement)
            ]
            chunks.reverse()  # popped from the end: enqueued in source order
            started = time.monotonic()

            async def enqueue(conn: Any) -> None:
                queries = Queries(AsyncpgDriver(conn))
                while chunks:
                    chunk = chunks.pop()
                    await queries.enqueue(
                        [PGQUEUER_ENTRYPOINT] * len(chunk), list(chunk), [0] * len(chunk)
                    )

            async with anyio.create_task_group() as tg:
                for conn in conns:
                    tg.start_soon(enqueue, conn)
            return len(payloads) / max(time.monotonic() - started, 1e-9)
        finally:
            for conn in conns:
                await conn.close()

    async def _install(self, database: str, kind: Kind) -> None:
        engine = create_async_engine(self.server.sa_url(database, "asyncpg"))
        try:
            await installer.install(engine, make_router(kind, self.plan.batch_max_size), SCHEMA)
        finally:
            await engine.dispose()

    def _write(self, database: str, count: int) -> writers.WriteResult:
        p = self.plan
        return anyio.run(
            lambda: writers.burst(
                self.server.url(database),
                1,
                count,
                writers=p.writers,
                rows_per_statement=p.rows_per_statement,
            )
        )

    def _job(
        self,
        name: str,
        db: str,
        kind: Kind,
        driver: str,
        expect: int,
        variant: Variant,
        **kw: Any,
    ) -> DaemonJob:
        url = self.server.sa_url(db, driver)
        if variant.pgbouncer:
            if self.bouncer is None:
                raise BenchFailure("a PgBouncer scenario without a running PgBouncer")
            # Writes through PgBouncer; the listener cannot go through transaction mode.
            kw.update(listen_url=url, pooler_pid=self.bouncer.process.pid)
            url = self.bouncer.via(url)
        return DaemonJob(
            url=url,
            kind=kind,
            expect=expect,
            log_path=self._log_path(name),
            server_pid=self.server.postmaster_pid,
            batch_max_size=self.plan.batch_max_size,
            overrides=dict(variant.settings),
            **kw,
        )

    # -- measurements -----------------------------------------------------------------------

    def _throughput(self, row: Row, m: Measurement, events: int, wall: float) -> float:
        rate = events / wall
        row.add("events_per_s", rate, "events/s")
        row.add("daemon_cpu_ms_per_1k", m.cpu_seconds * 1e6 / events, "ms")
        if m.server_cpu_seconds is not None:
            row.add("server_cpu_ms_per_1k", m.server_cpu_seconds * 1e6 / events, "ms")
        row.add("rss_peak_mb", m.rss_peak_mb, "MB")
        if m.pooler_cpu_seconds is not None:
            row.add("pgbouncer_cpu_ms_per_1k", m.pooler_cpu_seconds * 1e6 / events, "ms")
        _pressure(row, m.cpu_pressure)
        return rate

    def _drain(
        self, job: Job, name: str, row: Row, db: str, table: str
    ) -> tuple[Measurement, float]:
        """Run one drain of ``--events`` to completion, record it in ``row``, check that every
        event has exactly one effect and ``table`` is empty, and drop the run's database."""
        events = self.plan.events
        m = self._start(job, name).result(self._timeout(events))
        rate = self._throughput(row, m, events, m.wall_seconds)
        self.check(db, name, events, table)
        self._finish(name, job)
        self.server.drop_db(db)
        return m, rate

    def drain(self, run: int, kind: Kind, driver: str, variant: Variant) -> None:
        p = self.plan
        name = f"drain {kind} {driver}{variant.suffix}"
        row = self.row("throughput", name, **_params("drain", kind, driver, variant))
        db = self.server.create_db(
            f"r{run}_drain_{kind}_{driver}{variant.db_suffix}", template=self.loaded[kind]
        )
        job = self._job(name, db, kind, driver, p.events, variant)
        m, rate = self._drain(job, name, row, db, f"{SCHEMA}.queue")
        _log(f"  {name}: {rate:,.0f} events/s, {m.cpu_seconds * 1e6 / p.events:,.0f} ms CPU/1k")

    def baseline(self, run: int, style: BaselineStyle) -> None:
        p = self.plan
        name = f"drain baseline {style}"
        row = self.row("throughput", name, mode="drain", handler=f"baseline {style}")
        db = self.server.create_db(f"r{run}_base_{style}", template=self.loaded_base)
        job = BaselineJob(
            url=self.server.url(db),
            expect=p.events,
            log_path=self._log_path(name),
            style=style,
            server_pid=self.server.postmaster_pid,
            workers=p.baseline_workers,
            batch=p.batch_max_size,
        )
        _, rate = self._drain(job, name, row, db, "jobs")
        _log(f"  {name}: {rate:,.0f} events/s")

    def bare(self, run: int, batch: int) -> None:
        """The bare drain: claim ``batch`` with SKIP LOCKED, delete, commit; no handler."""
        p = self.plan
        name = f"drain bare batch {batch}"
        row = self.row("throughput", name, mode="drain", handler="bare (no handler)", batch=batch)
        db = self.server.create_db(f"r{run}_bare_{batch}", template=self.loaded_bare)
        job = BaselineJob(
            url=self.server.url(db),
            expect=p.bare_events,
            log_path=self._log_path(name),
            style="none",
            server_pid=self.server.postmaster_pid,
            workers=p.baseline_workers,
            batch=batch,
        )
        m = self._start(job, name).result(self._timeout(p.bare_events))
        rate = self._throughput(row, m, p.bare_events, m.wall_seconds)
        ((left,),) = self.sql(db, "SELECT count(*) FROM jobs")
        if left:
            row.lost += int(left)
            self.failures.append(f"{name}: {left} jobs left in the table")
        self._finish(name, job)
        self.server.drop_db(db)
        _log(f"  {name}: {rate:,.0f} events/s")

    def pgqueuer(self, run: int) -> None:
        """One PgQueuer consumer draining the same jobs; its handler does one INSERT."""
        p = self.plan
        name = "drain pgqueuer"
        row = self.row(
            "throughput",
            name,
            mode="drain",
            handler="pgqueuer (one INSERT per job)",
            version=_version("pgqueuer"),
            batch_size=p.pgqueuer_batch_size,
            pool_size=p.pgqueuer_pool_size,
        )
        db = self.server.create_db(f"r{run}_pgqueuer", template=self.loaded_pgqueuer)
        job = PgQueuerJob(
            url=self.server.url(db),
            expect=p.events,
            log_path=self._log_path(name),
            server_pid=self.server.postmaster_pid,
            batch_size=p.pgqueuer_batch_size,
            pool_size=p.pgqueuer_pool_size,
        )
        _, rate = self._drain(job, name, row, db, "pgqueuer")
        _log(f"  {name}: {rate:,.0f} events/s")

    def live(self, run: int, kind: Kind, driver: str, variant: Variant) -> None:
        p = self.plan
        name = f"live {kind} {driver}{variant.suffix}"
        row = self.row("throughput", name, **_params("live", kind, driver, variant))
        db = self.server.create_db(
            f"r{run}_live_{kind}_{driver}{variant.db_suffix}", template=self.empty[kind]
        )
        job = self._job(name, db, kind, driver, p.live_events, variant)
        handle = self._start(job, name)
        handle.ready()
        w = self._write(db, p.live_events)
        m = handle.result(self._timeout(p.live_events))
        rate = self._throughput(row, m, p.live_events, m.done_at - w.started)
        row.add("writer_rows_per_s", w.rate, "rows/s")
        self.check(db, name, p.live_events, f"{SCHEMA}.queue")
        self._finish(name, job)
        self.server.drop_db(db)
        _log(f"  {name}: {rate:,.0f} events/s (writers {w.rate:,.0f} rows/s)")

    def latency_rate(self) -> float:
        """The target rate of the latency measurement (see ``Plan.latency_rate_capped``)."""
        p = self.plan
        if not p.latency_rate_capped:
            return p.latency_rate
        drained = [
            Summary.of(row.metrics["events_per_s"]).median
            for driver in p.drivers
            if (row := self.rows.get(f"drain single {driver}")) is not None
            and row.metrics.get("events_per_s")
        ]
        if not drained:
            return p.latency_rate
        cap = max(50.0, math.floor(min(drained) * LATENCY_SHARE / 50) * 50)
        if cap >= p.latency_rate:
            return p.latency_rate
        self.notes.append(
            f"latency: the target {p.latency_rate:,.0f} changes/s is more than "
            f"{LATENCY_SHARE:.0%} of the single handler's median drain rate on this machine "
            f"({min(drained):,.0f}/s, slowest driver), so the latency runs used {cap:,.0f}/s "
            "(near capacity the percentiles would only measure a growing backlog; "
            "--latency-rate forces a rate)"
        )
        return cap

    def latency(self, run: int, driver: str, rate: float, variant: Variant) -> None:
        p = self.plan
        kind: Kind = "single"
        total = writers.paced_total(
            rate, p.latency_seconds, p.latency_writers, p.latency_rows_per_tx
        )
        name = f"latency {driver}{variant.suffix}"
        db = self.server.create_db(
            f"r{run}_latency_{driver}{variant.db_suffix}", template=self.empty[kind]
        )
        out = self.workdir / f"latency_{run}_{driver}{variant.db_suffix}.json"
        job = self._job(name, db, kind, driver, total, variant, latency_out=str(out))
        handle = self._start(job, name)
        handle.ready()
        paced = anyio.run(
            lambda: writers.paced(
                self.server.url(db),
                1,
                rate=rate,
                seconds=p.latency_seconds,
                writers=p.latency_writers,
                rows_per_tx=p.latency_rows_per_tx,
            )
        )
        m = handle.result(self._timeout(total))
        handled = dict(orjson.loads(out.read_bytes()))
        created = dict(
            self.sql(db, "SELECT id, extract(epoch FROM created_at)::float8 FROM source")
        )
        since = paced.write.started + p.latency_warmup
        commits = sorted((t, i) for i, t in paced.commits if t >= since and i in handled)
        views = {  # samples in commit order, seconds
            "writer-observed commit": [handled[i] - t for t, i in commits],
            "row clock_timestamp()": [handled[i] - created[i] for _, i in commits if i in created],
        }
        base = {"driver": driver, "handler": kind, "variant": variant.label}
        rows: list[Row] = []
        for view, samples in views.items():
            ordered = sorted(samples)
            row = self.row("latency", f"{name}: {view} → handled", view=view, **base)
            for q in (0.50, 0.95, 0.99):
                row.add(f"p{round(q * 100)}_ms", percentile(ordered, q) * 1000, "ms")
            row.add("max_ms", ordered[-1] * 1000 if ordered else None, "ms")
            row.add("samples", len(ordered), "events")
            rows.append(row)
        hist = self.row("latency", f"{name}: daemon lag histogram", view="histogram", **base)
        buckets = _since(m, since)
        for q in (0.50, 0.95, 0.99):
            value = histogram_quantile(buckets, q)
            hist.add(f"p{round(q * 100)}_ms", None if math.isnan(value) else value * 1000, "ms")
        hist.add("samples", buckets[-1][1] if buckets else None, "events")
        rows.append(hist)
        for row in rows:
            row.add("target_rows_per_s", rate, "rows/s")
            row.add("achieved_rows_per_s", paced.write.rate, "rows/s")
            _pressure(row, m.cpu_pressure)
        # Saturation shows as a backlog: the last events wait for everything before them.
        last_write = max((t for _, t in paced.commits), default=paced.write.finished)
        rows[0].add("tail_after_last_write_ms", (m.done_at - last_write) * 1000, "ms")
        self._saturation(run, name, views["writer-observed commit"])
        self.check(db, rows[0].name, total, f"{SCHEMA}.queue")
        self._finish(name, job)
        self.server.drop_db(db)
        observed = sorted(views["writer-observed commit"])
        _log(
            f"  {name}: p50 {percentile(observed, 0.5) * 1000:.1f} ms, p99 "
            f"{percentile(observed, 0.99) * 1000:.1f} ms at {paced.write.rate:,.0f} rows/s "
            f"(writers at most {paced.behind_max * 1000:.0f} ms behind schedule)"
        )

    def _saturation(self, run: int, name: str, samples: Sequence[float]) -> None:
        """Flag a run whose latency kept growing: the daemon fell behind the writers."""
        third = len(samples) // 3
        if third < 10:
            return
        early = percentile(sorted(samples[:third]), 0.5)
        late = percentile(sorted(samples[-third:]), 0.5)
        if late > 2 * early and late > 0.1:
            note = (
                f"{name}, run {run + 1}: the daemon fell behind (median "
                f"{early * 1000:,.0f} ms in the first third of the run, {late * 1000:,.0f} ms in "
                "the last): this rate is at or beyond its capacity on this machine"
            )
            self.notes.append(note)
            _log(f"  ! {note}")

    def pgbench(self, run: int) -> None:
        p = self.plan
        for clients in p.pgbench_clients:
            name = f"writers {clients} client{'s' if clients > 1 else ''}"
            row = self.row("writers", name, clients=clients)
            tps: dict[str, float] = {}
            order = ("plain", "trigger") if run % 2 == 0 else ("trigger", "plain")
            stall0, wall0 = cpu_stall_us(), time.time()
            for variant in order:
                db = self._pgbench_dbs[variant]
                self.sql(db, f"TRUNCATE source{', pgreact.queue' if variant == 'trigger' else ''}")
                r = run_pgbench(
                    self.server.bin_path,
                    self.server.url(db),
                    clients,
                    p.pgbench_seconds,
                    transactions=p.pgbench_transactions,
                )
                tps[variant] = r.tps
                row.add(f"{variant}_tps", r.tps, "tx/s")
                row.add(f"{variant}_latency_ms", r.latency_ms, "ms")
            row.add("trigger_vs_plain", tps["trigger"] / tps["plain"], "ratio")
            stall1, wall1 = cpu_stall_us(), time.time()
            if stall0 is not None and stall1 is not None:
                _pressure(row, (stall1 - stall0) / 1e6 / (wall1 - wall0))
            _log(
                f"  {name}: {tps['plain']:,.0f} tx/s plain, {tps['trigger']:,.0f} tx/s with "
                f"trigger ({tps['trigger'] / tps['plain']:.2f}x)"
            )

    def _timed(self, section: str, fn: Callable[..., None], *args: Any, **kwargs: Any) -> None:
        started = time.monotonic()
        try:
            fn(*args, **kwargs)
        finally:
            spent = time.monotonic() - started
            self.seconds[section] = self.seconds.get(section, 0.0) + spent

    def run_all(self) -> None:
        """Section by section, each repeated ``runs`` times (a drain and its baseline run
        back to back, so their ratio compares like with like)."""
        p = self.plan
        runs = range(p.runs)
        variants = p.variants(pgbouncer=self.bouncer is not None)
        if "drain" in p.sections:
            for run in runs:
                _log(f"drain, run {run + 1}/{p.runs}")
                for driver in p.drivers:
                    for kind in KINDS:
                        for variant in variants:
                            self._timed("drain", self.drain, run, kind, driver, variant)
                for style in BASELINE_STYLE.values():
                    self._timed("baseline", self.baseline, run, style)
                for batch in p.bare_batches:
                    self._timed("baseline", self.bare, run, batch)
                if self.loaded_pgqueuer:
                    self._timed("pgqueuer", self.pgqueuer, run)
        if "live" in p.sections:
            for run in runs:
                _log(f"live, run {run + 1}/{p.runs}")
                for driver in p.drivers:
                    for kind in KINDS:
                        for variant in variants:
                            self._timed("live", self.live, run, kind, driver, variant)
        if "latency" in p.sections:
            rate = self.latency_rate()
            for run in runs:
                _log(f"latency, run {run + 1}/{p.runs}")
                for driver in p.drivers:
                    for variant in p.variants():
                        self._timed("latency", self.latency, run, driver, rate, variant)
        if "writers" in p.sections:
            for run in runs:
                _log(f"writers, run {run + 1}/{p.runs}")
                self._timed("writers", self.pgbench, run)

    def close(self) -> None:
        for proc in self._profilers:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()

    # -- ratios and output ------------------------------------------------------------------

    def add_ratios(self) -> None:
        """pgreact / baseline per run pair: throughput ratio, and CPU ratio (daemon vs loop)."""
        pgqueuer = self.rows.get("drain pgqueuer")
        for row in self.rows.values():
            if row.params.get("mode") != "drain" or row.params.get("driver") is None:
                continue
            base = self.rows.get(f"drain baseline {BASELINE_STYLE[row.params['handler']]}")
            if base is not None:
                row.params["baseline"] = base.name
                for metric, label in (
                    ("events_per_s", "vs_baseline_throughput"),
                    ("daemon_cpu_ms_per_1k", "vs_baseline_cpu"),
                ):
                    pairs = ratios(row.metrics.get(metric, []), base.metrics.get(metric, []))
                    for value in pairs:
                        row.add(label, value, "ratio")
            # PgQueuer runs the single-event workload (one INSERT per job).
            if pgqueuer is not None and row.params["handler"] == "single":
                ours = row.metrics.get("events_per_s", [])
                for value in ratios(ours, pgqueuer.metrics.get("events_per_s", [])):
                    row.add("vs_pgqueuer_throughput", value, "ratio")
        # --ab and --pgbouncer: each variant against the default, run pair by run pair.
        for row in self.rows.values():
            variant = row.params.get("variant")
            if not variant:
                continue
            default = self.rows.get(
                row.params.get("default_row") or row.name.replace(f" [{variant}]", "")
            )
            if default is None:
                continue
            prefix = "vs_direct_" if variant == "pgbouncer" else "vs_default_"
            for metric in ("events_per_s", "daemon_cpu_ms_per_1k", "p50_ms", "p99_ms"):
                pairs = ratios(row.metrics.get(metric, []), default.metrics.get(metric, []))
                for value in pairs:
                    row.add(f"{prefix}{metric}", value, "ratio")


def _params(mode: str, kind: Kind, driver: str, variant: Variant) -> dict[str, Any]:
    params: dict[str, Any] = {
        "mode": mode,
        "handler": kind,
        "driver": driver,
        "variant": variant.label,
        "pooler": POOLED if variant.pgbouncer else "none",
    }
    if variant.label:
        params["default_row"] = f"{mode} {kind} {driver}"
    return params


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _pressure(row: Row, share: float | None) -> None:
    if share is not None:
        row.add("cpu_pressure_pct", share * 100, "%")


def _py_spy() -> str:
    found = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(found).exists():
        raise SystemExit("--profile needs py-spy: pip install py-spy")
    return found


def _since(m: Measurement, since: float) -> list[tuple[float, float]]:
    """The daemon's lag histogram without what it counted before ``since`` (the warm-up)."""
    final = m.lag_buckets or []
    before = next((b for t, b in m.lag_snapshots if t >= since), None)
    if before is None or len(before) != len(final):
        return final
    return [(le, n - dict(before).get(le, 0.0)) for le, n in final]


def _cell(row: Row, metric: str, digits: int = 0, suffix: str = "") -> str:
    s: Summary | None = row.summary(metric)
    return "n/a" if s is None else s.fmt(digits) + suffix


def _integrity(row: Row) -> str:
    return "ok" if not (row.lost or row.duplicated) else f"LOST {row.lost} DUP {row.duplicated}"


def render(bench: Bench, plan: Plan) -> str:
    rows = list(bench.rows.values())
    parts: list[str] = []
    tp = [r for r in rows if r.section == "throughput"]
    if tp:
        parts.append(
            render_table(
                f"1. Throughput (drain: {plan.events:,} changes queued while the daemon was "
                f"stopped; live: {plan.live_events:,} changes written by {plan.writers} writers "
                "while it runs)",
                [
                    "scenario",
                    "events/s",
                    "vs baseline",
                    "vs PgQueuer",
                    "daemon CPU ms/1k ev",
                    "CPU vs baseline",
                    "server CPU ms/1k ev",
                    "peak RSS MB",
                    "CPU pressure %",
                    "exactly-once",
                ],
                [
                    [
                        r.name,
                        _cell(r, "events_per_s"),
                        _cell(r, "vs_baseline_throughput", 2, "x"),
                        _cell(r, "vs_pgqueuer_throughput", 2, "x"),
                        _cell(r, "daemon_cpu_ms_per_1k"),
                        _cell(r, "vs_baseline_cpu", 2, "x"),
                        _cell(r, "server_cpu_ms_per_1k"),
                        _cell(r, "rss_peak_mb"),
                        _cell(r, "cpu_pressure_pct"),
                        _integrity(r),
                    ]
                    for r in tp
                ],
            )
        )
    pooled = [r for r in tp if r.params.get("variant") == "pgbouncer"]
    if pooled:
        parts.append(
            render_table(
                "1b. Through PgBouncer (transaction mode, PGREACT_POOLER=pgbouncer-transaction; "
                "the listener direct) vs direct, same invocation, ratios per run pair",
                [
                    "scenario",
                    "direct events/s",
                    "via PgBouncer events/s",
                    "via/direct",
                    "daemon CPU ms/1k direct",
                    "via PgBouncer",
                    "PgBouncer CPU ms/1k",
                    "server CPU ms/1k direct",
                    "via PgBouncer",
                    "exactly-once",
                ],
                [
                    [
                        direct.name,
                        _cell(direct, "events_per_s"),
                        _cell(r, "events_per_s"),
                        _cell(r, "vs_direct_events_per_s", 2, "x"),
                        _cell(direct, "daemon_cpu_ms_per_1k"),
                        _cell(r, "daemon_cpu_ms_per_1k"),
                        _cell(r, "pgbouncer_cpu_ms_per_1k"),
                        _cell(direct, "server_cpu_ms_per_1k"),
                        _cell(r, "server_cpu_ms_per_1k"),
                        _integrity(r),
                    ]
                    for r in pooled
                    if (direct := bench.rows.get(r.params["default_row"])) is not None
                ],
            )
        )
    lat = [r for r in rows if r.section == "latency"]
    if lat:
        parts.append(
            render_table(
                f"2. Latency commit → handled, ms (single-event handler; a steady rate for "
                f"{plan.latency_seconds:g} s as {plan.latency_rows_per_tx}-row autocommit INSERTs "
                f"from {plan.latency_writers} writers; first {plan.latency_warmup:g} s excluded)",
                [
                    "view",
                    "p50",
                    "p95",
                    "p99",
                    "max",
                    "target rows/s",
                    "achieved rows/s",
                    "tail after last write ms",
                    "CPU pressure %",
                    "exactly-once",
                ],
                [
                    [
                        r.name.removeprefix("latency "),
                        _cell(r, "p50_ms", 1),
                        _cell(r, "p95_ms", 1),
                        _cell(r, "p99_ms", 1),
                        _cell(r, "max_ms", 1),
                        _cell(r, "target_rows_per_s"),
                        _cell(r, "achieved_rows_per_s"),
                        _cell(r, "tail_after_last_write_ms"),
                        _cell(r, "cpu_pressure_pct"),
                        _integrity(r),
                    ]
                    for r in lat
                ],
            )
        )
    wr = [r for r in rows if r.section == "writers"]
    if wr:
        parts.append(
            render_table(
                "3. Writer-side single-row autocommit INSERT rate (pgbench -M prepared, "
                + (
                    f"{plan.pgbench_transactions} transactions each"
                    if plan.pgbench_transactions
                    else f"{plan.pgbench_seconds:g} s each"
                )
                + "; no daemon running)",
                [
                    "clients",
                    "no trigger tx/s",
                    "with capture tx/s",
                    "with/without",
                    "latency ms no trigger",
                    "latency ms with capture",
                    "CPU pressure %",
                ],
                [
                    [
                        str(r.params["clients"]),
                        _cell(r, "plain_tps"),
                        _cell(r, "trigger_tps"),
                        _cell(r, "trigger_vs_plain", 2, "x"),
                        _cell(r, "plain_latency_ms", 2),
                        _cell(r, "trigger_latency_ms", 2),
                        _cell(r, "cpu_pressure_pct"),
                    ]
                    for r in wr
                ],
            )
        )
    ab = [r for r in rows if any(m.startswith("vs_default_") for m in r.metrics)]
    if ab:
        parts.append(
            render_table(
                f"A/B: [{ab[0].params['variant']}] against the default configuration, per run "
                "pair (events/s > 1 and the rest < 1 is better)",
                ["scenario", "events/s", "daemon CPU/1k ev", "p50", "p99"],
                [
                    [
                        r.name,
                        _cell(r, "vs_default_events_per_s", 2, "x"),
                        _cell(r, "vs_default_daemon_cpu_ms_per_1k", 2, "x"),
                        _cell(r, "vs_default_p50_ms", 2, "x"),
                        _cell(r, "vs_default_p99_ms", 2, "x"),
                    ]
                    for r in ab
                ],
            )
        )
    return "\n\n".join(parts)


METHOD = {
    "runs": "each measurement repeated --runs times; cells show median [min-max]; ratios are "
    "computed per run pair (run i vs baseline run i), then the median",
    "drain": "the backlog is queued with no daemon running, cloned into a fresh database per run "
    "(CREATE DATABASE … TEMPLATE, ANALYZEd); the clock runs from the daemon's 'started' to the "
    "moment the last expected event's transaction had committed (an SQLAlchemy after_commit "
    "hook in the measured process counts handled events: no polling, no SQL)",
    "live": "writers (another process) start when the daemon is ready; the clock runs from the "
    "first write to the last event handled",
    "cpu": "daemon CPU: the measured process's own getrusage (user+system) over the same "
    "interval; server CPU: all PostgreSQL processes (/proc, incl. reaped backends); writers "
    "and the orchestrator are separate processes and not counted",
    "rss": "VmHWM of the measured process (forked from a fork server that pre-imported both "
    "drivers, so the figure includes both)",
    "latency": "rate: at most 25% of the single handler's median drain rate unless "
    "--latency-rate is given. Writer-observed commit: time.time() in the writer right after its "
    "autocommit INSERT returned (slightly after the real commit). Row clock_timestamp(): the "
    "source row's created_at default, taken during the INSERT before the trigger and the commit "
    "(so it includes the writer's own commit). 'Handled' is time.time() in the daemon process "
    "when SQLAlchemy's after_commit fired for the handler+ack transaction. The daemon histogram "
    "is pgreact_event_lag_seconds (capturing statement start → commit, bucketed, interpolated). "
    "Tail: last handled minus last written; it grows when the daemon falls behind",
    "baseline": "bare asyncpg: --baseline-workers (default 4) connections each loop BEGIN; "
    "SELECT … ORDER BY id LIMIT 100 FOR UPDATE SKIP LOCKED; decode jsonb; INSERT effects (per "
    "row, executemany, or COPY); DELETE claimed; COMMIT. 'vs baseline' pairs single with "
    "per-row, batch with executemany, copy with COPY",
    "bare": "the same loop with no handler (claim with SKIP LOCKED, DELETE, COMMIT; the payload "
    "is fetched, not decoded) at batch 100 and 1000, on a larger backlog (--bare-events): the "
    "ceiling of any SKIP LOCKED drain on this machine",
    "pgqueuer": "when pgqueuer is installed (pip install 'pgreact[bench]'): the same source rows, "
    "one job each (payload: the row image as JSON) enqueued before the consumer starts, cloned "
    "per run; one consumer as PgQueuer's README writes it, PgQueuer(AsyncpgDriver(connection)), "
    "run(mode=drain, batch_size=--pgqueuer-batch-size); its entrypoint INSERTs the effect "
    "through an asyncpg pool (--pgqueuer-pool-size). The clock starts after connecting and "
    "stops when run() returns (every job handled and deleted from the queue). 'vs PgQueuer': "
    "the single-event drain over PgQueuer, per run pair. PgQueuer's write is not in the job's "
    "transaction (at least once); pgreact's is (exactly once)",
    "pgbouncer": "--pgbouncer (default: when installed): every drain and live scenario again with "
    "PGREACT_DATABASE_URL through a PgBouncer this run started (transaction mode, "
    "default_pool_size --pgbouncer-pool-size, max_prepared_statements 0, the tests' strict "
    "settings) and PGREACT_POOLER=pgbouncer-transaction, PGREACT_LISTEN_URL direct; run right "
    "after the direct one, ratio per run pair; PgBouncer's own CPU is measured separately",
    "server": "synchronous_commit and fsync on, default settings otherwise",
    "pressure": "CPU pressure: share of the measured interval during which some runnable task on "
    "the machine waited for a CPU (Linux PSI 'some', machine-wide, our own processes included); "
    "high values mean the numbers are CPU-starved",
}


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    d = Plan()
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description="pgreact end-to-end benchmark (throughput, latency, writer cost, baseline).",
    )
    ap.add_argument(
        "--quick", action="store_true", help="tiny sizes, 1 run (the smoke test, ~30 s)"
    )
    ap.add_argument(
        "--url", help="use this server (libpq or SQLAlchemy URL) instead of starting one"
    )
    ap.add_argument("--json", type=Path, help="also write the results to this file")
    ap.add_argument("--runs", type=int, help=f"repetitions of each measurement ({d.runs})")
    ap.add_argument("--events", type=int, help=f"drain backlog size ({d.events})")
    ap.add_argument(
        "--live-events", type=int, help=f"changes in the live variant ({d.live_events})"
    )
    ap.add_argument("--latency-rate", type=float, help=f"changes/s ({d.latency_rate:g})")
    ap.add_argument("--latency-seconds", type=float, help=f"({d.latency_seconds:g})")
    ap.add_argument(
        "--pgbench-seconds", type=float, help=f"per pgbench run ({d.pgbench_seconds:g})"
    )
    ap.add_argument("--batch-max-size", type=int, help=f"on_batch max_size ({d.batch_max_size})")
    ap.add_argument("--baseline-workers", type=int, help=f"({d.baseline_workers})")
    ap.add_argument(
        "--bare-events", type=int, help=f"backlog of the bare drain (no handler) ({d.bare_events})"
    )
    ap.add_argument(
        "--pgbouncer",
        nargs="?",
        const="yes",
        choices=("auto", "yes", "no"),
        help="also run drain and live with the write engine through a transaction-mode PgBouncer "
        f"(yes: required, no: never, auto: when installed; {d.pgbouncer})",
    )
    ap.add_argument(
        "--pgbouncer-pool-size", type=int, help=f"its default_pool_size ({d.pgbouncer_pool_size})"
    )
    ap.add_argument(
        "--pgqueuer-batch-size",
        type=int,
        help=f"PgQueuer's dequeue batch size ({d.pgqueuer_batch_size})",
    )
    ap.add_argument(
        "--pgqueuer-pool-size",
        type=int,
        help=f"connections of the PgQueuer handler's pool ({d.pgqueuer_pool_size})",
    )
    ap.add_argument("--drivers", help="comma-separated subset of asyncpg,psycopg")
    ap.add_argument(
        "--sections", help=f"comma-separated subset of {','.join(SECTIONS)} (default: all)"
    )
    ap.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="record each measured process with py-spy (collapsed stacks) into DIR; the "
        "numbers of a profiled run are perturbed",
    )
    ap.add_argument("--logs", type=Path, metavar="DIR", help="keep the measured processes' logs")
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a pgreact setting for the measured daemons, e.g. --set pool_pre_ping=false "
        "--set concurrency=4 (names as in PGREACT_*, lower case, without the prefix)",
    )
    ap.add_argument(
        "--ab",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="also measure every daemon scenario with this setting changed, right after the "
        "default one, and report per-run-pair ratios (repeatable: one combined variant)",
    )
    return ap.parse_args(argv)


def _plan(args: argparse.Namespace) -> Plan:
    plan = QUICK if args.quick else Plan()
    changes: dict[str, Any] = {}
    for field in (
        "runs",
        "events",
        "live_events",
        "latency_rate",
        "latency_seconds",
        "pgbench_seconds",
        "batch_max_size",
        "baseline_workers",
        "bare_events",
        "pgbouncer_pool_size",
        "pgqueuer_batch_size",
        "pgqueuer_pool_size",
    ):
        value = getattr(args, field)
        if value is not None:
            if value <= 0:
                raise SystemExit(f"--{field.replace('_', '-')} must be positive")
            changes[field] = value
    for field, allowed in (("drivers", DRIVERS), ("sections", SECTIONS)):
        value = getattr(args, field)
        if value:
            chosen = tuple(v.strip() for v in value.split(",") if v.strip())
            bad = [v for v in chosen if v not in allowed]
            if bad or not chosen:
                raise SystemExit(f"--{field}: unknown {bad}; choose from {','.join(allowed)}")
            changes[field] = chosen
    if args.latency_rate is not None:
        changes["latency_rate_capped"] = False
    if args.pgbouncer is not None:
        changes["pgbouncer"] = args.pgbouncer
    for option, field in (("set", "settings"), ("ab", "ab")):
        items = _settings(getattr(args, option), option)
        if items:
            changes[field] = items
    return dataclasses.replace(plan, **changes)


def _settings(items: Sequence[str], option: str) -> tuple[tuple[str, str], ...]:
    """``NAME=VALUE`` pairs, validated by pgreact's own settings model now rather than in the
    first measured process."""
    pairs = []
    for item in items:
        name, sep, value = item.partition("=")
        name = name.strip().lower().removeprefix("pgreact_")
        if not sep or not name:
            raise SystemExit(f"--{option} {item!r}: expected NAME=VALUE")
        pairs.append((name, value.strip()))
    if pairs:
        from pgreact.settings import load_settings

        try:
            load_settings(None, environ={}, **dict(pairs))
        except Exception as exc:
            raise SystemExit(f"--{option}: {exc}") from None
    return tuple(pairs)


@dataclass(frozen=True)
class _Upstream:
    """What PgBouncer needs to know of the server under test."""

    host: str
    port: int
    user: str
    password: str


def _upstream(server: Server) -> _Upstream:
    parts = urlsplit(server.base_url)
    return _Upstream(
        host=parts.hostname or "127.0.0.1",
        port=parts.port or 5432,
        user=unquote(parts.username or "") or os.environ.get("USER", "postgres"),
        password=unquote(parts.password or ""),
    )


def _start_pgbouncer(plan: Plan, server: Server, notes: list[str]) -> PgBouncer | None:
    """A transaction-mode PgBouncer in front of the server, started the way the tests start
    theirs (:mod:`tests.pgbouncer_core`), or None (and a note saying why)."""
    if plan.pgbouncer == "no" or not {"drain", "live"} & set(plan.sections):
        return None
    try:
        from tests import pgbouncer_core
    except ImportError as exc:  # run from outside the checkout
        raise SystemExit(f"--pgbouncer needs tests/pgbouncer_core.py on the path: {exc}") from None
    binary = pgbouncer_core.find_pgbouncer()
    if binary is None:
        if plan.pgbouncer == "yes":
            raise SystemExit(f"--pgbouncer: {pgbouncer_core.INSTALL_HINT}")
        notes.append(f"PgBouncer rows skipped: {pgbouncer_core.INSTALL_HINT}")
        return None
    try:
        bouncer = pgbouncer_core.start(
            binary, _upstream(server), pool_mode="transaction", pool_size=plan.pgbouncer_pool_size
        )
    except pgbouncer_core.PgBouncerError as exc:
        raise SystemExit(f"--pgbouncer: {exc}") from None
    _log(
        f"PgBouncer (transaction mode) on {bouncer.host}:{bouncer.port}, pid {bouncer.process.pid}"
    )
    return bouncer


def _pgbouncer_version(bouncer: PgBouncer) -> str:
    from tests import pgbouncer_core

    binary = pgbouncer_core.find_pgbouncer()
    version = pgbouncer_core.pgbouncer_version(binary) if binary else (0,)
    return ".".join(map(str, version))


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    plan = _plan(args)
    started = time.monotonic()
    workdir = args.logs or Path(tempfile.mkdtemp(prefix="pgreact-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    if args.profile:
        _py_spy()
        args.profile.mkdir(parents=True, exist_ok=True)
    warm_up()  # the fork server imports while the PostgreSQL server starts
    notes: list[str] = []
    with open_server(args.url) as server:
        info = machine_info(server)
        bouncer = _start_pgbouncer(plan, server, notes)
        info["baselines"] = f"pgqueuer {_version('pgqueuer')}, " + (
            f"PgBouncer {_pgbouncer_version(bouncer)}" if bouncer else "PgBouncer not used"
        )
        header = ["pgreact benchmark", "=" * 17]
        header += [f"{k:>22}: {v}" for k, v in info.items()]
        header.append(f"{'command':>22}: python -m benchmarks.run {' '.join(sys.argv[1:])}")
        print("\n".join(header), flush=True)
        bench = Bench(server, plan, workdir, args.profile, bouncer)
        bench.notes.extend(notes)
        try:
            bench._timed("prepare", bench.prepare)
            bench.run_all()
        except BenchFailure as exc:
            bench.failures.append(str(exc))
            _log(f"!!! {exc}")
        finally:
            bench.close()
            if bouncer is not None:
                bouncer.stop()
            if server.postmaster_pid is None:  # someone else's server: leave it tidy
                server.drop_all()
    bench.add_ratios()
    if not HAVE_PGQUEUER:
        bench.notes.append(
            "PgQueuer baseline skipped: pgqueuer is not installed (pip install 'pgreact[bench]')"
        )
    elapsed = time.monotonic() - started
    load = os.getloadavg()
    bench.notes.append(
        f"load average at the end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} "
        f"(a shared machine: compare with the start; other tenants' CPU use shifts every number)"
    )
    print()
    print(render(bench, plan))
    print()
    print("Method:")
    for key, text in METHOD.items():
        print(f"  - {key}: {text}")
    for note in bench.notes:
        print(f"  - note: {note}")
    spent = ", ".join(f"{k} {v:.0f} s" for k, v in bench.seconds.items())
    print(f"\ntotal time {elapsed:.0f} s ({spent})")
    ok = not bench.failures
    if args.json:
        payload = {
            "ok": ok,
            "failures": bench.failures,
            "machine": info,
            "plan": dataclasses.asdict(plan),
            "method": METHOD,
            "notes": bench.notes,
            "elapsed_seconds": elapsed,
            "rows": [r.to_json() for r in bench.rows.values()],
        }
        args.json.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n")
    if not ok:
        print("\nFAILED:", file=sys.stderr)
        for failure in bench.failures:
            print(f"  {failure}", file=sys.stderr)
        print(f"logs kept in {workdir}", file=sys.stderr)
        return 1
    if args.logs is None:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
