"""LISTEN connection on psycopg 3 (``AsyncConnection``).

How notifications are read, and why none are lost
=================================================

psycopg only reads the socket while it runs a command or the ``notifies()`` generator, and
``notifies()`` holds ``connection.lock`` for as long as it runs: a query started by another
task would wait for it. So every connection owns one *worker* task, the only code that ever
touches the psycopg connection. It alternates between two modes:

* **listening** — ``async for n in conn.notifies()`` (no timeout) inside a cancel scope, handing
  each notification to ``on_notification`` the moment its packet is read;
* **commands** — ``notify``/``fetch_value``/``listen`` calls append a command to a queue and
  cancel the listening scope; the worker runs the queued commands one by one, resolves each
  caller's future and goes back to listening.

Interrupting ``notifies()`` is safe: psycopg yields every notification of a packet
synchronously, and the only place the cancellation can land is where it awaits the socket
becoming readable — *before* it consumes any input — so no packet is half-read and nothing read
is dropped. While a command runs, psycopg (with no ``add_notify_handler`` callback registered:
we register none) appends the notifications that arrive along with the command's results to
its internal backlog, and the next ``notifies()`` call yields that backlog first, in arrival
order. So nothing is lost or reordered; the extra latency is bounded by the command in
progress (one round trip), and there is no polling: a command starts at once instead of
waiting for a ``notifies(timeout=…)`` round to expire, and an idle connection costs nothing
beyond psycopg's own 0.1 s interrupt check.

Callers never run (or cancel) psycopg operations themselves. That matters for half-open
connections: cancelling a psycopg query makes psycopg send a cancel request and wait up to
2 x 5 s for the server; here a caller that times out merely abandons its future, and
:meth:`PsycopgConnection.aclose` closes the socket, then stops the worker.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any, Final, LiteralString

import anyio
import psycopg
import structlog
from psycopg import sql as pgsql

from pgreact.listeners.dsn import libpq_dsn
from pgreact.listeners.protocol import (
    ListenerConnectError,
    ListenerConnection,
    ListenerError,
    ListenerLost,
    Notification,
    NotificationCallback,
)

__all__ = ["PsycopgBackend", "PsycopgConnection"]

_log = structlog.get_logger("pgreact.listener")

_Query = LiteralString | pgsql.Composed
_IDLE: Final = psycopg.pq.TransactionStatus.IDLE


@dataclass(slots=True)
class _Command:
    query: _Query
    args: tuple[object, ...]
    future: asyncio.Future[object] = field(repr=False)
    fetch: bool = True


class PsycopgConnection:
    """:class:`ListenerConnection` over one ``psycopg.AsyncConnection`` and its worker task."""

    def __init__(
        self, conn: psycopg.AsyncConnection[Any], on_notification: NotificationCallback
    ) -> None:
        self._conn = conn
        self._pid = conn.info.backend_pid
        self._on_notification = on_notification
        self._commands: deque[_Command] = deque()
        self._listening: anyio.CancelScope | None = None
        self._closing = False
        self._loop = asyncio.get_running_loop()
        self._worker = self._loop.create_task(self._work(), name=f"pgreact-listener-{self._pid}")
        # The task is owned by this object: aclose() cancels and awaits it; the done callback
        # retrieves its outcome (so nothing is "never retrieved") and fails pending commands.
        self._worker.add_done_callback(self._worker_done)

    @property
    def backend_pid(self) -> int:
        return self._pid

    # -- ListenerConnection ------------------------------------------------------------------

    async def listen(self, channels: Collection[str]) -> None:
        for channel in channels:
            query = pgsql.SQL("LISTEN {}").format(pgsql.Identifier(channel))
            await self._submit(query, (), fetch=False)

    async def notify(self, channel: str, payload: str) -> None:
        await self._submit("SELECT pg_notify($1, $2)", (channel, payload), fetch=False)

    async def fetch_value(self, sql: str, *args: object) -> object:
        # The cursor factory is AsyncRawCursor: PostgreSQL-native $1 placeholders, as asyncpg.
        return await self._submit(sql, args)

    async def wait_closed(self) -> None:
        await asyncio.wait([self._worker])
        self._raise_if_lost()

    async def aclose(self) -> None:
        self._closing = True
        worker = self._worker
        if not worker.done():
            if self._conn.pgconn.transaction_status == _IDLE:
                # Listening or between commands: stop the worker first, so it unregisters the
                # socket from the event loop before the socket is closed.
                worker.cancel()
                await asyncio.wait([worker])
            else:
                # A command is in flight, maybe on a dead peer. If the worker saw the
                # cancellation while the connection is still ACTIVE, psycopg would send a cancel
                # request and wait for the server (seconds). So close the connection (PQfinish
                # doesn't block; close() has no await point, so the worker cannot run in
                # between) before the worker wakes up: it then unwinds at once. (Its last act
                # is to unregister the now closed fd number from the loop: a callback already
                # queued ahead of it could in theory reuse that number for a new socket and
                # register a reader; we accept that one-iteration window for this rare path.)
                worker.cancel()
                await self._conn.close()
                await asyncio.wait([worker])
        await self._conn.close()

    # -- the worker ----------------------------------------------------------------------------

    async def _submit(
        self, query: _Query, args: tuple[object, ...], *, fetch: bool = True
    ) -> object:
        if self._worker.done():
            self._raise_if_lost()
            raise ListenerLost("connection is closed")
        future: asyncio.Future[object] = self._loop.create_future()
        self._commands.append(_Command(query, args, future, fetch))
        if self._listening is not None:
            self._listening.cancel()
        # If our caller is cancelled (e.g. a heartbeat timeout), the future is cancelled too and
        # the worker skips the command if it has not started it yet.
        return await future

    async def _work(self) -> None:
        conn = self._conn
        while True:
            while self._commands:
                await self._run_command(self._commands.popleft())
            with anyio.CancelScope() as scope:
                self._listening = scope
                try:
                    if not self._commands:
                        async for note in conn.notifies():
                            self._deliver(note)
                finally:
                    self._listening = None

    async def _run_command(self, command: _Command) -> None:
        if command.future.done():  # the caller gave up before we started
            return
        try:
            async with self._conn.cursor() as cursor:
                await cursor.execute(command.query, command.args or None)
                value = None
                if command.fetch and cursor.description is not None:
                    row = await cursor.fetchone()
                    value = row[0] if row is not None else None
        except psycopg.Error as exc:
            if self._conn.broken or self._conn.closed:
                _set_exception(
                    command.future, ListenerLost(f"connection lost: {_oneline(exc)}"), exc
                )
                raise
            _set_exception(
                command.future,
                ListenerError(f"query failed: {type(exc).__name__}: {_oneline(exc)}"),
                exc,
            )
        else:
            if not command.future.done():
                command.future.set_result(value)

    def _deliver(self, note: psycopg.Notify) -> None:
        try:
            self._on_notification(
                Notification(channel=note.channel, payload=note.payload, pid=note.pid)
            )
        except Exception:
            _log.exception("on_notification raised", backend="psycopg", channel=note.channel)

    def _worker_done(self, worker: asyncio.Task[None]) -> None:
        exc = None if worker.cancelled() else worker.exception()
        lost = ListenerLost(f"connection lost: {_oneline(exc)}" if exc else "connection is closed")
        while self._commands:
            _set_exception(self._commands.popleft().future, lost, exc)

    def _raise_if_lost(self) -> None:
        worker = self._worker
        if worker.cancelled() or self._closing:
            return
        exc = worker.exception()
        if exc is None:  # pragma: no cover - the worker only ends by an exception
            raise ListenerLost("listener worker ended")
        if isinstance(exc, psycopg.Error):
            raise ListenerLost(f"connection lost: {_oneline(exc)}") from exc
        raise exc  # a bug, not a network problem: let it crash loudly


def _oneline(exc: BaseException) -> str:
    """libpq messages span several indented lines; logs want one."""
    return " ".join(str(exc).split())


def _set_exception(
    future: asyncio.Future[object], error: ListenerError, cause: BaseException | None
) -> None:
    if future.done():
        return
    error.__cause__ = cause
    future.set_exception(error)


class PsycopgBackend:
    """Opens dedicated LISTEN connections with psycopg 3."""

    name = "psycopg"

    async def connect(
        self,
        dsn: str,
        *,
        application_name: str,
        on_notification: NotificationCallback,
        connect_timeout: float,
    ) -> ListenerConnection:
        try:
            conn = await psycopg.AsyncConnection.connect(
                libpq_dsn(dsn),
                autocommit=True,
                application_name=application_name,
                # libpq takes whole seconds; the supervisor enforces the precise deadline.
                connect_timeout=max(1, math.ceil(connect_timeout)),
                cursor_factory=psycopg.AsyncRawCursor,
            )
        except psycopg.Error as exc:
            raise ListenerConnectError(
                f"could not connect: {type(exc).__name__}: {_oneline(exc)}"
            ) from exc
        return PsycopgConnection(conn, on_notification)
