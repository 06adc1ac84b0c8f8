"""Claims events and runs durable handlers, each batch in the transaction that acks it.

One *driver* task per handler waits for a wake-up (a notification, a sweep, or a finished unit
that may have unblocked the next event of a key) and then starts *units* while there is work.
A unit claims a batch (committed, so the attempt counts even if the process dies), runs the
handler over it inside one transaction on the same connection, and deletes the deliveries in
that transaction: the handler's writes and the ack commit together or not at all.

Failures are isolated rather than letting one bad event sink its batch:
- ``on`` handlers: the failing call is known; it is recorded, the rest of the batch re-runs.
- ``on_batch`` handlers: the batch is split in halves until the failing events are alone.
- events that failed before run alone, so a poison event costs one batch re-run, not ten.
"""

from __future__ import annotations

import contextlib
import gc
import heapq
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field

import anyio
import anyio.abc
import structlog
from anyio.abc import TaskStatus
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession

from service.calls import HandlerCalls
from service.db import connection_is_suspect, driver_disconnect, is_transient
from service.errors import HandlerMisuse, LeaseLost
from service.metrics import Metrics, observe_many
from service.router import DurableHandler
from service.store import Claimed, Store

log = structlog.get_logger("pgreact.dispatcher")

CLAIM_FAILED = -1
_PROBE = text("SELECT 1")
CLAIM_TIMEOUT = 30.0  # seconds; a claim takes milliseconds, this only bounds a hung server
RETRY_MIN, RETRY_MAX = 0.1, 1.0  # seconds between claim attempts while the database is away


@dataclass(frozen=True, slots=True)
class DispatchConfig:
    concurrency: int = 16
    batch_size: int = 100
    handler_timeout: float = 30.0
    error_log_interval: float = 30.0


class Wakeup:
    """A coalescing doorbell: any number of rings before ``wait`` returns once."""

    def __init__(self) -> None:
        self._event = anyio.Event()

    def ring(self) -> None:
        self._event.set()

    async def wait(self) -> None:
        await self._event.wait()
        self._event = anyio.Event()


class _Connection:
    """A pooled connection checked out lazily and thrown away when its state is unknown."""

    def __init__(self, engine: AsyncEngine, first: AsyncConnection | None = None) -> None:
        self._engine = engine
        self._conn = first
        self._owned = first is None

    async def get(self) -> AsyncConnection:
        if self._conn is None:
            self._conn = await self._engine.connect()
            self._owned = True
        return self._conn

    async def discard(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        # Already broken: invalidation and close are best effort.
        with contextlib.suppress(Exception):
            await conn.invalidate()
        if self._owned:
            with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
                await conn.close()

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and self._owned:
            with anyio.CancelScope(shield=True):
                await conn.close()


@dataclass
class _Outcome:
    ok: bool = False
    lease_lost: bool = False
    error: BaseException | None = None
    failed_index: int | None = None  # which event of an ``on`` batch raised


@dataclass(eq=False)
class _Pending:
    """A group of events still to run in a unit. A failed batch is split in two; if the first
    half then succeeds, its ``sibling`` (the second half) is known to hold the failure."""

    group: list[Claimed]
    sibling: _Pending | None = None
    failing: bool = False


def _halves(group: list[Claimed]) -> list[_Pending]:
    half = len(group) // 2
    second = _Pending(group[half:])
    return [_Pending(group[:half], sibling=second), second]


@dataclass
class _Unit:
    handler: DurableHandler
    token: int
    open_ids: set[int] = field(default_factory=set)


class HandlerSession(AsyncSession):
    """The session handlers get. pgreact owns the transaction (it commits the handler's writes
    together with the ack), so a handler that commits or rolls back is a bug: say so loudly
    instead of silently breaking exactly-once."""

    async def commit(self) -> None:
        raise HandlerMisuse(
            "handlers must not call session.commit(): pgreact commits the handler's writes "
            "together with the event's ack; just return"
        )

    async def rollback(self) -> None:
        raise HandlerMisuse(
            "handlers must not call session.rollback(): raise an exception instead, and "
            "pgreact rolls back and retries the event"
        )


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
        self._units: dict[int, _Unit] = {}
        # Claim tokens: this process's owner id in the high bits, a counter in the low bits.
        # Unique across processes (fencing) and ordered within one (see ``claims_snapshot``).
        self._token_base = store.owner << 32
        self._token_seq = 0
        self._stopping = False
        # Per handler, when each scheduled retry falls due (a heap: every one must wake it).
        self._retry_due: dict[str, list[float]] = {h.name: [] for h in self._handlers}
        self._idle: set[str] = set()
        self._suspect_inflight = False
        self._suspect_denied = False
        self._may_claim = anyio.Event()
        self._arming = False
        self._tg: anyio.abc.TaskGroup | None = None
        self._last_error_log: dict[str, float] = {}

    # -- control --------------------------------------------------------------------------

    def wake(self, table: str | None = None) -> None:
        """Ring the handlers of ``table`` (all handlers when ``None`` or unknown)."""
        names = self._by_table.get(table, ()) if table is not None else ()
        for name in names or self._wakeups:
            self._wakeups[name].ring()

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
        if self._suspect_denied:
            # Some claim went without suspects while the slot was taken: let them try again.
            self._suspect_denied = False
            self.wake()

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

    async def _wait_for_work(self, handler: str, wakeup: Wakeup) -> None:
        self._idle.add(handler)
        self._check_idle()
        try:
            await self._wait_for_wakeup(handler, wakeup)
        finally:
            self._idle.discard(handler)

    async def _wait_for_wakeup(self, handler: str, wakeup: Wakeup) -> None:
        due = self._retry_due[handler]
        if not due:
            await wakeup.wait()
            return
        with anyio.move_on_after(max(0.0, due[0] - time.monotonic()) + 0.01):
            await wakeup.wait()
        now = time.monotonic()
        while due and due[0] <= now:
            heapq.heappop(due)

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
        await self._may_claim.wait()
        async with anyio.create_task_group() as units:
            while not self._stopping:
                await self._wait_for_work(handler.name, wakeup)
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
                    if claimed < limit:
                        break

    async def _unit(
        self, handler: DurableHandler, limit: int, *, task_status: TaskStatus[int]
    ) -> None:
        self._token_seq = (self._token_seq + 1) % (1 << 32)
        unit = _Unit(handler, self._token_base + self._token_seq)
        self._units[unit.token] = unit
        started = False
        holds_suspect = False
        reason: BaseException | str = "interrupted by shutdown before it finished"
        try:
            async with self._engine.connect() as first:
                claimed = await self._claim(first, unit, limit)
                holds_suspect = any(c.failed_before for c in claimed)
                unit.open_ids = {c.delivery_id for c in claimed}
                task_status.started(len(claimed))
                started = True
                if claimed:
                    conn = _Connection(self._engine, first)
                    try:
                        await self._work(conn, unit, claimed)
                    finally:
                        await conn.close()
            if claimed:
                self._wakeups[handler.name].ring()  # the next event of a key may be free now
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
            if holds_suspect:
                self._release_suspect_slot()
            self._units.pop(unit.token, None)
            self._slots.release()
            self._check_idle()

    async def _claim(self, conn: AsyncConnection, unit: _Unit, limit: int) -> list[Claimed]:
        """Claim a batch for ``unit``. One claim at a time per handler in this process: claims
        running side by side all scan the same head of the queue and skip each other's rows,
        which cost the server more than the claims themselves."""
        handler = unit.handler
        async with self._claiming[handler.name]:
            # At most one suspect (an event that failed or was abandoned before) in flight per
            # process: if it kills the process, nothing else is blamed.
            take_suspect = not self._suspect_inflight
            self._suspect_inflight = True
            self._suspect_denied |= not take_suspect
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
                    await self._claim_failed(conn, exc)
                raise
        if take_suspect and not any(c.failed_before for c in claimed):
            self._release_suspect_slot()
        return claimed

    @staticmethod
    async def _claim_failed(conn: AsyncConnection, exc: Exception) -> None:
        """The claim ran on the driver beneath SQLAlchemy, which did not see its error. Never
        hand the connection back; and if the server went away, let SQLAlchemy see that too, so
        that it retires the pool's other connections (as dead as this one) instead of handing
        them out one failed claim at a time."""
        with contextlib.suppress(Exception):
            if driver_disconnect(exc):
                await conn.execute(_PROBE)
        with contextlib.suppress(Exception):
            await conn.invalidate()

    async def _work(self, conn: _Connection, unit: _Unit, claimed: list[Claimed]) -> None:
        handler = unit.handler
        fresh = [c for c in claimed if not c.failed_before]
        groups: list[list[Claimed]] = [[c] for c in claimed if c.failed_before]
        if handler.batch:
            size = handler.max_size
            groups += [fresh[i : i + size] for i in range(0, len(fresh), size)]
        elif fresh:
            groups.append(fresh)
        todo = [_Pending(g) for g in groups if g]
        while todo:
            pending = todo.pop(0)
            group = pending.group
            if pending.failing and len(group) > 1:
                # Its batch failed and the other half succeeded: the failure is in here, so
                # running it whole again would only fail again. Split it straight away.
                todo[:0] = _halves(group)
                continue
            outcome = await self._attempt(conn, unit, group)
            if outcome.lease_lost:
                # Some of the group was taken over; give back what is still ours (fenced by
                # the token, so rows another process holds are untouched).
                ids = [c.delivery_id for c in group]
                await self._store.release(await conn.get(), ids, unit.token)
            if outcome.ok or outcome.lease_lost:
                unit.open_ids.difference_update(c.delivery_id for c in group)
                if outcome.ok and pending.sibling is not None:
                    pending.sibling.failing = True
                continue
            error = outcome.error or RuntimeError("handler failed without an exception")
            if is_transient(error):
                await self._transient(conn, unit, group, error)
                continue
            if handler.batch and len(group) > 1:
                todo[:0] = _halves(group)
                continue
            index = outcome.failed_index if outcome.failed_index is not None else 0
            await self._record_failure(conn, unit, group[index], error)
            rest = group[:index] + group[index + 1 :]
            if rest:
                todo.insert(0, _Pending(rest))

    async def _attempt(self, conn: _Connection, unit: _Unit, group: list[Claimed]) -> _Outcome:
        handler = unit.handler
        metrics = self._handler_metrics[handler.name]
        outcome = _Outcome()
        calls = HandlerCalls(handler, self._config.handler_timeout)
        handled = False
        try:
            db = await conn.get()
            session = HandlerSession(bind=db, expire_on_commit=False)
            async with session, session.begin():
                await calls.run([c.event for c in group], session)
                handled = True
                acked = await self._store.ack(
                    await session.connection(), [c.delivery_id for c in group], unit.token
                )
                if acked != len(group):
                    raise LeaseLost(f"{len(group) - acked} of {len(group)} events were taken over")
        except LeaseLost as exc:
            metrics.lease_conflicts.inc()
            log.warning("lease_lost", handler=handler.name, detail=str(exc))
            outcome.lease_lost = True
            return outcome
        except Exception as exc:
            outcome.error = exc
            outcome.failed_index = None if handled else calls.current
            if connection_is_suspect(exc):
                await conn.discard()
            return outcome
        finally:
            observe_many(metrics.duration, calls.durations)
        now = time.time()
        metrics.ok.inc(len(group))
        observe_many(metrics.lag, [max(0.0, now - c.created) for c in group])
        log.debug("handled", handler=handler.name, events=len(group))
        outcome.ok = True
        return outcome

    async def _record_failure(
        self, conn: _Connection, unit: _Unit, item: Claimed, error: BaseException
    ) -> None:
        handler = unit.handler
        event = item.event
        message = _describe(error, self._config.handler_timeout)
        db = await conn.get()
        result = await self._store.fail(db, item.delivery_id, unit.token, message)
        unit.open_ids.discard(item.delivery_id)
        if result is None:
            self._handler_metrics[handler.name].lease_conflicts.inc()
            return
        dead, retry_in = result
        if not dead:
            self._retry_at(handler.name, retry_in)
        outcome = "dead" if dead else "retry"
        metrics = self._handler_metrics[handler.name]
        (metrics.dead if dead else metrics.retry).inc()
        logger = log.error if dead else log.warning
        logger(
            "handler_failed",
            handler=handler.name,
            table=event.table,
            op=event.op,
            event_id=event.id,
            delivery_id=item.delivery_id,
            attempt=event.attempt,
            outcome=outcome,
            error=message,
            exc_info=error if not isinstance(error, TimeoutError) else None,
        )

    async def _transient(
        self, conn: _Connection, unit: _Unit, group: list[Claimed], error: BaseException
    ) -> None:
        handler = unit.handler
        self._handler_metrics[handler.name].transient_errors.inc()
        self._log_error("transient_error", handler.name, error)
        ids = [c.delivery_id for c in group]
        db = await conn.get()
        await self._store.fail_transient(db, ids, unit.token)
        unit.open_ids.difference_update(ids)
        self._retry_at(handler.name, self._store.retry_base)

    async def _give_back(self, unit: _Unit, reason: BaseException | str) -> None:
        """After an unexpected failure or cancellation, return what the unit still holds (best
        effort: if the database is unreachable, the reaper returns it once this unit's token is
        gone)."""
        log.info(
            "claims_given_back",
            handler=unit.handler.name,
            count=len(unit.open_ids),
            reason=reason if isinstance(reason, str) else _describe(reason, 0),
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
        now = time.monotonic()
        key = f"{event}:{handler}"
        if now - self._last_error_log.get(key, -1e9) < self._config.error_log_interval:
            return
        self._last_error_log[key] = now
        log.warning(event, handler=handler, error=_brief(exc))


def _brief(error: BaseException) -> str:
    """One line for database trouble: the driver's own first line, without the SQL statement
    and parameters SQLAlchemy appends (kilobytes per line, and parameters are user data)."""
    orig = getattr(error, "orig", None)
    base = orig if isinstance(orig, BaseException) else error
    lines = str(base).strip().splitlines()
    return f"{type(base).__name__}: {lines[0] if lines else ''}"[:300]


def _describe(error: BaseException, timeout: float) -> str:
    if isinstance(error, TimeoutError):
        return f"handler timed out after {timeout:g} s (PGREACT_HANDLER_TIMEOUT)"
    text = f"{type(error).__name__}: {error}"
    if not str(error):
        tb = traceback.format_exception_only(type(error), error)
        text = "".join(tb).strip()
    return text
