"""Calling one durable handler over a group of events: per-call timeout, duration and log context.

This runs once per event for ``on`` handlers, so it is built to cost next to nothing per call:
one timer per group instead of a cancel scope per call (the timer, when it fires, looks at when
the call in progress started), and the event's log fields in one context variable instead of a
``bind_contextvars`` per field. Together these were most of the daemon's own CPU per event.

When a call fails, the caller wants to know which event to blame: for ``on`` handlers it is the
event of the failing call; for ``on_batch`` handlers it is a guess, the event the handler was
iterating over when it raised (see :class:`WatchedEvents`), which the caller verifies. And
whether the failing call left the transaction as it found it (it sent no statement, did not
take the session's connection, and left nothing pending in the session): then what the calls
before it wrote still stands.

A handler call fails, as an attempt of its event, also when it:
- raises a ``BaseException`` that is not our cancellation (``SystemExit``, ``KeyboardInterrupt``,
  a ``CancelledError`` of its own): :class:`HandlerAborted`, instead of ending the process;
- ends pgreact's transaction (a raw ``COMMIT`` or ``ROLLBACK``): ``HandlerMisuse``, noticed right
  after the call, with :attr:`HandlerCalls.ended` saying whether the writes before it are now
  committed (see the executor);
- blocks the event loop for longer than its timeout: :class:`EventLoopBlocked` (see
  ``pgreact.watchdog``). The time other calls in flight lost to a stall they did not cause is
  not counted against their timeouts.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator, Sequence
from types import FrameType
from typing import Any

import anyio
from sqlalchemy.ext.asyncio import AsyncSession

from pgreact.db import activity, transaction_ended
from pgreact.errors import HandlerMisuse
from pgreact.events import Event
from pgreact.logging import handling, reset_handling
from pgreact.router import DurableHandler
from pgreact.watchdog import LoopWatchdog


class HandlerAborted(Exception):
    """A handler raised a ``BaseException`` (``SystemExit``, ``KeyboardInterrupt``, …): it fails
    the event like any other error, and pgreact keeps running."""


class EventLoopBlocked(TimeoutError):
    """A handler call blocked the event loop for longer than the handler timeout."""


class WatchedEvents(list[Event]):
    """The events of one batch call, noting how far the handler's iteration got. A handler that
    checks or converts its events in a loop raises while holding the one it cannot handle: if
    the iteration stopped early, that event is the first to suspect."""

    __slots__ = ("finished", "reached")

    def __init__(self, events: Sequence[Event]) -> None:
        super().__init__(events)
        self.reached = -1
        self.finished = False

    def __iter__(self) -> Iterator[Event]:
        self.finished = False  # what counts is the iteration in progress when it raised
        for index, event in enumerate(list.__iter__(self)):
            self.reached = index
            yield event
        self.finished = True

    @property
    def stopped_at(self) -> int | None:
        """The event an unfinished iteration stopped at, if any."""
        return None if self.finished or self.reached < 0 else self.reached


class HandlerCalls:
    """Runs ``handler`` over ``events`` in the caller's transaction.

    After :meth:`run` raises, :attr:`blame` is the index of the event to blame, when known: the
    event of the failing call of an ``on`` handler, or for an ``on_batch`` handler the event its
    iteration stopped at; :attr:`untouched` says whether the failing call sent no statement on
    the connection whose ``info`` dictionary is given (see ``pgreact.db.count_statements``),
    did not take that connection, and left nothing pending in the session. Writes the handler
    left pending in the session are flushed after each call, so that their errors count against
    that call. A call that runs longer than ``timeout`` seconds is cancelled and surfaces as
    :class:`TimeoutError`.
    """

    def __init__(
        self,
        handler: DurableHandler,
        timeout: float,
        info: dict[Any, Any] | None = None,
        *,
        watchdog: LoopWatchdog | None = None,
        in_transaction: Callable[[], bool] | None = None,
    ) -> None:
        self.handler = handler
        self.timeout = timeout
        self.current = 0
        self.blame: int | None = None
        self.untouched = False
        # How the failing call ended pgreact's transaction: "COMMIT" (what was written before
        # it is committed), "ROLLBACK", "?" (unknown); None if it did not.
        self.ended: str | None = None
        self.own_stall = 0.0  # seconds of loop stalls charged to these calls
        self._info = info
        self._watchdog = watchdog
        self._in_transaction = in_transaction
        self._event: Event | None = None
        self._stall_base = 0.0  # the watchdog's account when the current call began
        self._own_base = 0.0
        self.durations: list[float] = []
        self._started = 0.0
        self._expired = False
        self._scope = anyio.CancelScope()
        self._loop = asyncio.get_running_loop()  # built inside the task that runs the calls
        self._timer: asyncio.TimerHandle | None = None

    async def run(self, events: Sequence[Event], session: AsyncSession) -> None:
        loop = self._loop
        handler = self.handler
        with self._scope:
            self._started = loop.time()
            self._timer = loop.call_at(self._started + self.timeout, self._check)
            try:
                if handler.batch:
                    watched = WatchedEvents(events)
                    try:
                        await self._call(watched, session, events[0])
                    except BaseException:
                        self.blame = watched.stopped_at
                        raise
                else:
                    for index, event in enumerate(events):
                        self.current = index
                        try:
                            await self._call(event, session, event)
                        except BaseException:
                            self.blame = index
                            raise
            finally:
                if self._timer is not None:
                    self._timer.cancel()
        if self._expired:
            raise self._blocked() or TimeoutError(f"handler call exceeded {self.timeout:g} s")

    async def _call(self, arg: object, session: AsyncSession, event: Event) -> None:
        self._started = started = self._loop.time()
        self._event = event
        watchdog = self._watchdog
        if watchdog is not None:
            self._stall_base, self._own_base = watchdog.stalled, self.own_stall
        token = handling(
            {
                "handler": self.handler.name,
                "table": event.table,
                "event_id": event.id,
                "op": event.op,
                "attempt": event.attempt,
            }
            if not self.handler.batch
            else {"handler": self.handler.name, "table": event.table}
        )
        info = self._info
        before = None if info is None else activity(info)
        # Asked of the sync session: through the async proxy this check cost ~2.4 µs a call.
        pending = session.sync_session
        probe = self._in_transaction
        began = probe is not None and probe()
        try:
            await self.handler.func(arg, session)
            if pending.new or pending.deleted or pending.dirty:
                await session.flush()
            if info is not None and before is not None:
                self._check_transaction(info, before, began)
        except BaseException as exc:
            self.untouched = (
                before is not None
                and before[0] is not None
                and info is not None
                and activity(info) == before
                and pending.is_active  # not left needing a rollback (a failed flush)
                and not (pending.new or pending.deleted or pending.dirty)
            )
            if isinstance(exc, anyio.get_cancelled_exc_class()) and _being_cancelled():
                raise  # ours: the timeout (``run`` says which), or shutdown
            error: Exception | None = self._overran(started)
            if error is None and not isinstance(exc, Exception):
                error = HandlerAborted(
                    f"the handler raised {type(exc).__name__}({', '.join(map(repr, exc.args))})"
                    ": it fails this event, it does not stop pgreact"
                )
            if error is None:
                raise
            raise error from exc
        else:
            error = self._overran(started)
            if error is not None:
                raise error
        finally:
            reset_handling(token)
            self.durations.append(self._loop.time() - started)

    def _check_transaction(
        self, info: dict[Any, Any], before: tuple[int | None, int], began: bool
    ) -> None:
        """Fail the call that ended pgreact's transaction, right away: the calls after it would
        otherwise write outside any transaction (asyncpg) or in another one (psycopg).
        ``began``: the driver's connection was inside a transaction block before the call."""
        ended = transaction_ended(info)
        probe = self._in_transaction
        if ended is None and began and probe is not None and activity(info)[1] != before[1]:
            # It took the connection: it may have ended the transaction beneath SQLAlchemy.
            ended = None if probe() else "?"
        if ended is None:
            return
        self.ended = ended
        raise HandlerMisuse(
            f"the handler ended pgreact's transaction ({'COMMIT' if ended == '?' else ended} "
            "or the like through its session or connection): handlers must not commit or roll "
            "back; pgreact commits their writes together with the event's ack"
        )

    def _overran(self, started: float) -> EventLoopBlocked | None:
        """After a call that took longer than the timeout: whether it was blocking the loop."""
        watchdog = self._watchdog
        if watchdog is None or self._loop.time() - started <= self.timeout:
            return None
        watchdog.settle()  # the stall may have ended just now, before the watchdog ticked
        return self._blocked()

    def _blocked(self) -> EventLoopBlocked | None:
        own = self.own_stall - self._own_base
        if own <= 0:
            return None
        return EventLoopBlocked(
            f"the handler blocked the event loop for {own:.1f} s, longer than its "
            f"{self.timeout:g} s (PGREACT_HANDLER_TIMEOUT), and nothing else could run: call "
            "blocking code (time.sleep, synchronous I/O, long computations) through "
            "anyio.to_thread.run_sync, not directly in an async handler"
        )

    # -- the watchdog's view (``pgreact.watchdog.Blamable``) ---------------------------------

    def charge_stall(self, seconds: float) -> None:
        self.own_stall += seconds

    def stall_context(self) -> dict[str, object]:
        event = self._event
        context: dict[str, object] = {"handler": self.handler.name}
        if event is not None and not self.handler.batch:
            context["event_id"] = event.id
        return context

    def _check(self) -> None:
        """Timer callback: cancel the call in progress if it is overdue, else look again when
        it will be. Time the loop stood still because of another call is not this call's."""
        due = self._started + self.timeout
        now = self._loop.time()
        watchdog = self._watchdog
        if now >= due and watchdog is not None:
            others = watchdog.settle() - self._stall_base - (self.own_stall - self._own_base)
            due += max(0.0, others)
        if now >= due:
            self._expired = True
            self._scope.cancel()
        else:
            self._timer = self._loop.call_at(due, self._check)


def _being_cancelled() -> bool:
    """Whether the current task has a cancellation pending (a ``CancelledError`` that is not a
    handler's own)."""
    task = asyncio.current_task()
    return task is None or task.cancelling() > 0


def blocking_call(frame: FrameType) -> HandlerCalls | None:
    """The handler call whose code the loop thread is running (``frame``: its innermost
    frame), found by walking out to :meth:`HandlerCalls._call`: for the watchdog."""
    current: FrameType | None = frame
    while current is not None:
        if current.f_code is _CALL_CODE:
            calls = current.f_locals.get("self")
            return calls if isinstance(calls, HandlerCalls) else None
        current = current.f_back
    return None


_CALL_CODE = HandlerCalls._call.__code__
