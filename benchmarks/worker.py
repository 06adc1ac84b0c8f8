"""The measured process: a pgreact daemon (in process, as ``pgreact run`` would build it), the
bare asyncpg baseline loop, or a PgQueuer consumer (when ``pgqueuer`` is installed).

Each measurement runs in a fresh process forked from a fork server that has already imported
everything (:func:`start`), so import time is never measured and every process starts with the
same memory. The process measures itself — wall time, its own CPU (``getrusage``), the server's
CPU, its peak RSS — between "started" and "every expected event handled", and reports over a
pipe: ``("ready", t)`` once it can take work, then ``("result", Measurement)`` or
``("error", traceback)``. Writers never run here, so their CPU is not counted.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import multiprocessing
import os
import resource
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Literal

import anyio
import asyncpg
import orjson

from benchmarks.server import cpu_stall_us, process_cpu_seconds, server_cpu_seconds
from benchmarks.workload import HANDLER_NAMES, PGQUEUER_ENTRYPOINT, Kind, clock, make_router
from pgreact.logging import configure_logging
from pgreact.metrics import Metrics
from pgreact.runtime import Daemon
from pgreact.settings import load_settings

# Modules the daemon imports lazily: the fork server imports them up front, so nothing is
# imported inside a measurement (both drivers, so every measured process starts alike).
PRELOAD = (
    "hypercorn.asyncio",
    "hypercorn.config",
    "pgreact.listeners.asyncpg_backend",
    "pgreact.listeners.psycopg_backend",
    "sqlalchemy.dialects.postgresql.asyncpg",
    "sqlalchemy.dialects.postgresql.psycopg",
)
# PgQueuer's consumer, when the optional extra is installed (pip install 'pgreact[bench]').
PGQUEUER_PRELOAD = ("pgqueuer", "pgqueuer.db", "pgqueuer.models", "pgqueuer.types")
HAVE_PGQUEUER = importlib.util.find_spec("pgqueuer") is not None
for _module in PRELOAD + (PGQUEUER_PRELOAD if HAVE_PGQUEUER else ()):
    importlib.import_module(_module)

CHECK_SECONDS = 0.25  # how often the measured process looks for failures and stalls


class BenchFailure(RuntimeError):
    """A measurement went wrong (lost work, handler failures, a stall): the run must fail."""


@dataclass(frozen=True, slots=True)
class DaemonJob:
    url: str  # SQLAlchemy URL; its driver is the write driver and the listener driver
    kind: Kind
    expect: int
    log_path: str
    server_pid: int | None = None
    listen_url: str | None = None  # PGREACT_LISTEN_URL when the write URL goes through a pooler
    pooler_pid: int | None = None  # PgBouncer in between: its CPU is measured too
    batch_max_size: int = 100
    latency_out: str | None = None  # where to write (source id, commit time) pairs
    stall_timeout: float = 60.0
    overrides: dict[str, Any] = field(default_factory=dict)  # extra pgreact settings


BaselineStyle = Literal["per-row", "executemany", "copy", "none"]


@dataclass(frozen=True, slots=True)
class BaselineJob:
    url: str  # libpq URL
    expect: int
    log_path: str
    # per-row: one INSERT round trip per effect; executemany / copy: one per batch; none: no
    # effect at all (claim, delete, commit: the bare drain)
    style: BaselineStyle
    server_pid: int | None = None
    workers: int = 4
    batch: int = 100


@dataclass(frozen=True, slots=True)
class PgQueuerJob:
    """One PgQueuer consumer (``PgQueuer.run`` in drain mode) on an asyncpg connection; the
    job handler INSERTs its effect through an asyncpg pool of ``pool_size`` connections."""

    url: str  # libpq URL
    expect: int
    log_path: str
    server_pid: int | None = None
    batch_size: int = 100
    pool_size: int = 10


Job = DaemonJob | BaselineJob | PgQueuerJob


@dataclass(frozen=True, slots=True)
class Measurement:
    handled: int
    started_at: float  # time.time() when the process could take work
    done_at: float  # time.time() when the last expected event's transaction had committed
    cpu_seconds: float  # this process, user + system, started → done
    server_cpu_seconds: float | None  # every server process, started → done
    rss_peak_mb: float
    cpu_pressure: float | None = None  # share of the interval some task waited for a CPU
    pooler_cpu_seconds: float | None = None  # PgBouncer, started → done (when one is in between)
    lag_buckets: list[tuple[float, float]] | None = None  # pgreact_event_lag_seconds (le, n)
    # (time.time(), buckets) taken every LAG_SNAPSHOT_SECONDS, to cut a warm-up off later
    lag_snapshots: list[tuple[float, list[tuple[float, float]]]] = field(default_factory=list)

    @property
    def wall_seconds(self) -> float:
        return self.done_at - self.started_at


@dataclass(frozen=True, slots=True)
class _Mark:
    wall: float
    cpu: float
    server_cpu: float | None
    stall_us: int | None
    pooler_cpu: float | None = None


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _mark_start(server_pid: int | None, pooler_pid: int | None = None) -> _Mark:
    server = server_cpu_seconds(server_pid)  # before our own CPU mark: the scan is not counted
    pooler = process_cpu_seconds(pooler_pid)
    stall = cpu_stall_us()
    return _Mark(time.time(), _cpu(), server, stall, pooler)


def _mark_end(server_pid: int | None, pooler_pid: int | None = None) -> _Mark:
    wall, cpu, stall = time.time(), _cpu(), cpu_stall_us()
    return _Mark(wall, cpu, server_cpu_seconds(server_pid), stall, process_cpu_seconds(pooler_pid))


def _peak_rss_mb() -> float:
    """VmHWM: the high-water resident set of this process (shared pages included)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _measurement(
    handled: int,
    start: _Mark,
    end: _Mark,
    lag: list[tuple[float, float]] | None = None,
    snapshots: list[tuple[float, list[tuple[float, float]]]] | None = None,
) -> Measurement:
    server = pressure = pooler = None
    if start.server_cpu is not None and end.server_cpu is not None:
        server = end.server_cpu - start.server_cpu
    if start.pooler_cpu is not None and end.pooler_cpu is not None:
        pooler = end.pooler_cpu - start.pooler_cpu
    if start.stall_us is not None and end.stall_us is not None and end.wall > start.wall:
        pressure = (end.stall_us - start.stall_us) / 1e6 / (end.wall - start.wall)
    return Measurement(
        handled=handled,
        started_at=start.wall,
        done_at=end.wall,
        cpu_seconds=end.cpu - start.cpu,
        server_cpu_seconds=server,
        rss_peak_mb=_peak_rss_mb(),
        cpu_pressure=pressure,
        pooler_cpu_seconds=pooler,
        lag_buckets=lag,
        lag_snapshots=snapshots or [],
    )


# -- pgreact ----------------------------------------------------------------------------------


def _outcomes(metrics: Metrics, handler: str) -> dict[str, float]:
    counts: dict[str, float] = {}
    for family in metrics.events_handled.collect():
        for sample in family.samples:
            if sample.name.endswith("_total") and sample.labels.get("handler") == handler:
                counts[sample.labels["outcome"]] = sample.value
    return counts


def _lag_buckets(metrics: Metrics, handler: str) -> list[tuple[float, float]]:
    buckets: list[tuple[float, float]] = []
    for family in metrics.event_lag.collect():
        for sample in family.samples:
            if sample.name.endswith("_bucket") and sample.labels.get("handler") == handler:
                buckets.append((float(sample.labels["le"]), sample.value))
    return sorted(buckets)


async def _run_daemon(job: DaemonJob, send: Callable[[tuple[str, Any]], None]) -> Measurement:
    configure_logging("json", "WARNING")
    done = anyio.Event()
    clock.arm(job.expect, done.set, record=job.latency_out is not None)
    overrides = dict(job.overrides)
    if job.listen_url is not None:
        overrides.setdefault("listen_url", job.listen_url)
    settings = load_settings(
        None,
        environ={},
        database_url=job.url,
        http_host="127.0.0.1",
        http_port=0,
        log_level="WARNING",
        application_name="pgreact-bench",
        **overrides,
    )
    daemon = Daemon(settings, make_router(job.kind, job.batch_max_size))
    handler = HANDLER_NAMES[job.kind]
    async with anyio.create_task_group() as tg:
        await tg.start(daemon.run)
        start = _mark_start(job.server_pid, job.pooler_pid)
        send(("ready", start.wall))
        last, last_change = 0, time.monotonic()
        snapshots: list[tuple[float, list[tuple[float, float]]]] = []
        while not done.is_set():
            # Completion is signalled by the commit hook; this loop only watches for trouble
            # (and, for the latency run, snapshots the daemon's lag histogram).
            with anyio.move_on_after(CHECK_SECONDS):
                await done.wait()
            if done.is_set():
                break
            if job.latency_out:
                snapshots.append((time.time(), _lag_buckets(daemon.metrics, handler)))
            counts = _outcomes(daemon.metrics, handler)
            failed = counts.get("retry", 0.0) + counts.get("dead", 0.0)
            if failed:
                raise BenchFailure(
                    f"{failed:.0f} handler calls failed (see the daemon log {job.log_path})"
                )
            now = time.monotonic()
            if clock.handled != last:
                last, last_change = clock.handled, now
            elif now - last_change > job.stall_timeout:
                raise BenchFailure(
                    f"no progress for {job.stall_timeout:g} s: {clock.handled} of {job.expect} "
                    f"events handled (see the daemon log {job.log_path})"
                )
        end = _mark_end(job.server_pid, job.pooler_pid)
        done_at = clock.done_at or end.wall
        end = dataclasses.replace(end, wall=done_at)
        daemon.stop()
    # The daemon's own counter must agree once it has stopped (it counts after the commit).
    ok = _outcomes(daemon.metrics, handler).get("ok", 0.0)
    if ok != clock.handled:
        raise BenchFailure(
            f"pgreact counted {ok:.0f} events handled, the commit hook {clock.handled}"
        )
    return _measurement(clock.handled, start, end, _lag_buckets(daemon.metrics, handler), snapshots)


# -- the bare asyncpg baseline ----------------------------------------------------------------

BASE_CLAIM = "SELECT id, payload::text FROM jobs ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED"
BASE_EFFECT = "INSERT INTO effects (source_id, event_id, account) VALUES ($1, $2, $3)"
BASE_DELETE = "DELETE FROM jobs WHERE id = ANY($1::bigint[])"


async def _run_baseline(job: BaselineJob, send: Callable[[tuple[str, Any]], None]) -> Measurement:
    """Claim up to ``batch`` jobs with SKIP LOCKED, write each effect (or, style ``none``, none:
    the bare drain), delete the jobs, commit — on ``workers`` connections until the table is
    empty. Connecting is inside the timing, as the daemon's pool connects inside its."""
    handled = 0
    columns = ["source_id", "event_id", "account"]

    async def work() -> None:
        nonlocal handled
        conn = await asyncpg.connect(
            job.url, server_settings={"application_name": "pgreact-bench-baseline"}
        )
        try:
            while True:
                async with conn.transaction():
                    rows = await conn.fetch(BASE_CLAIM, job.batch)
                    if not rows:  # the rest (if any) is locked by other workers: they finish it
                        return
                    if job.style != "none":
                        effects = []
                        for job_id, payload in rows:
                            image = orjson.loads(payload)
                            effects.append((image["id"], job_id, image["account"]))
                        if job.style == "per-row":
                            for effect in effects:
                                await conn.execute(BASE_EFFECT, *effect)
                        elif job.style == "executemany":
                            await conn.executemany(BASE_EFFECT, effects)
                        else:
                            await conn.copy_records_to_table(
                                "effects", columns=columns, records=effects
                            )
                    await conn.execute(BASE_DELETE, [r[0] for r in rows])
                handled += len(rows)
        finally:
            await conn.close()

    start = _mark_start(job.server_pid)
    send(("ready", start.wall))
    async with anyio.create_task_group() as tg:
        for _ in range(job.workers):
            tg.start_soon(work)
    end = _mark_end(job.server_pid)
    if handled != job.expect:
        raise BenchFailure(f"baseline handled {handled} jobs, expected {job.expect}")
    return _measurement(handled, start, end)


# -- PgQueuer ---------------------------------------------------------------------------------


async def _run_pgqueuer(job: PgQueuerJob, send: Callable[[tuple[str, Any]], None]) -> Measurement:
    """Drain the queued jobs with one PgQueuer consumer as its README writes one (``PgQueuer``
    over an ``AsyncpgDriver`` connection, an ``entrypoint``, ``run(mode=drain)``), the job
    handler doing one INSERT through a shared asyncpg pool (PgQueuer runs handlers outside any
    transaction of its own). The clock starts once the connections are open (in PgQueuer's
    favour: the daemon's pool connects inside its timing) and stops when ``run`` returns: every
    job handled and its completion recorded (the job deleted from the queue)."""
    from pgqueuer import PgQueuer
    from pgqueuer.db import AsyncpgDriver
    from pgqueuer.models import Job as PgqJob
    from pgqueuer.types import QueueExecutionMode

    handled = 0
    last_effect = 0.0
    app = {"application_name": "pgreact-bench-pgqueuer"}
    conn = await asyncpg.connect(job.url, server_settings=app)
    pool = await asyncpg.create_pool(
        job.url, min_size=job.pool_size, max_size=job.pool_size, server_settings=app
    )
    try:
        pgq = PgQueuer(AsyncpgDriver(conn))

        @pgq.entrypoint(PGQUEUER_ENTRYPOINT)
        async def handle(pjob: PgqJob) -> None:
            nonlocal handled, last_effect
            image = orjson.loads(pjob.payload or b"{}")
            await pool.execute(BASE_EFFECT, image["id"], pjob.id, image["account"])
            handled += 1
            last_effect = time.time()

        start = _mark_start(job.server_pid)
        send(("ready", start.wall))
        await pgq.run(batch_size=job.batch_size, mode=QueueExecutionMode.drain)
        end = _mark_end(job.server_pid)
    finally:
        await pool.close()
        await conn.close()
    if handled != job.expect:
        raise BenchFailure(f"PgQueuer handled {handled} jobs, expected {job.expect}")
    # How long after the last handler returned PgQueuer noticed it was done (to the log).
    print(
        f"pgqueuer: run() returned {end.wall - last_effect:.3f} s after the last effect",
        file=sys.stderr,
    )
    return _measurement(handled, start, end)


# -- process plumbing -------------------------------------------------------------------------


def _loop_options() -> dict[str, Any]:
    """As ``pgreact run``: uvloop when installed."""
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return {}
    return {"use_uvloop": True}


def child_main(job: Job, conn: Connection) -> None:
    """Entry point of the measured process."""
    with open(job.log_path, "ab") as log:
        os.dup2(log.fileno(), 2)
    try:
        if isinstance(job, DaemonJob):
            result = anyio.run(
                _run_daemon, job, conn.send, backend="asyncio", backend_options=_loop_options()
            )
            if job.latency_out:
                Path(job.latency_out).write_bytes(orjson.dumps(clock.samples))
        elif isinstance(job, BaselineJob):
            result = anyio.run(
                _run_baseline, job, conn.send, backend="asyncio", backend_options=_loop_options()
            )
        else:
            result = anyio.run(
                _run_pgqueuer, job, conn.send, backend="asyncio", backend_options=_loop_options()
            )
        conn.send(("result", result))
    except BaseException as exc:
        conn.send(("error", "".join(traceback.format_exception(exc))))
        raise SystemExit(1) from None
    finally:
        conn.close()


class Handle:
    """The orchestrator's view of one measured process."""

    def __init__(self, process: multiprocessing.process.BaseProcess, conn: Connection, log: str):
        self.process = process
        self._conn = conn
        self._log = log

    @property
    def pid(self) -> int | None:
        return self.process.pid

    def _receive(self, want: str, timeout: float) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            if self._conn.poll(0.05):
                try:
                    kind, value = self._conn.recv()
                except EOFError:  # the process died: fall through to the liveness check
                    self.process.join(5)
                    raise BenchFailure(
                        f"measured process exited with code {self.process.exitcode} before "
                        f"sending {want!r}{self._log_tail()}"
                    ) from None
                if kind == "error":
                    self._reap()
                    raise BenchFailure(f"measured process failed:\n{value}{self._log_tail()}")
                if kind == want:
                    return value
                continue
            if not self.process.is_alive() and not self._conn.poll(0):
                raise BenchFailure(
                    f"measured process exited with code {self.process.exitcode} before "
                    f"sending {want!r}{self._log_tail()}"
                )
            if time.monotonic() > deadline:
                self.kill()
                raise BenchFailure(f"no {want!r} within {timeout:g} s{self._log_tail()}")

    def ready(self, timeout: float = 60.0) -> float:
        return float(self._receive("ready", timeout))

    def result(self, timeout: float) -> Measurement:
        value: Measurement = self._receive("result", timeout)
        self._reap()
        return value

    def _reap(self) -> None:
        self.process.join(30)
        if self.process.is_alive():
            self.kill()

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join(10)

    def _log_tail(self, lines: int = 30) -> str:
        try:
            text = Path(self._log).read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            return ""
        return f"\nlast lines of {self._log}:\n" + "\n".join(text) if text else ""


_CONTEXT: Any = None


def warm_up() -> Any:
    """Start the fork server now (it imports in the background while the caller goes on)."""
    global _CONTEXT  # noqa: PLW0603 - one fork server per orchestrator
    if _CONTEXT is None:
        _CONTEXT = multiprocessing.get_context("forkserver")
        _CONTEXT.set_forkserver_preload(["benchmarks.worker"])
        from multiprocessing import forkserver

        forkserver.ensure_running()
    return _CONTEXT


def start(job: Job) -> Handle:
    """Fork a measured process from the pre-imported fork server."""
    context = warm_up()
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(target=child_main, args=(job, sender), name="pgreact-bench")
    process.start()
    sender.close()
    return Handle(process, receiver, job.log_path)


def log_warnings(path: str) -> int:
    """How many warning/error lines the measured process logged."""
    try:
        data = Path(path).read_bytes()
    except OSError:
        return 0
    return sum(
        1
        for line in data.splitlines()
        if b'"level":"warning"' in line or b'"level":"error"' in line or b"Traceback" in line
    )
