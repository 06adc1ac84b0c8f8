"""The one small interface between pgreact and a LISTEN driver.

A backend only knows how to open one autocommit connection, LISTEN on it, send a NOTIFY and
tell when the connection is gone. Reconnecting, heartbeats and back-off live once, in
:mod:`pgreact.listeners.supervisor`, for every backend.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class Notification:
    """A NOTIFY as received: channel, payload text, and the sending backend's pid."""

    channel: str
    payload: str
    pid: int


NotificationCallback = Callable[[Notification], None]
"""Called in the event loop for each notification. Must not block or await: it only enqueues."""


class ListenerConnection(Protocol):
    """One open, dedicated LISTEN connection (autocommit; never inside a transaction)."""

    @property
    def backend_pid(self) -> int:
        """The server process id serving this connection."""
        ...

    async def listen(self, channels: Collection[str]) -> None:
        """LISTEN on each channel (quoted as identifiers)."""
        ...

    async def notify(self, channel: str, payload: str) -> None:
        """Send ``pg_notify(channel, payload)`` through this connection."""
        ...

    async def fetch_value(self, sql: str, *args: object) -> object:
        """Run a short query (positional ``$1``-style parameters) and return the first column of
        the first row. Used for heartbeats, presence locks and the notify-queue gauge."""
        ...

    async def wait_closed(self) -> None:
        """Return (or raise) once the connection is lost or closed. Never returns while healthy."""
        ...

    async def aclose(self) -> None:
        """Close the connection; safe to call twice and on a broken connection."""
        ...


class ListenerBackend(Protocol):
    """Opens listener connections for one driver."""

    name: str
    """``asyncpg``, ``psycopg`` or ``memory``: shown in metrics and logs."""

    async def connect(
        self,
        dsn: str,
        *,
        application_name: str,
        on_notification: NotificationCallback,
        connect_timeout: float,
    ) -> ListenerConnection:
        """Open a connection that delivers every notification on its LISTENed channels to
        ``on_notification``. Raises :class:`ListenerConnectError` when it cannot connect."""
        ...


class ListenerError(Exception):
    """Base of listener errors: the supervisor logs it and reconnects with back-off."""


class ListenerConnectError(ListenerError):
    """The connection could not be opened (server down, auth, recovery mode, …)."""


class ListenerLost(ListenerError):
    """An open connection was found broken (closed, terminated, or a heartbeat timed out)."""
