"""LISTEN connection on asyncpg.

asyncpg reads the socket itself (it is an asyncio protocol), so notifications arrive whenever
the server sends them, also while a query of ours is running; it hands each one to the
registered listener through ``loop.call_soon`` — in arrival order, and before the termination
callbacks of a connection that is lost right after. Our listener callback only builds a
:class:`Notification` and calls ``on_notification``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection
from typing import Any, Final

import asyncpg
import structlog

from pgreact.listeners.dsn import libpq_dsn
from pgreact.listeners.protocol import (
    ListenerConnectError,
    ListenerConnection,
    ListenerError,
    ListenerLost,
    Notification,
    NotificationCallback,
)

__all__ = ["AsyncpgBackend", "AsyncpgConnection"]

CLOSE_TIMEOUT: Final = 1.0
"""Seconds a graceful close may take before the socket is aborted (half-open peers never
answer the Terminate message)."""

_log = structlog.get_logger("pgreact.listener")

# Errors that mean "this operation failed"; whether the connection is gone too is decided by
# asking the connection (is_closed) afterwards.
_DRIVER_ERRORS: Final = (
    OSError,
    TimeoutError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
)


class AsyncpgConnection:
    """:class:`ListenerConnection` over one ``asyncpg.Connection``."""

    def __init__(self, conn: Any, on_notification: NotificationCallback) -> None:
        self._conn = conn
        self._pid: int = conn.get_server_pid()
        self._on_notification = on_notification
        self._gone = asyncio.Event()
        self._closing = False
        self._abandoned = False
        # asyncpg refuses a second operation while one is in progress ("another operation is
        # in progress"): the heartbeat and the service's own queries take turns.
        self._lock = asyncio.Lock()
        conn.add_termination_listener(self._on_terminated)

    @property
    def backend_pid(self) -> int:
        return self._pid

    # -- driver callbacks: no awaiting, no work --------------------------------------------

    def _on_notify(self, _conn: object, pid: int, channel: str, payload: str) -> None:
        try:
            self._on_notification(Notification(channel=channel, payload=payload, pid=pid))
        except Exception:
            _log.exception("on_notification raised", backend="asyncpg", channel=channel)

    def _on_terminated(self, _conn: object) -> None:
        self._gone.set()

    # -- ListenerConnection ------------------------------------------------------------------

    async def listen(self, channels: Collection[str]) -> None:
        for channel in channels:
            try:
                async with self._lock:
                    # add_listener quotes the channel as an identifier and runs LISTEN once.
                    await self._conn.add_listener(channel, self._on_notify)
            except _DRIVER_ERRORS as exc:
                raise self._translate(exc, f"LISTEN {channel!r}") from exc
            except asyncio.CancelledError:
                self._abandoned = True  # see fetch_value()
                raise

    async def notify(self, channel: str, payload: str) -> None:
        await self.fetch_value("SELECT pg_notify($1, $2)", channel, payload)

    async def fetch_value(self, sql: str, *args: object) -> object:
        try:
            async with self._lock:
                return await self._conn.fetchval(sql, *args)
        except _DRIVER_ERRORS as exc:
            raise self._translate(exc, "query") from exc
        except asyncio.CancelledError:
            # Abandoned mid-query (e.g. a heartbeat timeout on a half-open connection): the
            # connection's state is unknown, so aclose() will abort instead of closing politely.
            self._abandoned = True
            raise

    async def wait_closed(self) -> None:
        await self._gone.wait()
        if not self._closing:
            raise ListenerLost("connection closed by the server or the network (asyncpg)")

    async def aclose(self) -> None:
        self._closing = True
        conn = self._conn
        if self._abandoned:
            conn.terminate()
        else:
            try:
                # A graceful close sends Terminate and waits for the server to hang up; on a
                # half-open connection that never happens, hence the timeout (close() aborts
                # the transport itself when it fails or is cancelled).
                await conn.close(timeout=CLOSE_TIMEOUT)
            except _DRIVER_ERRORS:
                conn.terminate()
        self._gone.set()

    def _translate(self, exc: BaseException, what: str) -> ListenerError:
        if self._conn.is_closed() or isinstance(
            exc, OSError | asyncpg.exceptions.ConnectionDoesNotExistError
        ):
            return ListenerLost(f"connection lost during {what}: {exc}")
        return ListenerError(f"{what} failed: {type(exc).__name__}: {exc}")


class AsyncpgBackend:
    """Opens dedicated LISTEN connections with asyncpg."""

    name = "asyncpg"

    async def connect(
        self,
        dsn: str,
        *,
        application_name: str,
        on_notification: NotificationCallback,
        connect_timeout: float,
    ) -> ListenerConnection:
        try:
            conn = await asyncpg.connect(
                libpq_dsn(dsn),
                timeout=connect_timeout,
                server_settings={"application_name": application_name},
            )
        except _DRIVER_ERRORS as exc:
            raise ListenerConnectError(_connect_error_message(exc)) from exc
        return AsyncpgConnection(conn, on_notification)


def _connect_error_message(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "could not connect: timed out"
    return f"could not connect: {type(exc).__name__}: {exc}"
