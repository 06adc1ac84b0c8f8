"""An in-process listener backend for unit tests, with fault hooks.

:class:`MemoryBroker` plays the PostgreSQL server: channels, ``pg_notify``, a few well-known
queries, and the faults a real deployment sees::

    broker = MemoryBroker()
    backend = MemoryBackend(broker)
    broker.notify("jobs", "42")        # NOTIFY jobs, '42' (delivered synchronously, in order)
    broker.drop_all()                  # every connection is lost: wait_closed() returns
    broker.refuse_connections(True)    # server down: connect() raises ListenerConnectError
    broker.stall(True)                 # network partition / half-open TCP: see below

While stalled, the broker behaves like a peer that silently stopped answering: nothing is
delivered to existing connections (notifications are held), their ``listen``/``notify``/
``fetch_value`` calls hang, and ``connect()`` hangs until its ``connect_timeout`` and then raises
:class:`ListenerConnectError`. ``stall(False)`` heals the partition: held notifications are
delivered to connections still open and hung calls proceed.

``fetch_value`` answers by the first registered pattern (case-insensitive substring) found in
the SQL — see :meth:`MemoryBroker.set_value`; by default ``pg_notification_queue_usage`` (the
broker's ``queue_usage``), advisory lock functions (``True``), ``pg_backend_pid`` and ``pg_notify``
(which really notifies). Unknown queries return ``None``. Every query is recorded in
``broker.queries``.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Collection
from typing import Final

import anyio

from pgreact.listeners.protocol import (
    ListenerConnectError,
    ListenerConnection,
    ListenerLost,
    Notification,
    NotificationCallback,
)

__all__ = ["MemoryBackend", "MemoryBroker", "MemoryConnection"]

ValueSource = object | Callable[["MemoryConnection", tuple[object, ...]], object]

_pids: Final = itertools.count(20_000)


class MemoryBroker:
    """The in-memory "server" shared by any number of :class:`MemoryBackend` connections."""

    def __init__(self, *, queue_usage: float = 0.0) -> None:
        self.queue_usage = queue_usage
        """What ``SELECT pg_notification_queue_usage()`` returns."""
        self.queries: list[tuple[str, tuple[object, ...]]] = []
        """Every ``fetch_value`` call, in order (sql, args)."""
        self.connects = 0
        """Successful connects so far."""
        self.connect_attempts = 0
        """All ``connect()`` calls, refused ones included."""
        self._connections: list[MemoryConnection] = []
        self._refusing = False
        self._stalled = False
        self._changed: anyio.Event | None = None  # created lazily: needs a running event loop
        self._values: list[tuple[str, ValueSource]] = [
            ("pg_notification_queue_usage", lambda _c, _a: self.queue_usage),
            ("pg_try_advisory_lock", True),
            ("pg_advisory_unlock", True),
            ("pg_advisory_lock", None),
            ("pg_backend_pid", lambda c, _a: c.backend_pid),
            ("pg_notify", _pg_notify),
        ]

    # -- inspection ---------------------------------------------------------------------------

    @property
    def connections(self) -> list[MemoryConnection]:
        """Connections currently open (not closed or dropped)."""
        return list(self._connections)

    @property
    def stalled(self) -> bool:
        return self._stalled

    def set_value(self, pattern: str, value: ValueSource) -> None:
        """Make ``fetch_value`` return ``value`` for SQL containing ``pattern``.

        ``value`` may be a callable ``(connection, args) -> object``; exceptions it raises are
        propagated to the caller. Later registrations take precedence.
        """
        self._values.insert(0, (pattern.lower(), value))

    # -- server side actions ------------------------------------------------------------------

    def notify(self, channel: str, payload: str = "", *, pid: int = 1) -> None:
        """``NOTIFY channel, payload`` from a session with ``pid``: delivered synchronously, in
        order, to every open connection listening on ``channel`` (held while stalled)."""
        note = Notification(channel=channel, payload=payload, pid=pid)
        for conn in self._connections:
            if channel in conn.channels:
                conn._deliver(note)

    def drop_all(self) -> None:
        """Lose every connection, like a server crash or ``pg_terminate_backend``."""
        for conn in list(self._connections):
            conn._lose("connection dropped by the memory broker")

    def drop(self, backend_pid: int) -> bool:
        """Lose the connection served by ``backend_pid``; ``False`` if there is none."""
        for conn in self._connections:
            if conn.backend_pid == backend_pid:
                conn._lose("connection terminated by the memory broker")
                return True
        return False

    def refuse_connections(self, refuse: bool = True) -> None:
        """While ``True``, ``connect()`` fails like a server that is down."""
        self._refusing = refuse

    def stall(self, stalled: bool = True) -> None:
        """Partition the network (``True``) or heal it (``False``); see the module docstring."""
        self._stalled = stalled
        if not stalled:
            for conn in list(self._connections):
                conn._flush_held()
        self._bump()

    # -- internals ----------------------------------------------------------------------------

    def _bump(self) -> None:
        """Wake everything waiting for a state change (stall healed, connection closed)."""
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    async def _until_reachable(self, conn: MemoryConnection | None) -> None:
        """Wait while stalled; raise ListenerLost if ``conn`` gets closed meanwhile."""
        while True:
            if conn is not None and conn.closed:
                raise ListenerLost(conn.lost_reason or "connection is closed")
            if not self._stalled:
                return
            if self._changed is None:
                self._changed = anyio.Event()
            await self._changed.wait()

    def _answer(self, conn: MemoryConnection, sql: str, args: tuple[object, ...]) -> object:
        lowered = sql.lower()
        for pattern, value in self._values:
            if pattern in lowered:
                if callable(value):
                    return value(conn, args)
                return value
        return None

    def _remove(self, conn: MemoryConnection) -> None:
        if conn in self._connections:
            self._connections.remove(conn)
        self._bump()


def _pg_notify(conn: MemoryConnection, args: tuple[object, ...]) -> object:
    channel, payload = args
    conn.broker.notify(str(channel), str(payload), pid=conn.backend_pid)
    return ""


class MemoryConnection:
    """One in-memory LISTEN connection (implements :class:`ListenerConnection`)."""

    def __init__(
        self, broker: MemoryBroker, on_notification: NotificationCallback, application_name: str
    ) -> None:
        self.broker = broker
        self.application_name = application_name
        self.channels: set[str] = set()
        self.lost_reason: str | None = None
        self._pid = next(_pids)
        self._on_notification = on_notification
        self._held: list[Notification] = []
        self._closed = False
        self._lost = False
        self._closed_event = anyio.Event()

    @property
    def backend_pid(self) -> int:
        return self._pid

    @property
    def closed(self) -> bool:
        return self._closed

    async def listen(self, channels: Collection[str]) -> None:
        await self.broker._until_reachable(self)
        self.channels.update(channels)

    async def notify(self, channel: str, payload: str) -> None:
        await self.fetch_value("SELECT pg_notify($1, $2)", channel, payload)

    async def fetch_value(self, sql: str, *args: object) -> object:
        await self.broker._until_reachable(self)
        self.broker.queries.append((sql, args))
        return self.broker._answer(self, sql, args)

    async def wait_closed(self) -> None:
        await self._closed_event.wait()
        if self._lost:
            raise ListenerLost(self.lost_reason or "connection lost")

    async def aclose(self) -> None:
        self._close(None)

    # -- broker side --------------------------------------------------------------------------

    def _deliver(self, note: Notification) -> None:
        if self._closed:
            return
        if self.broker.stalled:
            self._held.append(note)
        else:
            self._on_notification(note)

    def _flush_held(self) -> None:
        held, self._held = self._held, []
        for note in held:
            self._deliver(note)

    def _lose(self, reason: str) -> None:
        if not self._closed:
            self._lost = True
        self._close(reason)

    def _close(self, reason: str | None) -> None:
        if self._closed:
            return
        self._closed = True
        self.lost_reason = reason or "connection closed"
        self._held.clear()
        self._closed_event.set()
        self.broker._remove(self)


class MemoryBackend:
    """:class:`ListenerBackend` over a :class:`MemoryBroker` (a fresh one if none is given)."""

    name = "memory"

    def __init__(self, broker: MemoryBroker | None = None) -> None:
        self.broker = broker if broker is not None else MemoryBroker()

    async def connect(
        self,
        dsn: str,
        *,
        application_name: str,
        on_notification: NotificationCallback,
        connect_timeout: float,
    ) -> ListenerConnection:
        broker = self.broker
        broker.connect_attempts += 1
        await anyio.lowlevel.checkpoint()
        if broker._refusing:
            raise ListenerConnectError("memory broker refuses connections (server down)")
        if broker.stalled:
            with anyio.move_on_after(connect_timeout):
                await broker._until_reachable(None)
            if broker.stalled:
                raise ListenerConnectError(
                    f"connection timed out after {connect_timeout:g}s (memory broker stalled)"
                )
        conn = MemoryConnection(broker, on_notification, application_name)
        broker._connections.append(conn)
        broker.connects += 1
        return conn
