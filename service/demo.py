"""``pgreact demo``: a live, self-checking run of the whole pipeline.

What happens, in order:

1. **A database.** Without ``PGREACT_DATABASE_URL`` an embedded PostgreSQL starts in a temporary
   directory (deleted at the end). With it, the demo uses that database but only the schema
   ``pgreact_demo`` (:mod:`pgreact.demo_handlers`), which holds the demo tables *and* pgreact's
   own queue, so nothing else in the database is touched. The schema is re-created at every run
   and left in place afterwards for inspection.
2. **Install and run.** pgreact is installed for the demo router and a :class:`Daemon` runs in
   this process, serving ``/metrics`` (port 9000, or a free port when 9000 is busy).
3. **Produce.** Orders with 1 to 5 lines are written at a steady rate, each in one transaction;
   some orders change status, some lines change quantity or are deleted, so INSERT, UPDATE and
   DELETE all flow. The audit handler fails ~1 % of its events on their first attempt.
4. **Watch.** Once a second: events handled per second, lag, backlog, retries, dead letters.
5. **Check.** When producing stops (duration over, or SIGINT/SIGTERM), the backlog is drained
   (at most :data:`DRAIN_TIMEOUT` seconds; a second Ctrl-C skips the wait), the daemon stops,
   and the derived tables are compared with the source tables. The result is a PASS/FAIL table;
   :func:`run_demo` returns False on any mismatch, dead letter or event left unhandled.
"""

from __future__ import annotations

import contextlib
import errno
import random
import signal
import socket
import sys
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any, TextIO

import anyio
import structlog
from anyio.abc import ObjectReceiveStream, ObjectSendStream
from sqlalchemy import TextClause, text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from pgreact import installer
from pgreact.db import create_write_engine
from pgreact.demo_handlers import (
    AUDIT_HANDLER,
    DEMO_SCHEMA,
    SCHEMA_DDL,
    SCHEMA_MARK,
    TOTALS_HANDLER,
)
from pgreact.devserver import EmbeddedPostgres
from pgreact.errors import ConfigError, DatabaseUnavailable, PgreactError, leaf_errors
from pgreact.metrics import Metrics
from pgreact.router import Router, load_routers
from pgreact.runtime import Daemon
from pgreact.settings import Settings, load_settings, mask_url
from pgreact.store import Store

HANDLER_MODULE = "pgreact.demo_handlers"
HANDLERS = (TOTALS_HANDLER, AUDIT_HANDLER)
DRAIN_TIMEOUT = 60.0
PRODUCER_WORKERS = 8
# Per order created: the chance of one status change, one quantity change, one line deleted.
P_STATUS, P_QTY, P_DELETE = 0.4, 0.2, 0.1

CUSTOMERS = ("ada", "grace", "edsger", "barbara", "donald", "frances", "ken", "margaret")

_S = DEMO_SCHEMA
# An order and its lines in one statement (one round trip): each table's capture trigger
# still fires once for its rows.
_INSERT_ORDER = text(f"""
    WITH o AS (
        INSERT INTO {_S}.orders (customer, status) VALUES (:customer, 'new') RETURNING id
    )
    INSERT INTO {_S}.order_lines (order_id, sku, qty, unit_price)
    SELECT o.id, u.sku, u.qty, u.price
    FROM o, unnest(CAST(:skus AS text[]), CAST(:qtys AS integer[]), CAST(:prices AS numeric[]))
            AS u(sku, qty, price)
    RETURNING order_id, id
""")
_ADVANCE_STATUS = text(f"""
    UPDATE {_S}.orders
    SET status = CASE status WHEN 'new' THEN 'paid' WHEN 'paid' THEN 'shipped'
                             ELSE 'delivered' END
    WHERE id = :id AND status <> 'delivered'
    RETURNING id
""")
_CHANGE_QTY = text(f"UPDATE {_S}.order_lines SET qty = qty % 5 + 1 WHERE id = :id RETURNING id")
_DELETE_LINE = text(f"DELETE FROM {_S}.order_lines WHERE id = :id RETURNING id")


# -- entry point ------------------------------------------------------------------------------


async def run_demo(
    config: Path | None,
    *,
    duration: float = 30.0,
    rate: float = 200.0,
    http_port: int | None = None,
    configure_logs: bool = True,
    out: TextIO | None = None,
) -> bool:
    """Run the demo; True when every check passed.

    ``duration`` 0 produces until SIGINT/SIGTERM. ``configure_logs=False`` leaves the process's
    logging alone (for callers that configured it, such as tests).
    """
    if duration < 0:
        raise ConfigError("--duration must be 0 (until Ctrl-C) or a positive number of seconds")
    if rate <= 0:
        raise ConfigError("--rate must be a positive number of orders per second")
    if http_port is not None and not 0 <= http_port <= 65535:
        raise ConfigError("--http-port must be between 0 and 65535")
    base = load_settings(config)
    if configure_logs:
        _configure_logging(base)
    console = Console(out or sys.stdout)
    control = Control(console)
    ok = False
    try:
        async with anyio.create_task_group() as tg:
            control.abort_scope = tg.cancel_scope
            tg.start_soon(control.watch_signals)
            try:
                ok = await _demo(config, base, duration, rate, http_port, console, control)
            finally:
                tg.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        raise _unwrap(group) from None
    return ok


def _unwrap(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """A task group wraps even a single error; give the caller (and the CLI's exit code mapping)
    the error itself when there is just one."""
    leaves = list(leaf_errors(group))
    return leaves[0] if len(leaves) == 1 else group


async def _demo(
    config: Path | None,
    base: Settings,
    duration: float,
    rate: float,
    http_port: int | None,
    console: Console,
    control: Control,
) -> bool:
    async with contextlib.AsyncExitStack() as stack:
        if base.database_url:
            url, listen_url = base.database_url, base.listen_url
            where = f"{mask_url(url)} (PGREACT_DATABASE_URL), schema {DEMO_SCHEMA}"
        else:
            console.say("pgreact demo: starting an embedded PostgreSQL …")
            pg = await _start_embedded()
            stack.push_async_callback(_shielded, lambda: anyio.to_thread.run_sync(pg.cleanup))
            url = "postgresql+asyncpg://" + pg.url("postgres").removeprefix("postgresql://")
            listen_url = None
            where = f"embedded PostgreSQL on {pg.host}:{pg.port} (deleted at the end)"

        host = base.http_host if "http_host" in base.model_fields_set else "127.0.0.1"
        wanted = http_port if http_port is not None else base.http_port
        port, port_note = pick_http_port(host, wanted)
        settings = load_settings(
            config,
            database_url=url,
            listen_url=listen_url,
            handlers=HANDLER_MODULE,
            schema_name=DEMO_SCHEMA,
            http_host=host,
            http_port=port,
            log_format="console",
            # Fresh gauges for whoever watches /metrics; retries soon, and found soon once no
            # notification wakes the dispatcher any more (the sweep), so the drain is quick.
            stats_interval=1.0,
            sweep_interval=1.0,
            retry_base=0.5,
            retry_max=5.0,
        )
        router = load_routers(settings.require_handlers())
        engine = create_write_engine(settings, application_name="pgreact-demo")
        stack.push_async_callback(_shielded, engine.dispose)
        version = await prepare_database(engine, router, url)

        console.say(f"pgreact demo: {where}")
        console.say(f"  PostgreSQL {version}, write driver {settings.write_driver}")
        console.say(
            f"  {TOTALS_HANDLER}: order_lines → order_totals (on_batch, one upsert per batch)"
        )
        console.say(
            f"  {AUDIT_HANDLER}: orders → audit_log (on, ordered; ~1 % fail their first attempt)"
        )
        how_long = f"for {duration:g} s" if duration else "until Ctrl-C"
        console.say(f"  producing {rate:g} orders/s {how_long}; Ctrl-C stops early and checks")

        daemon = Daemon(settings, router)
        producer = Producer(engine, rate)
        monitor = Monitor(daemon.metrics, engine, producer)
        async with anyio.create_task_group() as tg:
            await tg.start(daemon.run)
            shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host  # noqa: S104
            if port_note:
                console.say(f"  {port_note}; serving on {daemon.http_port} instead")
            console.say(f"  metrics: http://{shown}:{daemon.http_port}/metrics\n")
            finished = anyio.Event()
            tg.start_soon(monitor.report_every_second, console, finished)
            await producer.run(duration, control.stop_producing)
            monitor.phase = "draining"
            drained = await monitor.wait_drained(DRAIN_TIMEOUT, control.skip_drain)
            finished.set()
            daemon.stop()
        console.end_progress()
        if not drained:
            console.say(
                "pgreact demo: the backlog did not drain "
                + ("(skipped)" if control.skip_drain.is_set() else f"within {DRAIN_TIMEOUT:g} s")
            )
        async with engine.connect() as conn:
            checks = await check_derived(conn, producer.stats.expected_audit_rows)
            stats = {s.handler: s for s in await Store(DEMO_SCHEMA).stats(conn)}
        report = Report.build(
            seconds=producer.elapsed,
            target_rate=rate,
            produced=producer.stats,
            checks=checks,
            handled={h: monitor.counter(h, "ok") for h in HANDLERS},
            retries=int(sum(monitor.counter(h, "retry") for h in HANDLERS)),
            dead=sum(s.dead for s in stats.values()),
            backlog=sum(s.pending for s in stats.values()),
        )
        if base.database_url:
            console.say(
                f"\nthe demo data stays in schema {DEMO_SCHEMA} for inspection; "
                f"DROP SCHEMA {DEMO_SCHEMA} CASCADE removes it"
            )
        console.say(report.render())
        return report.ok


async def _shielded(func: Callable[[], Awaitable[Any]]) -> None:
    with anyio.CancelScope(shield=True):
        await func()


# -- set-up -----------------------------------------------------------------------------------


async def _start_embedded() -> EmbeddedPostgres:
    def start() -> EmbeddedPostgres:
        # A throw-away server: commits need not wait for the disk (a crash loses the last
        # moments, never consistency), so the demo measures pgreact rather than fsync.
        try:
            pg = EmbeddedPostgres(settings={"synchronous_commit": "off"})
        except ConfigError as exc:
            raise ConfigError(
                f"{exc}; or set PGREACT_DATABASE_URL to run the demo on your own database "
                f"(it only uses the schema {DEMO_SCHEMA})"
            ) from exc
        try:
            pg.start()
        except BaseException:
            pg.cleanup()
            raise
        return pg

    return await anyio.to_thread.run_sync(start)


def pick_http_port(host: str, wanted: int) -> tuple[int, str | None]:
    """``wanted`` if it can be bound on ``host``, else 0 (any free port) and why."""
    if wanted == 0:
        return 0, None
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the HTTP server does
        try:
            sock.bind((host, wanted))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                return 0, f"port {wanted} is busy"
            raise ConfigError(f"cannot serve metrics on {host}:{wanted}: {exc}") from exc
    return wanted, None


async def prepare_database(engine: AsyncEngine, router: Router, url: str) -> str:
    """(Re-)create the demo schema and install pgreact into it; returns the server version."""
    try:
        async with engine.begin() as conn:
            version = str(await conn.scalar(text("SHOW server_version")))
            exists = await conn.scalar(
                text("SELECT to_regnamespace(:s) IS NOT NULL"), {"s": DEMO_SCHEMA}
            )
            if exists:
                mark = await conn.scalar(
                    text("SELECT obj_description(to_regnamespace(:s), 'pg_namespace')"),
                    {"s": DEMO_SCHEMA},
                )
                if mark != SCHEMA_MARK:
                    raise ConfigError(
                        f"schema {DEMO_SCHEMA!r} already exists in {mask_url(url)} and was not "
                        "created by `pgreact demo`: rename it, or point PGREACT_DATABASE_URL at "
                        "another database (or unset it to use an embedded PostgreSQL)"
                    )
                await conn.exec_driver_sql(f"DROP SCHEMA {DEMO_SCHEMA} CASCADE")
            for statement in SCHEMA_DDL:
                await conn.exec_driver_sql(statement)
        await installer.install(engine, router, DEMO_SCHEMA)
    except PgreactError:
        raise
    except Exception as exc:
        raise DatabaseUnavailable(
            f"cannot prepare the demo in {mask_url(url)}: {type(exc).__name__}: "
            f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        ) from exc
    return version


def _configure_logging(base: Settings) -> None:
    """Console logs at WARNING (the daemon's JSON lines would bury the progress line), minus
    the warnings the demo causes on purpose: the retry counter shows those."""
    from pgreact.logging import configure_logging

    level = base.log_level if "log_level" in base.model_fields_set else "WARNING"
    configure_logging("console", level)
    processors = structlog.get_config()["processors"]
    structlog.configure(processors=[_drop_simulated_failures, *processors])


def _drop_simulated_failures(
    logger: Any, method_name: str, event_dict: structlog.typing.EventDict
) -> structlog.typing.EventDict:
    if (
        event_dict.get("event") == "handler_failed"
        and event_dict.get("outcome") == "retry"
        and "SimulatedFailure" in str(event_dict.get("error", ""))
    ):
        raise structlog.DropEvent
    return event_dict


# -- control and output -----------------------------------------------------------------------


class Console:
    """Progress on one rewritten line on a terminal, one line per update otherwise."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self.tty = stream.isatty()
        self._line_open = False

    def progress(self, line: str) -> None:
        if self.tty:
            self._stream.write(f"\r{line}\x1b[K")
            self._line_open = True
        else:
            self._stream.write(line + "\n")
        self._stream.flush()

    def end_progress(self) -> None:
        if self._line_open:
            self._stream.write("\n")
            self._line_open = False
            self._stream.flush()

    def say(self, message: str) -> None:
        self.end_progress()
        self._stream.write(message + "\n")
        self._stream.flush()


class Control:
    """SIGINT/SIGTERM: the first stops producing (then drain and check), the second stops
    waiting for the drain, the third gives up at once (no summary; the embedded server is
    still stopped and deleted)."""

    def __init__(self, console: Console) -> None:
        self._console = console
        self.stop_producing = anyio.Event()
        self.skip_drain = anyio.Event()
        self.abort_scope: anyio.CancelScope | None = None

    async def watch_signals(self) -> None:
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for signum in signals:
                name = signal.Signals(signum).name
                if not self.stop_producing.is_set():
                    self.stop_producing.set()
                    self._console.say(
                        f"{name}: producing stopped; draining the backlog, then checking "
                        "(again to skip the wait)"
                    )
                elif not self.skip_drain.is_set():
                    self.skip_drain.set()
                    self._console.say(f"{name}: not waiting for the backlog any longer")
                elif self.abort_scope is not None:
                    self._console.say(f"{name}: aborting without a summary")
                    self.abort_scope.cancel()


# -- the producer -----------------------------------------------------------------------------


@dataclass
class ProducerStats:
    """What the producer committed (counted after each commit, from rows the database
    returned)."""

    orders: int = 0
    lines_inserted: int = 0
    status_updates: int = 0
    qty_updates: int = 0
    lines_deleted: int = 0

    @property
    def expected_audit_rows(self) -> int:
        return self.orders + self.status_updates

    @property
    def expected_line_events(self) -> int:
        return self.lines_inserted + self.qty_updates + self.lines_deleted


@dataclass
class Producer:
    """Writes orders at ``rate`` per second with a few worker tasks; never cancelled inside a
    transaction, so its counts are exactly what was committed."""

    engine: AsyncEngine
    rate: float
    workers: int = PRODUCER_WORKERS
    seed: int | None = None
    stats: ProducerStats = field(default_factory=ProducerStats)
    started: float | None = None
    stopped: float | None = None

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)  # noqa: S311 - demo data, not secrets
        self._orders: deque[int] = deque(maxlen=2000)
        self._lines: deque[int] = deque(maxlen=5000)

    @property
    def elapsed(self) -> float:
        if self.started is None:
            return 0.0
        return (self.stopped or time.monotonic()) - self.started

    async def run(self, duration: float, stop: anyio.Event) -> None:
        """Produce for ``duration`` seconds (0: until ``stop``), then let in-flight work end."""
        send, receive = anyio.create_memory_object_stream[None](self.workers)
        self.started = time.monotonic()
        async with anyio.create_task_group() as workers:
            for _ in range(self.workers):
                workers.start_soon(self._worker, receive.clone())
            receive.close()
            async with send, anyio.create_task_group() as pacing:
                if duration > 0:
                    pacing.cancel_scope.deadline = anyio.current_time() + duration
                pacing.start_soon(self._pace, send)
                await stop.wait()
                pacing.cancel_scope.cancel()
        self.stopped = time.monotonic()

    async def _pace(self, send: ObjectSendStream[None]) -> None:
        interval = 1.0 / self.rate
        due = anyio.current_time()
        while True:
            await send.send(None)  # blocks while every worker is busy: back-pressure
            due += interval
            delay = due - anyio.current_time()
            if delay > 0:
                await anyio.sleep(delay)
            elif delay < -1.0:
                due = anyio.current_time()  # fell behind: carry on, do not burst to catch up

    async def _worker(self, receive: ObjectReceiveStream[None]) -> None:
        async with receive:
            async for _ in receive:
                await self.produce_one()

    async def produce_one(self) -> None:
        """One order with its lines, and now and then a change to an earlier order or line,
        all in one transaction (the way an application's unit of work looks)."""
        rng = self._rng
        n = rng.randint(1, 5)
        params = {
            "customer": rng.choice(CUSTOMERS),
            "skus": [f"SKU-{rng.randint(1, 500):04d}" for _ in range(n)],
            "qtys": [rng.randint(1, 5) for _ in range(n)],
            "prices": [Decimal(rng.randint(99, 19999)) / 100 for _ in range(n)],
        }
        # Earlier rows, all committed (ids are remembered only after a commit).
        advance = rng.choice(self._orders) if self._orders and rng.random() < P_STATUS else None
        line_changes: list[tuple[int, TextClause]] = []
        if self._lines and rng.random() < P_QTY:
            line_changes.append((rng.choice(self._lines), _CHANGE_QTY))
        if self._lines and rng.random() < P_DELETE:
            victim = rng.choice(self._lines)
            self._lines.remove(victim)
            line_changes.append((victim, _DELETE_LINE))
        # Deadlock-free among concurrent producers: at most one existing order is locked, before
        # any line, and lines are locked in id order (the sort is stable: an update of a line
        # comes before its deletion).
        line_changes.sort(key=lambda change: change[0])
        async with self.engine.begin() as conn:
            rows = (await conn.execute(_INSERT_ORDER, params)).all()
            advanced = 0 if advance is None else await _changed(conn, _ADVANCE_STATUS, advance)
            changed = [await _changed(conn, stmt, line_id) for line_id, stmt in line_changes]
        # Counted only once committed, so the counts are exactly what the handlers will see.
        self.stats.orders += 1
        self.stats.lines_inserted += len(rows)
        self.stats.status_updates += advanced
        for (_, stmt), count in zip(line_changes, changed, strict=True):
            if stmt is _CHANGE_QTY:
                self.stats.qty_updates += count
            else:
                self.stats.lines_deleted += count
        self._orders.append(int(rows[0][0]))
        self._lines.extend(int(r[1]) for r in rows)


async def _changed(conn: AsyncConnection, statement: TextClause, row_id: int) -> int:
    """Run a single-row statement; 1 if it changed the row, 0 if the row was gone (or, for a
    status, already final)."""
    return len((await conn.execute(statement, {"id": row_id})).all())


# -- watching ---------------------------------------------------------------------------------


@dataclass
class _Sample:
    at: float
    handled: float
    orders: int
    lag_buckets: list[tuple[float, float]]


class Monitor:
    """Reads the daemon's metrics and the queue's state for the progress line."""

    def __init__(self, metrics: Metrics, engine: AsyncEngine, producer: Producer) -> None:
        self._metrics = metrics
        self._engine = engine
        self._producer = producer
        self._store = Store(DEMO_SCHEMA)
        self._last = self._sample()
        self._last_lag: float | None = None
        self.phase = "producing"
        self.backlog: int | None = None
        self.dead: int | None = None

    def counter(self, handler: str, outcome: str) -> float:
        for family in self._metrics.events_handled.collect():
            for s in family.samples:
                labels = s.labels
                if (
                    s.name.endswith("_total")
                    and labels["handler"] == handler
                    and labels["outcome"] == outcome
                ):
                    return float(s.value)
        return 0.0

    def _lag_buckets(self) -> list[tuple[float, float]]:
        """Cumulative counts per upper bound, all demo handlers together."""
        sums: dict[float, float] = {}
        for family in self._metrics.event_lag.collect():
            for s in family.samples:
                if s.name.endswith("_bucket"):
                    bound = float(s.labels["le"])
                    sums[bound] = sums.get(bound, 0.0) + s.value
        return sorted(sums.items())

    def _sample(self) -> _Sample:
        return _Sample(
            at=time.monotonic(),
            handled=sum(self.counter(h, "ok") for h in HANDLERS),
            orders=self._producer.stats.orders,
            lag_buckets=self._lag_buckets(),
        )

    async def refresh_queue(self) -> None:
        try:
            with anyio.fail_after(2):
                async with self._engine.connect() as conn:
                    stats = [s for s in await self._store.stats(conn) if s.handler in HANDLERS]
        except Exception:  # a slow or unreachable database shows as "?" and is retried
            self.backlog = self.dead = None
            return
        self.backlog = sum(s.pending for s in stats)
        self.dead = sum(s.dead for s in stats)

    async def report(self, console: Console) -> None:
        await self.refresh_queue()
        now = self._sample()
        last, self._last = self._last, now
        span = max(now.at - last.at, 1e-6)
        lag = histogram_quantile(0.5, _bucket_delta(now.lag_buckets, last.lag_buckets))
        if lag is not None:
            self._last_lag = lag
        retries = sum(self.counter(h, "retry") for h in HANDLERS)
        orders = (
            f"{now.orders:>7,} orders ({(now.orders - last.orders) / span:>4.0f}/s)"
            if self.phase == "producing"
            else f"{now.orders:>7,} orders (draining)"
        )
        console.progress(
            f"[{self._since_start():6.1f}s] {orders} │ "
            f"handled {(now.handled - last.handled) / span:>6,.0f} ev/s │ "
            f"lag p50 {_ms(self._last_lag)} │ backlog {_num(self.backlog)} │ "
            f"retries {retries:,.0f} │ dead {_num(self.dead)}"
        )

    def _since_start(self) -> float:
        started = self._producer.started
        return 0.0 if started is None else time.monotonic() - started

    async def report_every_second(self, console: Console, finished: anyio.Event) -> None:
        """Report once a second and once more when ``finished`` is set (stopping on a flag
        rather than by cancellation, so no query is ever cut off half-way)."""
        next_at = anyio.current_time()
        while not finished.is_set():
            next_at += 1.0
            with anyio.move_on_after(max(0.0, next_at - anyio.current_time())):
                await finished.wait()
            await self.report(console)

    async def wait_drained(self, limit: float, skip: anyio.Event) -> bool:
        """True once no demo event is waiting (retries included); False after ``limit``
        seconds or once ``skip`` is set."""
        with anyio.move_on_after(limit):
            while not skip.is_set():
                await self.refresh_queue()
                if self.backlog == 0:
                    return True
                await anyio.sleep(0.2)
        return False


def _bucket_delta(
    now: Sequence[tuple[float, float]], before: Sequence[tuple[float, float]]
) -> list[tuple[float, float]]:
    old = dict(before)
    return [(bound, count - old.get(bound, 0.0)) for bound, count in now]


def histogram_quantile(q: float, buckets: Sequence[tuple[float, float]]) -> float | None:
    """Prometheus' ``histogram_quantile`` over cumulative ``(upper bound, count)`` pairs:
    linear interpolation inside the bucket that holds the ``q``-th observation."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower, below = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if bound == float("inf"):
                return lower  # beyond the largest finite bound: that bound is all we know
            if count == below:
                return bound
            return lower + (bound - lower) * (rank - below) / (count - below)
        lower, below = bound, count
    return lower


def _ms(seconds: float | None) -> str:
    if seconds is None:
        return "    -"
    if seconds < 1:
        return f"{seconds * 1000:>3.0f} ms"
    return f"{seconds:>4.1f} s"


def _num(value: int | None) -> str:
    return "?" if value is None else f"{value:,}"


# -- checking ---------------------------------------------------------------------------------

# Every order's lines summed straight from the source, compared with what the handler
# maintained. FULL JOIN: a totals row for an order that has no lines must be a zero row.
_TOTALS_MISMATCHES = text(f"""
    WITH src AS (
        SELECT o.id AS order_id, count(l.id) AS line_count,
               coalesce(sum(l.qty * l.unit_price), 0) AS total
        FROM {_S}.orders o LEFT JOIN {_S}.order_lines l ON l.order_id = o.id
        GROUP BY o.id
    )
    SELECT count(*)
    FROM src FULL JOIN {_S}.order_totals t USING (order_id)
    WHERE coalesce(src.line_count, 0) <> coalesce(t.line_count, 0)
       OR coalesce(src.total, 0) <> coalesce(t.total, 0)
""")
# Audit rows per order must form an unbroken chain (each old_status is the previous row's
# new_status, the first is the INSERT's NULL) that ends in the order's current status.
_AUDIT_CHAIN_BREAKS = text(f"""
    SELECT count(*) FROM (
        SELECT old_status,
               lag(new_status) OVER (PARTITION BY order_id ORDER BY id) AS previous
        FROM {_S}.audit_log
    ) a
    WHERE old_status IS DISTINCT FROM previous
""")
_AUDIT_STALE_ORDERS = text(f"""
    SELECT count(*)
    FROM {_S}.orders o
    LEFT JOIN LATERAL (
        SELECT new_status FROM {_S}.audit_log a WHERE a.order_id = o.id ORDER BY a.id DESC LIMIT 1
    ) latest ON true
    WHERE latest.new_status IS DISTINCT FROM o.status
""")
_COUNTS = text(f"""
    SELECT (SELECT count(*) FROM {_S}.orders),
           (SELECT count(*) FROM {_S}.order_lines),
           (SELECT count(*) FROM {_S}.audit_log),
           (SELECT count(*) - count(DISTINCT event_id) FROM {_S}.audit_log)
""")


@dataclass(frozen=True, slots=True)
class CheckResult:
    orders: int
    lines: int
    totals_mismatches: int
    audit_rows: int
    audit_expected: int
    audit_duplicates: int
    audit_chain_breaks: int
    audit_stale_orders: int

    @property
    def audit_mismatches(self) -> int:
        return (
            abs(self.audit_rows - self.audit_expected)
            + self.audit_duplicates
            + self.audit_chain_breaks
            + self.audit_stale_orders
        )

    @property
    def ok(self) -> bool:
        return self.totals_mismatches == 0 and self.audit_mismatches == 0


async def check_derived(conn: AsyncConnection, expected_audit_rows: int) -> CheckResult:
    """Compare ``order_totals`` and ``audit_log`` with the source tables, in one snapshot."""
    async with conn.begin():
        await conn.execute(text("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY"))
        orders, lines, audit_rows, duplicates = (await conn.execute(_COUNTS)).one()
        totals = await conn.scalar(_TOTALS_MISMATCHES)
        breaks = await conn.scalar(_AUDIT_CHAIN_BREAKS)
        stale = await conn.scalar(_AUDIT_STALE_ORDERS)
    return CheckResult(
        orders=int(orders),
        lines=int(lines),
        totals_mismatches=int(totals or 0),
        audit_rows=int(audit_rows),
        audit_expected=expected_audit_rows,
        audit_duplicates=int(duplicates),
        audit_chain_breaks=int(breaks or 0),
        audit_stale_orders=int(stale or 0),
    )


@dataclass(frozen=True, slots=True)
class _Row:
    label: str
    value: str
    passed: bool | None  # None: information only
    note: str = ""


@dataclass(frozen=True, slots=True)
class Report:
    title: str
    rows: tuple[_Row, ...]

    @property
    def ok(self) -> bool:
        return all(r.passed is not False for r in self.rows)

    @property
    def failures(self) -> int:
        return sum(r.passed is False for r in self.rows)

    @classmethod
    def build(
        cls,
        *,
        seconds: float,
        target_rate: float,
        produced: ProducerStats,
        checks: CheckResult,
        handled: dict[str, float],
        retries: int,
        dead: int,
        backlog: int,
    ) -> Report:
        p, c = produced, checks
        expected = {TOTALS_HANDLER: p.expected_line_events, AUDIT_HANDLER: p.expected_audit_rows}
        got = {h: int(handled.get(h, 0)) for h in HANDLERS}
        audit_detail = [f"{c.audit_rows:,} rows for {c.audit_expected:,} order changes"]
        if c.audit_duplicates:
            audit_detail.append(f"{c.audit_duplicates} duplicated")
        if c.audit_chain_breaks:
            audit_detail.append(f"{c.audit_chain_breaks} out of order")
        if c.audit_stale_orders:
            audit_detail.append(f"{c.audit_stale_orders} orders' last entry ≠ their status")
        rows = (
            _Row(
                "orders",
                f"{c.orders:,}",
                c.orders == p.orders,
                f"created {p.orders:,}, status changes {p.status_updates:,}",
            ),
            _Row(
                "order lines",
                f"{c.lines:,}",
                c.lines == p.lines_inserted - p.lines_deleted,
                f"inserted {p.lines_inserted:,}, qty changes {p.qty_updates:,}, "
                f"deleted {p.lines_deleted:,}",
            ),
            _Row(
                "events handled",
                f"{sum(got.values()):,}",
                got == expected,
                ", ".join(f"{h} {got[h]:,}/{expected[h]:,}" for h in HANDLERS),
            ),
            _Row("retries", f"{retries:,}", None, "simulated first-attempt failures, retried"),
            _Row("dead letters", f"{dead:,}", dead == 0),
            _Row("backlog left", f"{backlog:,}", backlog == 0),
            _Row(
                "order_totals mismatches",
                f"{c.totals_mismatches:,}",
                c.totals_mismatches == 0,
                "per order: total = sum(qty * unit_price), line_count = count(lines)",
            ),
            _Row(
                "audit_log mismatches",
                f"{c.audit_mismatches:,}",
                c.audit_mismatches == 0,
                "; ".join(audit_detail),
            ),
        )
        achieved = p.orders / seconds if seconds > 0 else 0.0
        title = (
            f"pgreact demo summary: {seconds:.1f} s of changes, "
            f"{achieved:.0f} orders/s (asked for {target_rate:g}/s)"
        )
        return cls(title, rows)

    def render(self) -> str:
        width = max(len(r.label) for r in self.rows)
        values = max(len(r.value) for r in self.rows)
        lines = ["", self.title]
        for r in self.rows:
            verdict = {True: "PASS", False: "FAIL", None: "    "}[r.passed]
            line = f"  {r.label:<{width}}  {r.value:>{values}}  {verdict}  {r.note}"
            lines.append(line.rstrip())
        result = "PASS" if self.ok else f"FAIL ({self.failures} of the checks above failed)"
        lines.append(f"RESULT: {result}")
        return "\n".join(lines)
