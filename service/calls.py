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
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Sequence
from typing import Any

import anyio
from sqlalchemy.ext.asyncio import AsyncSession

from pgreact.db import activity
from pgreact.events import Event
from pgreact.logging import handling, reset_handling
from pgreact.router import DurableHandler


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
        self, handler: DurableHandler, timeout: float, info: dict[Any, Any] | None = None
    ) -> None:
        self.handler = handler
        self.timeout = timeout
        self.current = 0
        self.blame: int | None = None
        self.untouched = False
        self._info = info
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
            raise TimeoutError(f"handler call exceeded {self.timeout:g} s")

    async def _call(self, arg: object, session: AsyncSession, event: Event) -> None:
        self._started = started = self._loop.time()
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
        try:
            await self.handler.func(arg, session)
            if pending.new or pending.deleted or pending.dirty:
                await session.flush()
        except BaseException:
            self.untouched = (
                before is not None
                and before[0] is not None
                and info is not None
                and activity(info) == before
                and pending.is_active  # not left needing a rollback (a failed flush)
                and not (pending.new or pending.deleted or pending.dirty)
            )
            raise
        finally:
            reset_handling(token)
            self.durations.append(self._loop.time() - started)

    def _check(self) -> None:
        """Timer callback: cancel the call in progress if it is overdue, else look again when
        it will be."""
        due = self._started + self.timeout
        if self._loop.time() >= due:
            self._expired = True
            self._scope.cancel()
        else:
            self._timer = self._loop.call_at(due, self._check)
