"""Claims events and runs durable handlers, each batch in the transaction that acks it.

One *driver* task per handler waits for a wake-up (a notification, a sweep, or a finished unit
that may have unblocked the next event of a key) and then starts *units* while there is work.
A unit claims a batch (committed, so the attempt counts even if the process dies), runs the
handler over it inside one transaction on the same connection, and deletes the deliveries in
that transaction: the handler's writes and the ack commit together or not at all.

Running a claimed group through its handler, and isolating the events that fail without
giving up the rest, is the executor's job (``service/executor.py``). Events that failed before
run alone, so a poison event costs one batch re-run, not ten; crash suspects (events whose
process died) run one per process at a time, so a crash is charged to nothing else.

A notification is a hint, and anyone who may connect can send one: a handler whose claim, woken
by hints alone, found nothing leaves further hints waiting for :data:`QUIET_AFTER_EMPTY` seconds
(coalesced into one wake-up), so that a storm of notifications costs a few claims a second, not
one per notification. A real doorbell ring finds the change it announces, so it never enters
that state; a claim that finds work leaves it. Wake-ups that are not hints (the doorbell found
rung when re-armed, a unit that freed a key, a retry falling due, the sweep, the listener
reconnecting) are never held back.
"""

from __future__ import annotations

import gc
import heapq
import time
from collections.abc import Sequence
from dataclasses import dataclass

import anyio
import anyio.abc
import structlog
from anyio.abc import TaskStatus
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from pgreact.db import count_statements, discard_after_driver_error
from pgreact.executor import (
    TRACEBACK_INTERVAL,
    ExecutionContext,
    GroupExecutor,
    PooledConnection,
    Unit,
    describe,
)
from pgreact.logging import Throttle
from pgreact.metrics import Metrics
from pgreact.router import DurableHandler
from pgreact.store import Claimed, Store
from pgreact.watchdog import LoopWatchdog

log = structlog.get_logger("pgreact.dispatcher")

CLAIM_FAILED = -1
CLAIM_TIMEOUT = 30.0  # seconds; a claim takes milliseconds, this only bounds a hung server
RETRY_MIN, RETRY_MAX = 0.1, 1.0  # seconds between claim attempts while the database is away
QUIET_AFTER_EMPTY = 0.2
"""Seconds a handler whose claim found nothing lets notification hints wait (see above)."""


@dataclass(frozen=True, slots=True)
class DispatchConfig:
    concurrency: int = 16
    batch_size: int = 100
    handler_timeout: float = 30.0
    error_log_interval: float = 30.0
    watchdog: LoopWatchdog | None = None


class Wakeup:
    """A coalescing doorbell: any number of rings before ``wait`` returns once. A ring is
    either a *hint* (a notification: may be held back) or not."""

    def __init__(self) -> None:
        self._any = anyio.Event()
        self._firm = anyio.Event()

    def ring(self, *, hint: bool = False) -> None:
        self._any.set()
        if not hint:
            self._firm.set()

    async def wait(self, quiet_until: float = 0.0) -> bool:
        """Return after a ring; hints only once ``quiet_until`` (``time.monotonic()``) passed.
        True when a ring that is not a hint was among them."""
        delay = quiet_until - time.monotonic()
        if delay > 0 and not self._firm.is_set():
            with anyio.move_on_after(delay):
                await self._firm.wait()
        await self._any.wait()
        firm = self._firm.is_set()
        self._any = anyio.Event()
        self._firm = anyio.Event()
        return firm


class Dispatcher:
    """Drives every durable handler; owns its tasks through one task group."""

    def __init__(
        self,
        engine: AsyncEngine,
        store: Store,
        handlers: Sequence[DurableHandler],
        metrics: Metrics,
        config: DispatchConfig,
    ) -> None:
        self._engine = engine
        count_statements(engine)  # tells a failing call that wrote nothing (the executor)
        self._store = store
        self._handlers = list(handlers)
        self._metrics = metrics
        self._config = config
        self._slots = anyio.Semaphore(config.concurrency)
        self._wakeups = {h.name: Wakeup() for h in self._handlers}
        self._handler_metrics = {h.name: metrics.for_handler(h.name) for h in self._handlers}
        self._claiming = {h.name: anyio.Lock() for h in self._handlers}
        self._by_table: dict[str, list[str]] = {}
        for h in self._handlers:
            self._by_table.setdefault(h.table.qualified, []).append(h.name)
        self._units: dict[int, Unit] = {}
        # Claim tokens: this process's owner id in the high bits, a counter in the low bits.
        # Unique across processes (fencing) and ordered within one (see ``claims_snapshot``).
        self._token_base = store.owner << 32
        self._token_seq = 0
        self._stopping = False
        # Per handler, when each scheduled retry falls due (a heap: every one must wake it).
        self._retry_due: dict[str, list[float]] = {h.name: [] for h in self._handlers}
        self._idle: set[str] = set()
        self._suspect_inflight = False
        self._suspect_denied: set[str] = set()  # handlers that claimed without a suspect
        self._may_claim = anyio.Event()
        self._arming = False
        self._tg: anyio.abc.TaskGroup | None = None
        self._error_lines = Throttle(config.error_log_interval)
        tracebacks = Throttle(TRACEBACK_INTERVAL)
        self._contexts = {
            h.name: ExecutionContext(
                store,
                self._handler_metrics[h.name],
                config.handler_timeout,
                self._retry_at,
                self._log_error,
                tracebacks,
                config.watchdog,
            )
            for h in self._handlers
        }

    # -- control --------------------------------------------------------------------------

    def wake(self, table: str | None = None, *, hint: bool = False) -> None:
        """Ring the handlers of ``table`` (all handlers when ``None`` or unknown); ``hint``: a
        notification, which a handler that just found nothing may hold back."""
        names = self._by_table.get(table, ()) if table is not None else ()
        for name in names or self._wakeups:
            self._wakeups[name].ring(hint=hint)

    def stop_claiming(self) -> None:
        self._stopping = True
        self._may_claim.set()
        for wakeup in self._wakeups.values():
            wakeup.ring()

    def claims_snapshot(self) -> tuple[list[int], int]:
        """(tokens of units in flight, highest token issued so far). The reaper may take back
        our own claims only below that watermark: a unit that starts after the snapshot is
        still busy claiming, not abandoned."""
        return list(self._units), self._token_base + self._token_seq

    @property
    def busy(self) -> bool:
        return bool(self._units)

    def in_flight(self) -> dict[str, int]:
        """Per handler, the claims held by units still running."""
        held: dict[str, int] = {}
        for unit in self._units.values():
            name = unit.handler.name
            held[name] = held.get(name, 0) + len(unit.open_ids)
        return held

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Run until :meth:`stop_claiming`; returns once every in-flight unit has finished."""
        # Everything allocated so far (modules, SQLAlchemy's caches, the handlers) lives as long
        # as the process: out of the collector's sight, a full collection no longer walks it,
        # which took tens of milliseconds in the middle of handling events (latency tail).
        gc.freeze()
        async with anyio.create_task_group() as tg:
            self._tg = tg
            for handler in self._handlers:
                tg.start_soon(self._drive, handler, name=f"drive:{handler.name}")
            task_status.started()

    def _retry_at(self, handler: str, delay: float) -> None:
        """Wake ``handler`` when a retry falls due, instead of waiting for the next sweep."""
        heapq.heappush(self._retry_due[handler], time.monotonic() + delay)

    def _release_suspect_slot(self) -> None:
        self._suspect_inflight = False
        # Claims that went without crash suspects while the slot was taken: let them try again.
        denied, self._suspect_denied = self._suspect_denied, set()
        for name in denied:
            self._wakeups[name].ring()

    # -- idle: re-arm the doorbell ----------------------------------------------------------

    def _check_idle(self) -> None:
        """When every handler waits and no unit runs, the writers' doorbell must be armed again,
        or the next change would wait for a sweep instead of ringing."""
        if (
            self._arming
            or self._stopping
            or self._units
            or self._tg is None
            or len(self._idle) < len(self._handlers)
        ):
            return
        self._arming = True
        self._tg.start_soon(self._rearm, name="rearm-doorbell")

    async def _rearm(self) -> None:
        try:
            async with self._engine.connect() as conn:
                rang = await self._store.arm_doorbell(conn)
            if rang:
                self.wake()  # catch what was committed between the ring and the re-arm
        except Exception as exc:
            self._log_error("rearm_failed", "*", exc)
        finally:
            self._arming = False

    async def _wait_for_work(self, handler: str, wakeup: Wakeup, quiet_until: float) -> bool:
        """Wait for a wake-up; True unless hints alone woke the handler."""
        self._idle.add(handler)
        self._check_idle()
        try:
            return await self._wait_for_wakeup(handler, wakeup, quiet_until)
        finally:
            self._idle.discard(handler)

    async def _wait_for_wakeup(self, handler: str, wakeup: Wakeup, quiet_until: float) -> bool:
        due = self._retry_due[handler]
        if not due:
            return await wakeup.wait(quiet_until)
        firm = True  # a retry falling due
        with anyio.move_on_after(max(0.0, due[0] - time.monotonic()) + 0.01):
            firm = await wakeup.wait(quiet_until)
        now = time.monotonic()
        while due and due[0] <= now:
            heapq.heappop(due)
            firm = True
        return firm

    # -- per handler ----------------------------------------------------------------------

    def allow_claims(self) -> None:
        """Start claiming. The runtime calls this once this process holds its presence lock
        (or gives up waiting for it): a claim made before that would look abandoned to other
        replicas, which would take it over and run the handler a second time."""
        self._may_claim.set()

    async def _drive(self, handler: DurableHandler) -> None:
        limit = handler.max_size if handler.batch else self._config.batch_size
        wakeup = self._wakeups[handler.name]
        retry_delay = RETRY_MIN
        quiet_until = 0.0  # hints wait until then (a claim woken by hints alone found nothing)
        await self._may_claim.wait()
        async with anyio.create_task_group() as units:
            while not self._stopping:
                by_hints = not await self._wait_for_work(handler.name, wakeup, quiet_until)
                while not self._stopping:
                    await self._slots.acquire()
                    if self._stopping:
                        self._slots.release()
                        break
                    claimed: int = await units.start(self._unit, handler, limit)
                    if claimed == CLAIM_FAILED:
                        # The database did not answer: try again soon, not at the next sweep, and
                        # at once if a wake-up says it is back (the listener reconnected).
                        with anyio.move_on_after(retry_delay):
                            await wakeup.wait()
                        retry_delay = min(RETRY_MAX, retry_delay * 2)
                        continue
                    retry_delay = RETRY_MIN
                    if claimed == 0 and by_hints:
                        quiet_until = time.monotonic() + QUIET_AFTER_EMPTY
                    elif claimed > 0:
                        quiet_until = 0.0
                    by_hints = False
                    if claimed < limit:
                        break

    async def _unit(
        self, handler: DurableHandler, limit: int, *, task_status: TaskStatus[int]
    ) -> None:
        self._token_seq = (self._token_seq + 1) % (1 << 32)
        unit = Unit(handler, self._token_base + self._token_seq)
        self._units[unit.token] = unit
        started = False
        reason: BaseException | str = "interrupted by shutdown before it finished"
        try:
            async with self._engine.connect() as first:
                claimed = await self._claim(first, unit, limit)
                unit.open_ids = {c.delivery_id for c in claimed}
                task_status.started(len(claimed))
                started = True
                if claimed:
                    conn = PooledConnection(self._engine, first)
                    try:
                        await self._work(conn, unit, claimed)
                    finally:
                        await conn.close()
            if unit.freed:
                # The next event of a key may be free now. (A failure with a retry to come
                # frees nothing: the event still heads its key, and the retry wakes us.)
                self._wakeups[handler.name].ring()
        except Exception as exc:
            if not started:
                task_status.started(CLAIM_FAILED)
            self._log_error("unit_failed", handler.name, exc)
            reason = exc
        finally:
            # Whatever is still held (an unexpected error, or cancellation at the drain
            # deadline) is given back with its attempt refunded.
            if unit.open_ids:
                await self._give_back(unit, reason)
            if unit.holds_suspect:
                self._release_suspect_slot()
            self._units.pop(unit.token, None)
            self._slots.release()
            self._check_idle()

    async def _claim(self, conn: AsyncConnection, unit: Unit, limit: int) -> list[Claimed]:
        """Claim a batch for ``unit``. One claim at a time per handler in this process: claims
        running side by side all scan the same head of the queue and skip each other's rows,
        which cost the server more than the claims themselves."""
        handler = unit.handler
        async with self._claiming[handler.name]:
            # At most one crash suspect (an event whose process died before) in flight per
            # process: if it kills the process, nothing else is blamed.
            take_suspect = not self._suspect_inflight
            self._suspect_inflight = True
            if not take_suspect:
                self._suspect_denied.add(handler.name)
            try:
                # The claim commits on the server whether or not its answer arrives: shielded,
                # so that a shutdown cannot cancel it between the two and orphan the batch.
                with anyio.CancelScope(shield=True), anyio.fail_after(CLAIM_TIMEOUT):
                    claimed = await self._store.claim(
                        conn, handler.name, limit, unit.token, suspects=int(take_suspect)
                    )
            except BaseException as exc:
                if take_suspect:
                    self._release_suspect_slot()
                if isinstance(exc, Exception):
                    await discard_after_driver_error(conn, exc)
                raise
        unit.holds_suspect = take_suspect and any(c.crashed for c in claimed)
        if take_suspect and not unit.holds_suspect:
            self._release_suspect_slot()
        return claimed

    async def _work(self, conn: PooledConnection, unit: Unit, claimed: list[Claimed]) -> None:
        handler = unit.handler
        executor = GroupExecutor(conn, unit, self._contexts[handler.name])
        # A crash suspect runs first, alone and committed alone: if it kills the process, nothing
        # else is blamed for it. Once it is settled, the process may take the next one, while
        # this unit goes on with the others.
        for suspect in (c for c in claimed if c.crashed):
            await executor.run([], alone=[suspect])
        if unit.holds_suspect:
            unit.holds_suspect = False
            self._release_suspect_slot()
        # Events whose handler raised before run alone too, at the head of the first group's
        # transaction: one that fails again before writing costs nothing else; one that fails
        # after writing takes only the retries before it back (they run again).
        retries = [c for c in claimed if c.failed_before and not c.crashed]
        fresh = [c for c in claimed if not (c.failed_before or c.crashed)]
        size = handler.max_size if handler.batch else max(1, len(fresh))
        for start in range(0, max(1, len(fresh)), size):
            await executor.run(fresh[start : start + size], alone=retries if start == 0 else [])

    async def _give_back(self, unit: Unit, reason: BaseException | str) -> None:
        """After an unexpected failure or cancellation, return what the unit still holds (best
        effort: if the database is unreachable, the reaper returns it once this unit's token is
        gone)."""
        log.info(
            "claims_given_back",
            handler=unit.handler.name,
            count=len(unit.open_ids),
            reason=reason if isinstance(reason, str) else describe(reason),
        )
        with anyio.CancelScope(shield=True), anyio.move_on_after(5):
            try:
                async with self._engine.connect() as conn:
                    await self._store.fail_transient(conn, sorted(unit.open_ids), unit.token)
                unit.open_ids.clear()
            except Exception as exc:
                self._log_error("give_back_failed", unit.handler.name, exc)

    def _log_error(self, event: str, handler: str, exc: BaseException) -> None:
        """Log database trouble at most once per interval per handler: a database that is down
        for a minute must not produce thousands of identical lines."""
        if self._error_lines.ready((event, handler)):
            log.warning(event, handler=handler, error=_brief(exc))


def _brief(error: BaseException) -> str:
    """One line for database trouble: the driver's own first line, without the SQL statement
    and parameters SQLAlchemy appends (kilobytes per line, and parameters are user data)."""
    orig = getattr(error, "orig", None)
    base = orig if isinstance(orig, BaseException) else error
    lines = str(base).strip().splitlines()
    return f"{type(base).__name__}: {lines[0] if lines else ''}"[:300]
