"""``on_notify`` handlers: raw NOTIFY channels, at-most-once, never blocking the listener.

The listener's callback only offers a notification to a bounded buffer; one consumer task calls
the handlers. A full buffer drops (and counts) rather than stalling the LISTEN connection.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from collections.abc import Sequence

import anyio
import structlog
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from pgreact.events import Notification
from pgreact.metrics import Metrics
from pgreact.router import NotifyHandler

log = structlog.get_logger("pgreact.notify")


class NotifyDispatcher:
    def __init__(
        self,
        handlers: Sequence[NotifyHandler],
        metrics: Metrics,
        *,
        timeout: float,
        buffer: int = 1000,
    ) -> None:
        self._by_channel: dict[str, list[NotifyHandler]] = defaultdict(list)
        for handler in handlers:
            self._by_channel[handler.channel].append(handler)
        self._metrics = metrics
        self._timeout = timeout
        self._send: MemoryObjectSendStream[Notification]
        self._receive: MemoryObjectReceiveStream[Notification]
        self._send, self._receive = anyio.create_memory_object_stream[Notification](buffer)

    @property
    def channels(self) -> list[str]:
        return sorted(self._by_channel)

    def offer(self, note: Notification) -> None:
        """Called from the listener's callback: enqueue or drop, never wait."""
        try:
            self._send.send_nowait(note)
        except anyio.WouldBlock:
            self._metrics.notifications_dropped.labels(note.channel).inc()

    async def run(self) -> None:
        try:
            async for note in self._receive:
                for handler in self._by_channel.get(note.channel, ()):
                    await self._call(handler, note)
        finally:
            self.close()

    def close(self) -> None:
        self._send.close()
        self._receive.close()

    async def _call(self, handler: NotifyHandler, note: Notification) -> None:
        started = time.perf_counter()
        try:
            with anyio.fail_after(self._timeout):
                await handler.func(note)
        except BaseException as exc:
            if isinstance(exc, anyio.get_cancelled_exc_class()) and _being_cancelled():
                raise  # shutdown
            # Anything else, SystemExit and KeyboardInterrupt included, fails this notification
            # only: a handler does not get to stop the daemon.
            self._metrics.events_handled.labels(handler.name, "dead").inc()
            log.warning(
                "notify_handler_failed",
                handler=handler.name,
                channel=note.channel,
                payload=note.payload[:200],
                pid=note.pid,
                error=f"{type(exc).__name__}: {exc}",
                exc_info=not isinstance(exc, TimeoutError),
            )
        else:
            self._metrics.events_handled.labels(handler.name, "ok").inc()
        finally:
            elapsed = time.perf_counter() - started
            self._metrics.handler_duration.labels(handler.name).observe(elapsed)


def _being_cancelled() -> bool:
    task = asyncio.current_task()
    return task is None or task.cancelling() > 0
