"""Runs a claimed group of events through its handler, in as few transactions as failures allow.

The fast path is one transaction: the handler's calls, the ack, one commit. When a call fails,
the failing event is put on record and the others go on, in the same transaction where
possible. The failures are recorded and the other events acked in one commit.

A call that fails without having sent a statement (a handler that refuses its event before
writing: the usual poison) leaves the transaction as it found it: nothing is rolled back, and
the calls before it keep what they wrote. A call that fails after writing spoils what shares its
transaction: from then on, once some of a transaction's work has succeeded, each further part
(a *segment*: one batch call, or a run of ``on`` calls) runs under a savepoint, so that a
failing segment is rolled back alone. A transaction's first segment needs no savepoint: if it
fails, there is nothing to keep, and the transaction starts again without it.

Which events to blame:
- ``on`` handlers: the event of the failing call. The calls after it run as a segment, and so
  do the calls before it, again, if their writes went with it.
- ``on_batch`` handlers: if the handler's iteration over its events stopped early, the event it
  stopped at is run apart from the others; otherwise the batch is split in halves, and again,
  until the failing events are alone.
- if the commit itself fails (a deferred constraint, say), no segment can be blamed: each then
  runs in a transaction of its own.

Savepoints are not used on the fast path, nor after failures that wrote nothing: SAVEPOINT and
RELEASE are two more round trips, which per call, or even per sixteen calls of a cheap ``on``
handler, cost more than re-running the calls before a rare failure.

A transient error (lost connection, serialization failure, …) gives the whole group back with
its attempts refunded, as does anything the unit cannot finish (see the dispatcher). Only
pgreact's own database work, and a handler's statements through its session, can fail
transiently: whatever else a handler raises (an ``OSError`` of its HTTP client, say) is an
attempt of its event.

A handler that ends the transaction itself (a raw ``COMMIT``) fails, and is noticed at once: the
writes of the calls before it in that transaction are committed, so their events are acked
without running again; a ``ROLLBACK`` (or an end whose kind is unknown) undid them, so they run
again.
"""

from __future__ import annotations

import contextlib
import time
import traceback
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio
import sqlalchemy.exc
import structlog
from sqlalchemy.engine import Transaction
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession
from sqlalchemy.ext.asyncio.session import AsyncSessionTransaction

from pgreact.calls import EventLoopBlocked, HandlerCalls
from pgreact.db import (
    connection_alive,
    connection_is_suspect,
    discard_after_driver_error,
    driver_in_transaction,
    forget_transaction_end,
    handler_failure_is_transient,
    is_transient,
    note_connection_taken,
    sqlstate_of,
    statements_sent,
    transaction_probe,
)
from pgreact.errors import HandlerMisuse, LeaseLost
from pgreact.logging import Throttle
from pgreact.metrics import HandlerMetrics, observe_many
from pgreact.router import DurableHandler
from pgreact.store import Claimed, Store
from pgreact.watchdog import LoopWatchdog

log = structlog.get_logger("pgreact.dispatcher")

TRACEBACK_INTERVAL = 60.0
"""Seconds between two tracebacks of the same failure (handler, exception type, line)."""


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

    async def close(self) -> None:
        # Closing ends the transaction, with the writes of the calls before this one in it.
        raise HandlerMisuse(
            "handlers must not close the session (nor use it in `async with`): pgreact owns "
            "it and its transaction"
        )

    async def reset(self) -> None:
        await self.close()

    async def invalidate(self) -> None:
        await self.close()

    async def end(self) -> None:
        """pgreact's own close: ends the session and rolls back what it did not commit."""
        await AsyncSession.close(self)

    async def connection(self, *args: Any, **kwargs: Any) -> AsyncConnection:
        conn = await super().connection(*args, **kwargs)
        # A handler with the connection may write beneath SQLAlchemy, where statements are not
        # counted: if its call fails, what shares its transaction is not known to be intact.
        note_connection_taken(conn)
        return conn


class PooledConnection:
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

    async def end_transaction(self) -> None:
        """Roll back what a session left behind: after a failed COMMIT, closing the session
        does not end the connection's transaction."""
        if self._conn is not None:
            await self._conn.rollback()  # also ends a transaction that is no longer active

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
class Unit:
    """One claim being worked on: its token fences every write, ``open_ids`` is what it still
    holds (given back if the unit cannot finish)."""

    handler: DurableHandler
    token: int
    open_ids: set[int] = field(default_factory=set)
    holds_suspect: bool = False  # the process's one suspect in flight (see the dispatcher)
    freed: bool = False  # acked, dead-lettered or released something: later events may be free


@dataclass(eq=False)
class _Segment:
    """Events that run together: one batch call, or a run of ``on`` calls. A failed segment
    split in two links its halves: if the first succeeds, the ``sibling`` holds the failure."""

    events: list[Claimed]
    sibling: _Segment | None = None
    failing: bool = False


@dataclass
class _Failure:
    error: BaseException
    blame: int | None  # index into the segment's events, when known
    lost: bool  # the transaction is gone (no savepoint to return to, or a broken connection)
    kept: int = 0  # leading events of the segment whose calls succeeded and whose writes stand
    transient: bool = False  # database trouble, not the event's fault
    suspect: bool = False  # the connection's state is unknown: throw it away
    committed: bool = False  # the handler committed the transaction: ``kept`` are committed


def _halves(events: list[Claimed]) -> list[_Segment]:
    half = len(events) // 2
    second = _Segment(events[half:])
    return [_Segment(events[:half], sibling=second), second]


def _ids(segments: list[_Segment]) -> list[int]:
    return [c.delivery_id for s in segments for c in s.events]


@dataclass(frozen=True, slots=True)
class ExecutionContext:
    """What the groups of one handler run with, shared by all its units."""

    store: Store
    metrics: HandlerMetrics
    handler_timeout: float
    retry_at: Callable[[str, float], None]  # wake the handler when a retry falls due
    log_error: Callable[[str, str, BaseException], None]  # database trouble, rate-limited
    tracebacks: Throttle  # which failures get their traceback logged
    watchdog: LoopWatchdog | None = None  # tells a call that blocked the loop from its victims


class GroupExecutor:
    """Runs the groups of one unit, each to the end: acked, recorded as failed, or given back."""

    def __init__(self, conn: PooledConnection, unit: Unit, context: ExecutionContext) -> None:
        self._conn = conn
        self._unit = unit
        self._handler = unit.handler
        self._store = context.store
        self._metrics = context.metrics
        self._timeout = context.handler_timeout
        self._retry_at = context.retry_at
        self._log_error = context.log_error
        self._tracebacks = context.tracebacks
        self._watchdog = context.watchdog
        self._separate = False  # a transaction per segment (after a COMMIT failed)
        self._savepoints = False  # a segment under a savepoint (after a failure that wrote)
        self._todo: deque[_Segment] = deque()
        self._failures: list[tuple[Claimed, BaseException]] = []
        # Events whose writes a handler's own COMMIT made permanent: to be acked, not rerun.
        self._committed: list[Claimed] = []

    async def run(self, group: list[Claimed], alone: Sequence[Claimed] = ()) -> None:
        """Run ``group`` through the handler, after each event of ``alone`` on its own (events
        that failed before: run first, a failing one needs no savepoint)."""
        self._separate = self._savepoints = False
        self._todo.extend(_Segment([c]) for c in alone)
        if group:
            self._todo.append(_Segment(group))
        while self._todo or self._failures or self._committed:
            await self._transaction()

    # -- one transaction --------------------------------------------------------------------

    async def _transaction(self) -> None:
        if not self._todo and not self._committed:
            await self._record_failures_alone()
            return
        db = await self._conn.get()
        session = HandlerSession(bind=db, expire_on_commit=False)
        done: list[_Segment] = []
        try:
            txn = await session.begin()
            await session.connection()  # begins the connection's transaction (no round trip)
            root = _root_transaction(db)
            sent = statements_sent(db.info)
            forget_transaction_end(db.info)
            probe = transaction_probe(db)
            while self._todo:
                segment = self._todo.popleft()
                if segment.failing and len(segment.events) > 1:
                    # Its sibling succeeded, so the failure is in here: running it whole again
                    # would only fail again. Split it straight away.
                    self._todo.extendleft(reversed(_halves(segment.events)))
                    continue
                failure = await self._run_segment(
                    session, db, probe, segment, savepoint=bool(done) and self._savepoints
                )
                if failure is None:
                    done.append(segment)
                    if segment.sibling is not None:
                        segment.sibling.failing = True
                    if self._separate:
                        break
                    continue
                if failure.transient:
                    await self._abandon(session, failure.error, suspect=True)
                    await self._give_back_transient([*done, segment], failure.error)
                    return
                if failure.committed:
                    # Its COMMIT made what ran before it permanent: ack that, never rerun it.
                    self._committed += [c for s in done for c in s.events]
                    self._committed += segment.events[: failure.kept]
                    self._isolate(segment, failure)
                    await self._abandon(session, failure.error, suspect=True)
                    return
                if failure.kept:
                    done.append(_Segment(segment.events[: failure.kept]))
                self._isolate(segment, failure)
                if failure.lost:
                    # What ran in this transaction is undone: run it again in the next one.
                    self._todo.extendleft(reversed(done))
                    await self._abandon(session, failure.error, suspect=failure.suspect)
                    return
                if self._separate and done:
                    break
            intact = root is not None and root.is_active and _root_transaction(db) is root
            wrote = statements_sent(db.info) != sent
            await self._commit(session, txn, done, intact=intact and txn.is_active, wrote=wrote)
        finally:
            with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
                await session.end()

    async def _run_segment(
        self,
        session: AsyncSession,
        db: AsyncConnection,
        probe: Callable[[], bool],
        segment: _Segment,
        *,
        savepoint: bool,
    ) -> _Failure | None:
        info = db.info
        calls = HandlerCalls(
            self._handler, self._timeout, info, watchdog=self._watchdog, in_transaction=probe
        )
        nested = await session.begin_nested() if savepoint else None
        try:
            await calls.run([c.event for c in segment.events], session)
            if nested is not None:
                await nested.commit()  # RELEASE SAVEPOINT
            return None
        except Exception as exc:
            if calls.ended is not None:
                # The handler ended the transaction: the savepoint went with it.
                self._savepoints = True
                committed = calls.ended == "COMMIT"
                kept = (calls.blame or 0) if committed and not self._handler.batch else 0
                return _Failure(exc, calls.blame, True, kept, suspect=True, committed=committed)
            transient = handler_failure_is_transient(exc, info, alive=await connection_alive(db))
            suspect = transient or _leaves_connection_unknown(exc)
            if transient:
                return _Failure(exc, calls.blame, lost=True, transient=True, suspect=True)
            if calls.untouched and not suspect:
                # The failing call sent nothing: the transaction stands, and for an ``on``
                # handler so do the writes of the calls before it.
                kept = 0 if self._handler.batch else calls.blame or 0
                try:
                    if nested is not None:
                        await nested.commit()
                    return _Failure(exc, calls.blame, lost=False, kept=kept)
                except Exception:
                    return _Failure(exc, calls.blame, lost=True)
            self._savepoints = True
            lost = nested is None or suspect
            if not lost and nested is not None:
                try:
                    await nested.rollback()  # ROLLBACK TO SAVEPOINT
                except Exception:
                    lost = suspect = True
            return _Failure(exc, calls.blame, lost, suspect=suspect)
        finally:
            observe_many(self._metrics.duration, calls.durations)

    def _isolate(self, segment: _Segment, failure: _Failure) -> None:
        """Put the failing event on record, or split the segment to find it."""
        events = segment.events
        blame = failure.blame
        if len(events) == 1 or (failure.committed and self._handler.batch):
            # (A batch call that committed the transaction itself: each of its events fails.)
            self._failures += [(c, failure.error) for c in events]
            return
        if blame is None or not 0 <= blame < len(events):
            self._todo.extendleft(reversed(_halves(events)))
        elif self._handler.batch:
            # The handler stopped at this event: it alone first (if the guess is right, it fails
            # before anything needs a savepoint), then the others.
            others = events[:blame] + events[blame + 1 :]
            self._todo.extendleft([_Segment(others), _Segment([events[blame]])])
        else:
            # The failing call is on record; the calls before it succeeded and, unless their
            # writes stand (kept), run again, then the calls after it.
            self._failures.append((events[blame], failure.error))
            parts = (events[failure.kept : blame], events[blame + 1 :])
            self._todo.extendleft(reversed([_Segment(part) for part in parts if part]))

    # -- the end of a transaction ---------------------------------------------------------

    async def _commit(
        self,
        session: HandlerSession,
        txn: AsyncSessionTransaction,
        done: list[_Segment],
        *,
        intact: bool,
        wrote: bool,
    ) -> None:
        """Settle the transaction's events and commit. ``intact``: the transaction begun for
        them is still the connection's; ``wrote``: statements were sent in it."""
        committed, self._committed = self._committed, []
        ids = [c.delivery_id for c in committed] + _ids(done)
        failures, self._failures = self._failures, []
        try:
            db = await session.connection()
            # The ack must commit with the handlers' writes: not if a handler ended their
            # transaction through its connection (another may have begun since), nor, as it runs
            # beneath SQLAlchemy, on its own outside any.
            if not intact or (wrote and not await driver_in_transaction(db)):
                raise HandlerMisuse(
                    "the transaction ended before pgreact committed it: a handler committed, "
                    "rolled back or closed it through its connection"
                )
            acked, recorded = await self._settle(db, ids, failures)
            if acked != len(ids):
                raise LeaseLost(f"{len(ids) - acked} of {len(ids)} events were taken over")
            await txn.commit()
        except LeaseLost as exc:
            await self._lease_lost(session, ids + [c.delivery_id for c, _ in failures], exc)
            return
        except Exception as exc:
            self._failures = failures  # not on record: record them in the next transaction
            self._committed = committed + self._committed
            await self._abandon(session, exc)
            if is_transient(exc):
                await self._give_back_transient(done, exc)
            elif self._separate and done:
                # One segment per transaction, and its commit failed: it is the one to blame.
                self._isolate(done[0], _Failure(exc, None, lost=True))
            elif done:
                # Which segment the commit failed for is unknown: one transaction each.
                self._separate = True
                self._todo.extendleft(reversed(done))
            # else only failures were to commit: they are recorded on their own next (raising
            # here would give them back with their attempts refunded, to fail again forever)
            return
        self._unit.open_ids.difference_update(ids)
        self._report_failures(failures, recorded)
        if done or committed:
            self._unit.freed = True
            now = time.time()
            events = committed + [c for s in done for c in s.events]
            self._metrics.ok.inc(len(events))
            observe_many(self._metrics.lag, [max(0.0, now - c.created) for c in events])
            log.debug("handled", handler=self._handler.name, events=len(events))

    async def _settle(
        self, db: AsyncConnection, ids: list[int], failures: list[tuple[Claimed, BaseException]]
    ) -> tuple[int, list[tuple[bool, float] | None]]:
        """Ack ``ids`` and put ``failures`` on record inside the transaction open on ``db``:
        how many acks were ours, and per failure its outcome (None: no longer ours)."""
        failed = [(c.delivery_id, self._describe(e)) for c, e in failures]
        try:
            acked, recorded = await self._store.settle(db, ids, failed, self._unit.token)
        except Exception as exc:
            # Run beneath SQLAlchemy, which did not see the error: the connection goes.
            lost = await discard_after_driver_error(db, exc)
            await self._conn.discard()
            if lost:
                raise ConnectionError(f"connection lost: {exc}") from exc  # transient
            raise
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self._conn.discard()  # cancelled mid-statement: its state is unknown
            raise
        return acked, [recorded.get(c.delivery_id) for c, _ in failures]

    async def _record_failures_alone(self) -> None:
        """Failures with nothing else to commit: one statement each, no transaction."""
        failures, self._failures = self._failures, []
        db = await self._conn.get()
        token = self._unit.token
        try:
            recorded = [
                await self._store.record_failure_alone(db, c.delivery_id, token, self._describe(e))
                for c, e in failures
            ]
        except Exception as exc:
            await discard_after_driver_error(db, exc)
            await self._conn.discard()
            raise
        self._report_failures(failures, recorded)

    async def _abandon(
        self, session: HandlerSession, error: BaseException, *, suspect: bool | None = None
    ) -> None:
        """Roll the transaction back; throw the connection away if its state is unknown
        (``suspect``; by default judged from ``error``, an error of pgreact's own work)."""
        if suspect is None:
            suspect = connection_is_suspect(error)
        with anyio.CancelScope(shield=True):
            with contextlib.suppress(Exception):
                await session.end()
            try:
                await self._conn.end_transaction()
            except Exception:
                suspect = True  # the rollback failed: its state is unknown
        if suspect:
            await self._conn.discard()

    async def _lease_lost(self, session: HandlerSession, ids: list[int], exc: LeaseLost) -> None:
        """Some of the group was taken over; give back what is still ours (fenced by the
        token, so rows another process holds are untouched)."""
        self._metrics.lease_conflicts.inc()
        log.warning("lease_lost", handler=self._handler.name, detail=str(exc))
        with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
            await session.end()
        await self._store.release(await self._conn.get(), ids, self._unit.token)
        self._unit.open_ids.difference_update(ids)
        self._unit.freed = True

    async def _give_back_transient(self, segments: list[_Segment], error: BaseException) -> None:
        """Not the events' fault: give them back, and whatever was still to run, with the
        attempt refunded, retried soon. The failures already seen are recorded in the same
        transaction."""
        segments = [*segments, *self._todo]
        self._todo.clear()
        failures, self._failures = self._failures, []
        committed, self._committed = self._committed, []
        self._metrics.transient_errors.inc()
        self._log_error("transient_error", self._handler.name, error)
        ids = _ids(segments)
        acks = [c.delivery_id for c in committed]  # their writes are committed: never rerun
        db = await self._conn.get()
        _, recorded = await self._settle(db, acks, failures) if failures or acks else (0, [])
        await self._store.fail_transient(db, ids, self._unit.token)  # commits
        self._unit.open_ids.difference_update(ids + acks)
        self._report_failures(failures, recorded)
        self._retry_at(self._handler.name, self._store.retry_base)

    def _report_failures(
        self,
        failures: list[tuple[Claimed, BaseException]],
        recorded: list[tuple[bool, float] | None],
    ) -> None:
        metrics = self._metrics
        for (item, error), result in zip(failures, recorded, strict=True):
            self._unit.open_ids.discard(item.delivery_id)
            if result is None:  # no longer ours
                metrics.lease_conflicts.inc()
                continue
            dead, retry_in = result
            self._unit.freed |= dead
            if not dead:
                self._retry_at(self._handler.name, retry_in)
            (metrics.dead if dead else metrics.retry).inc()
            event = item.event
            fields: dict[str, object] = {}
            if not isinstance(error, TimeoutError):
                # The same failure over and over (a poison event's retries, a bad deploy) gets
                # its traceback once a minute: formatting one costs more than handling events.
                if self._tracebacks.ready((self._handler.name, *_failure_site(error))):
                    fields["exc_info"] = error
                else:
                    fields["traceback"] = f"as logged in the last {TRACEBACK_INTERVAL:g} s"
            (log.error if dead else log.warning)(
                "handler_failed",
                handler=self._handler.name,
                table=event.table,
                op=event.op,
                event_id=event.id,
                delivery_id=item.delivery_id,
                attempt=event.attempt,
                outcome="dead" if dead else "retry",
                error=self._describe(error),
                **fields,
            )

    def _describe(self, error: BaseException) -> str:
        if isinstance(error, TimeoutError) and not isinstance(error, EventLoopBlocked):
            return f"handler timed out after {self._timeout:g} s (PGREACT_HANDLER_TIMEOUT)"
        return describe(error)


def _leaves_connection_unknown(error: BaseException) -> bool:
    """After a handler's failure, whether its connection may be in an unknown state: a call
    cancelled mid-statement, or the driver itself unhappy (no SQLSTATE)."""
    if isinstance(error, TimeoutError):
        return True
    return isinstance(error, sqlalchemy.exc.DBAPIError) and sqlstate_of(error) is None


def _root_transaction(db: AsyncConnection) -> Transaction | None:
    """The connection's own (outermost) transaction, if one is open."""
    sync = db.sync_connection
    return None if sync is None else sync.get_transaction()


def _failure_site(error: BaseException) -> tuple[str, str, int]:
    """Where ``error`` was raised: its type, and the file and line of the innermost frame."""
    tb = error.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is None:
        return type(error).__qualname__, "", 0
    return type(error).__qualname__, tb.tb_frame.f_code.co_filename, tb.tb_lineno


DESCRIBE_LIMIT = 4000
"""Characters of an error's text kept in a log line or a failure record: a driver error can
quote a statement of megabytes (70,000 bind parameters)."""


def describe(error: BaseException) -> str:
    """An error in one line or a few: its type and message, cut at :data:`DESCRIBE_LIMIT`."""
    text = f"{type(error).__name__}: {error}"
    if not str(error):
        tb = traceback.format_exception_only(type(error), error)
        text = "".join(tb).strip()
    if len(text) > DESCRIBE_LIMIT:
        text = f"{text[:DESCRIBE_LIMIT]}… ({len(text) - DESCRIBE_LIMIT} more characters)"
    return text
