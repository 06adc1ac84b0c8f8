"""Notices when something blocks the event loop, says who, and keeps the account of it.

A handler that calls ``time.sleep`` or computes for seconds inside ``async def`` stops every
other task of the process: timers cannot fire, so its own timeout cannot cancel it, and the
other handlers in flight look, once the loop moves again, as if *they* had overrun theirs.

A tick task notes the time every ``interval``; a thread looks at that note. When the loop has
not ticked for ``threshold`` seconds, the thread finds what the loop thread is running (its
Python stack) and asks ``blame`` which unit of work that is, then logs the stall while it lasts.
When the loop moves again, the whole gap is added to :attr:`LoopWatchdog.stalled` and to the
account of the one blamed (``Blamable.charge_stall``): a handler call then knows how much of its
elapsed time was somebody else's stall (not charged as its timeout) and how much its own.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import Protocol

import anyio
import structlog

log = structlog.get_logger("pgreact.watchdog")


class Blamable(Protocol):
    """What a stall can be charged to (a handler call in progress)."""

    def charge_stall(self, seconds: float) -> None: ...

    def stall_context(self) -> dict[str, object]: ...


class LoopWatchdog:
    def __init__(
        self,
        threshold: float,
        blame: Callable[[FrameType], Blamable | None],
        interval: float | None = None,
    ) -> None:
        self.threshold = threshold
        self.interval = interval if interval is not None else min(0.25, max(0.02, threshold / 4))
        self._blame = blame
        self._last_tick = time.monotonic()
        self.stalled = 0.0  # seconds the loop stood still, over all stalls so far
        self.stalls = 0
        # Set by the thread during a stall, with the tick the stall began after: a verdict the
        # thread reached just as the loop moved again must not be charged to the next stall.
        self._culprit: tuple[float, Blamable | None] = (-1.0, None)
        self._loop_thread: int | None = None
        self._stop = threading.Event()

    # -- in the event loop --------------------------------------------------------------------

    async def run(self) -> None:
        """Tick until cancelled, with the watching thread running beside."""
        self._loop_thread = threading.get_ident()
        self._last_tick = time.monotonic()
        self._stop.clear()
        thread = threading.Thread(target=self._watch, name="pgreact-loop-watchdog", daemon=True)
        thread.start()
        try:
            while True:
                await anyio.sleep(self.interval)
                self.settle()
        finally:
            self._stop.set()

    def settle(self) -> float:
        """Account for the time since the last tick (a stall if it is long) and return
        :attr:`stalled`. Called by the tick, and by whoever needs the account up to now."""
        now = time.monotonic()
        began = self._last_tick
        gap = now - began - self.interval
        self._last_tick = now
        if gap >= self.threshold:
            stamp, culprit = self._culprit
            if stamp != began:
                culprit = None
            self.stalled += gap
            self.stalls += 1
            if culprit is not None:
                culprit.charge_stall(gap)
            log.warning(
                "event_loop_unblocked",
                blocked_for=round(gap, 3),
                charged_to=culprit.stall_context() if culprit is not None else None,
            )
        return self.stalled

    # -- in the thread ------------------------------------------------------------------------

    def _watch(self) -> None:
        while not self._stop.wait(self.interval):
            began = self._last_tick
            late = time.monotonic() - began - self.interval
            if late < self.threshold or self._culprit[0] == began:
                continue  # ticking, or this stall is reported already
            frame = sys._current_frames().get(self._loop_thread or 0)
            culprit = self._blame(frame) if frame is not None else None
            self._culprit = (began, culprit)
            log.error(
                "event_loop_blocked",
                blocked_for=round(late, 3),
                where=_where(frame),
                handler_call=culprit.stall_context() if culprit is not None else None,
                hint="a blocking call (time.sleep, synchronous I/O, long CPU work) inside an "
                "async handler stops the whole process: await, or use anyio.to_thread.run_sync",
            )


def _where(frame: FrameType | None) -> str | None:
    """The innermost line the loop thread is running."""
    if frame is None:
        return None
    return f"{frame.f_code.co_filename}:{frame.f_lineno} in {frame.f_code.co_name}"
