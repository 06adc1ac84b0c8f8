"""The listener supervisor: the one place for reconnects and heartbeats, for every backend.

::

    listener = Listener(backend_for("asyncpg"), dsn, channels=["pgreact_wakeup"],
                        application_name="pgreact", on_notification=stream.send_nowait)
    async with anyio.create_task_group() as tg:
        await tg.start(listener.run)      # returns once the first connection is up
        ...

Life of a connection (:meth:`Listener.run`)::

    connect ──fail──> log (rate-limited), sleep backoff.next_delay(), retry forever
       │ ok
    LISTEN channels + private heartbeat channel
    first heartbeat (proves NOTIFY delivery: fails behind a transaction-mode pooler)
    on_connected(conn)      (presence lock, catch-up sweep; raising = connection failure)
       │                    (all of the above must finish within connect_timeout)
    connected = True, task_status.started() (first time only)
       │
    watch: conn.wait_closed()  |  heartbeat every heartbeat_interval
       │ lost (closed, or a heartbeat not answered within heartbeat_timeout)
    connected = False, on_disconnected(), reconnects += 1, close, back off, reconnect

A heartbeat is a self round trip: ``pg_notify(<private channel>, <seq>)`` on the listening
connection, then wait until that very notification comes back through the backend's delivery
path. It proves at once that the server answers (a half-open TCP connection doesn't) and that
LISTEN delivery works (a transaction-mode pooler breaks it). The same heartbeat reads
``pg_notification_queue_usage()``. Heartbeat notifications never reach ``on_notification``.

The back-off resets once a connection has stayed healthy for ``healthy_after`` seconds, so a
server that accepts connections and drops them right away is still retried ever more slowly.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Awaitable, Callable, Collection
from typing import Any, Final

import anyio
import structlog
from anyio.abc import TaskStatus

from pgreact.listeners.backoff import Backoff
from pgreact.listeners.dsn import mask_dsn
from pgreact.listeners.protocol import (
    ListenerBackend,
    ListenerConnectError,
    ListenerConnection,
    ListenerError,
    ListenerLost,
    Notification,
    NotificationCallback,
)

__all__ = ["QUEUE_USAGE_SQL", "Listener", "mask_dsn"]

QUEUE_USAGE_SQL: Final = "SELECT pg_notification_queue_usage()"
REPEAT_LOG_INTERVAL: Final = 30.0
"""Identical consecutive connect failures are logged at warning level at most this often."""
CLOSE_TIMEOUT: Final = 5.0
"""Upper bound for closing a connection (backends are expected to be much faster)."""


class Listener:
    """Keeps one LISTEN connection alive: reconnects with back-off and checks it by heartbeat.

    Attributes for probes and metrics (read-only for callers):

    * ``connected`` — a connection is up and its last heartbeat succeeded;
    * ``reconnects`` — connections lost so far (each one is followed by a reconnect attempt);
    * ``queue_usage`` — last ``pg_notification_queue_usage()`` (0..1);
    * ``last_heartbeat_ok`` — ``time.monotonic()`` of the last good heartbeat, or ``None``;
    * ``last_error`` — why the last connection was lost or the last attempt failed (``None``
      while connected), for probes: e.g. ``cannot execute LISTEN during recovery``;
    * ``backend_name`` — ``asyncpg``, ``psycopg`` or ``memory``;
    * ``connection`` — the current connection while connected, else ``None``.

    Parameters:

    * ``dsn`` — libpq URL (a SQLAlchemy ``+driver`` suffix is accepted); masked in logs.
    * ``channels`` — channels to LISTEN on, quoted as identifiers (any name works).
    * ``on_notification`` — called from the driver's callback for every notification on
      ``channels`` (possibly already during set-up, before ``connected`` is true). It must only
      enqueue; exceptions it raises are logged and the notification is dropped.
    * ``heartbeat_interval`` / ``heartbeat_timeout`` — a loss is noticed within about
      ``heartbeat_interval + heartbeat_timeout`` on a silent (half-open) connection, at once
      when the server closes it.
    * ``connect_timeout`` — for opening the connection, and again for LISTEN + the first
      heartbeat + ``on_connected`` together.
    * ``backoff`` — delays between attempts (default ``Backoff(0.5, 30.0)``).
    * ``on_connected(conn)`` — after every (re)connect, before ``connected`` turns true; may
      query through ``conn``. Raising (or exceeding the timeout) counts as a failed attempt.
    * ``on_disconnected()`` — when an established connection is lost (not on shutdown).
    * ``logger`` — a structlog logger (default ``pgreact.listener``), bound with ``backend``.
    * ``healthy_after`` — seconds a connection must last before the back-off resets.
    """

    def __init__(
        self,
        backend: ListenerBackend,
        dsn: str,
        *,
        channels: Collection[str],
        application_name: str,
        on_notification: NotificationCallback,
        heartbeat_interval: float = 5.0,
        heartbeat_timeout: float = 5.0,
        connect_timeout: float = 10.0,
        backoff: Backoff | None = None,
        on_connected: Callable[[ListenerConnection], Awaitable[None]] | None = None,
        on_disconnected: Callable[[], None] | None = None,
        logger: Any = None,
        healthy_after: float = 10.0,
    ) -> None:
        if heartbeat_interval <= 0 or heartbeat_timeout <= 0 or connect_timeout <= 0:
            raise ValueError("heartbeat_interval, heartbeat_timeout, connect_timeout must be > 0")
        self._backend = backend
        self._dsn = dsn
        self.heartbeat_channel = f"pgreact_hb_{secrets.token_hex(8)}"
        self.channels: tuple[str, ...] = tuple(dict.fromkeys(channels))
        if self.heartbeat_channel in self.channels:  # pragma: no cover - 64 random bits
            raise ValueError("channel name clashes with the heartbeat channel")
        self._application_name = application_name
        self._on_notification = on_notification
        self._heartbeat_interval = heartbeat_interval
        self._heartbeat_timeout = heartbeat_timeout
        self._connect_timeout = connect_timeout
        self._healthy_after = healthy_after
        self._backoff = backoff if backoff is not None else Backoff()
        self._on_connected = on_connected
        self._on_disconnected = on_disconnected
        self._log: Any = (
            logger if logger is not None else structlog.get_logger("pgreact.listener")
        ).bind(backend=backend.name)

        self.connected = False
        self.reconnects = 0
        self.queue_usage = 0.0
        self.last_heartbeat_ok: float | None = None
        self.last_error: str | None = None
        self.connection: ListenerConnection | None = None

        self._running = False
        self._heartbeat_seq = 0
        self._heartbeat_waiter: tuple[str, anyio.Event] | None = None
        # error text -> [monotonic time it was last logged at warning level, repeats since]
        self._failures_logged: dict[str, list[float]] = {}

    @property
    def backend_name(self) -> str:
        return self._backend.name

    # -- the supervision loop --------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Keep the connection up until cancelled. Never returns otherwise.

        With ``await task_group.start(listener.run)``, ``start`` returns after the *first*
        successful connection (including ``on_connected``) — which waits forever while the
        database is unreachable; wrap it in ``anyio.fail_after`` for a start-up deadline, or use
        ``start_soon`` and watch ``connected``. Connect failures are retried forever.
        """
        if self._running:
            raise RuntimeError("Listener.run() is already running")
        self._running = True
        started = False
        attempt = 0
        lost_at: float | None = None
        try:
            while True:
                attempt += 1
                try:
                    conn = await self._open()
                except ListenerError as exc:
                    self.last_error = str(exc)
                    delay = self._backoff.next_delay()
                    self._log_connect_failure(exc, attempt, delay)
                    await anyio.sleep(delay)
                    continue

                self._log.info(
                    "listener connected",
                    attempt=attempt,
                    backend_pid=conn.backend_pid,
                    downtime=None if lost_at is None else round(time.monotonic() - lost_at, 3),
                    channels=list(self.channels),
                )
                attempt = 0
                self._failures_logged.clear()
                self.connection = conn
                self.last_error = None
                self.connected = True
                if self._healthy_after <= 0:
                    # A connection that passed LISTEN and a heartbeat counts as healthy at once:
                    # its loss starts a fresh, short back-off sequence.
                    self._backoff.reset()
                if not started:
                    started = True
                    task_status.started()

                reason: ListenerError | None = None
                try:
                    reason = await self._watch(conn)
                finally:
                    self.connected = False
                    self.connection = None
                    if reason is None:
                        # Cancelled (shutdown) or crashed: close without reporting a loss.
                        await self._close(conn)

                lost_at = time.monotonic()
                self.last_error = str(reason)
                self.reconnects += 1
                delay = self._backoff.next_delay()
                self._log.warning(
                    "listener connection lost",
                    reason=str(reason),
                    backend_pid=conn.backend_pid,
                    reconnects=self.reconnects,
                    delay=round(delay, 3),
                )
                self._notify_disconnected()
                await self._close(conn)
                await anyio.sleep(delay)
        finally:
            self._running = False

    async def _open(self) -> ListenerConnection:
        """Connect, LISTEN, prove delivery, run on_connected; ListenerError on any failure."""
        try:
            # The backend applies connect_timeout itself; this is only a safety net.
            with anyio.fail_after(self._connect_timeout + 1.0):
                conn = await self._backend.connect(
                    self._dsn,
                    application_name=self._application_name,
                    on_notification=self._dispatch,
                    connect_timeout=self._connect_timeout,
                )
        except TimeoutError as exc:
            raise ListenerConnectError(
                f"could not connect: timed out after {self._connect_timeout:g}s"
            ) from exc

        stage = "LISTEN"
        try:
            with anyio.fail_after(self._connect_timeout):
                await conn.listen([*self.channels, self.heartbeat_channel])
                stage = "delivery test"
                await self._delivery_test()
                stage = "first heartbeat"
                await self._heartbeat(conn)
                if self._on_connected is not None:
                    stage = "on_connected"
                    await self._on_connected(conn)
        except TimeoutError as exc:
            await self._close(conn)
            raise ListenerConnectError(
                f"{stage} did not finish within connect_timeout ({self._connect_timeout:g}s)"
            ) from exc
        except ListenerError as exc:
            await self._close(conn)
            raise ListenerConnectError(f"{stage} failed: {exc}") from exc
        except Exception as exc:
            # on_connected is service code: a failure there is a failed connection attempt,
            # retried with back-off; log the traceback, the retry loop only logs the message.
            self._log.exception("on_connected raised", backend_pid=conn.backend_pid)
            await self._close(conn)
            raise ListenerConnectError(f"{stage} failed: {type(exc).__name__}: {exc}") from exc
        except BaseException:  # cancellation: close, then let it propagate
            await self._close(conn)
            raise
        return conn

    async def _watch(self, conn: ListenerConnection) -> ListenerError:
        """Return the reason the connection is lost; only cancellation ends it otherwise."""
        reason: ListenerError | None = None

        async with anyio.create_task_group() as tg:

            async def until_closed() -> None:
                nonlocal reason
                try:
                    await conn.wait_closed()
                    error: ListenerError = ListenerLost("connection closed")
                except ListenerError as exc:
                    error = exc
                if reason is None:
                    reason = error
                tg.cancel_scope.cancel()

            async def heartbeats() -> None:
                nonlocal reason
                connected_at = time.monotonic()
                backoff_reset = False
                try:
                    while True:
                        await anyio.sleep(self._heartbeat_interval)
                        await self._heartbeat(conn)
                        if (
                            not backoff_reset
                            and time.monotonic() - connected_at >= self._healthy_after
                        ):
                            self._backoff.reset()
                            backoff_reset = True
                except ListenerError as exc:
                    if reason is None:
                        reason = exc
                    tg.cancel_scope.cancel()

            tg.start_soon(until_closed, name="pgreact-listener-wait-closed")
            tg.start_soon(heartbeats, name="pgreact-listener-heartbeat")

        assert reason is not None  # noqa: S101 - only cancellation leaves the group otherwise
        return reason

    # -- heartbeat -------------------------------------------------------------------------

    async def _heartbeat(self, conn: ListenerConnection) -> None:
        """One NOTIFY round trip on ``conn`` plus the queue-usage read, within the timeout."""
        self._heartbeat_seq += 1
        token = str(self._heartbeat_seq)
        echoed = anyio.Event()
        self._heartbeat_waiter = (token, echoed)
        stage = "NOTIFY"
        try:
            with anyio.fail_after(self._heartbeat_timeout):
                await conn.notify(self.heartbeat_channel, token)
                stage = "echo"
                await echoed.wait()
                stage = "queue usage"
                usage = await conn.fetch_value(QUEUE_USAGE_SQL)
        except TimeoutError as exc:
            if stage == "echo":
                message = (
                    f"heartbeat NOTIFY was not delivered back within {self._heartbeat_timeout:g}s:"
                    " LISTEN does not work on this connection (is the listen URL behind a"
                    " transaction-mode pooler?) or the connection is stuck"
                )
            else:
                message = (
                    f"heartbeat: {stage} not answered within {self._heartbeat_timeout:g}s"
                    " (half-open connection or unresponsive server)"
                )
            raise ListenerLost(message) from exc
        finally:
            self._heartbeat_waiter = None
        self.queue_usage = float(usage) if isinstance(usage, int | float) else 0.0
        self.last_heartbeat_ok = time.monotonic()

    async def _delivery_test(self) -> None:
        """A NOTIFY from *another* session must arrive. A session's own notifications come back
        even through a transaction-mode pooler, so only this proves LISTEN really works on this
        URL; it costs one short extra connection per (re)connect."""
        self._heartbeat_seq += 1
        token = str(self._heartbeat_seq)
        echoed = anyio.Event()
        self._heartbeat_waiter = (token, echoed)
        try:
            sender = await self._backend.connect(
                self._dsn,
                application_name=f"{self._application_name}-probe",
                on_notification=lambda _note: None,
                connect_timeout=self._connect_timeout,
            )
            try:
                await sender.notify(self.heartbeat_channel, token)
            finally:
                await self._close(sender)
            with anyio.fail_after(self._heartbeat_timeout):
                await echoed.wait()
        except TimeoutError as exc:
            raise ListenerLost(
                "a NOTIFY from another session was not delivered within "
                f"{self._heartbeat_timeout:g}s: the listen URL goes through a transaction-mode "
                "pooler; set PGREACT_LISTEN_URL to a URL that reaches PostgreSQL directly or "
                "through a session-mode pool"
            ) from exc
        finally:
            self._heartbeat_waiter = None

    def _dispatch(self, note: Notification) -> None:
        """The callback given to the backend: runs in the driver's callback, never blocks."""
        if note.channel == self.heartbeat_channel:
            waiter = self._heartbeat_waiter
            if waiter is not None and note.payload == waiter[0]:
                waiter[1].set()
            return
        try:
            self._on_notification(note)
        except Exception:
            self._log.exception("on_notification raised", channel=note.channel)

    # -- helpers ---------------------------------------------------------------------------

    async def _close(self, conn: ListenerConnection) -> None:
        with anyio.move_on_after(CLOSE_TIMEOUT, shield=True):
            try:
                await conn.aclose()
            except Exception as exc:
                self._log.debug("error while closing listener connection", error=str(exc))

    def _notify_disconnected(self) -> None:
        if self._on_disconnected is None:
            return
        try:
            self._on_disconnected()
        except Exception:
            self._log.exception("on_disconnected raised")

    def _log_connect_failure(self, exc: ListenerError, attempt: int, delay: float) -> None:
        """Warn about each distinct error once per REPEAT_LOG_INTERVAL; repeats go to debug.

        Keyed by error text rather than "same as the previous one", so a server in recovery
        whose errors alternate (shutting down / reset / refused) still doesn't flood the logs.
        """
        error = str(exc)
        now = time.monotonic()
        fields = {
            "attempt": attempt,
            "delay": round(delay, 3),
            "error": error,
            "dsn": mask_dsn(self._dsn),
        }
        seen = self._failures_logged.get(error)
        if seen is None:
            if len(self._failures_logged) >= 64:  # bounded, whatever the errors look like
                self._failures_logged.clear()
            self._failures_logged[error] = [now, 0]
            self._log.warning("listener connect failed", **fields)
        elif now - seen[0] >= REPEAT_LOG_INTERVAL:
            self._log.warning("listener connect still failing", suppressed=int(seen[1]), **fields)
            seen[:] = [now, 0]
        else:
            seen[1] += 1
            self._log.debug("listener connect failed", **fields)
