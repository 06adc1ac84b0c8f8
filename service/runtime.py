"""The composition root: wires settings, engine, listener, dispatcher and HTTP into one daemon.

Every task belongs to one task group. Shutdown: stop claiming, let in-flight units finish within
``PGREACT_SHUTDOWN_TIMEOUT`` (the last part of it, up to 2 s, is kept for cancelling the units
still running: they roll back and give their claims back), then close the listener, the HTTP
server and the pool. A handler that ignores cancellation (it swallows ``CancelledError``) cannot
hold the process: at the deadline ``pgreact run`` logs what it abandons and exits, and the
claims left behind are reaped (this process's presence lock goes with it).
"""

from __future__ import annotations

import os
import secrets
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import anyio
import structlog
from anyio.abc import TaskStatus
from prometheus_client import CollectorRegistry
from sqlalchemy import event, text
from sqlalchemy.ext.asyncio import AsyncEngine

import pgreact
from pgreact import installer
from pgreact.calls import blocking_call
from pgreact.db import create_write_engine
from pgreact.dispatcher import DispatchConfig, Dispatcher
from pgreact.doorbell import load_verifier
from pgreact.errors import SchemaError
from pgreact.housekeeping import Housekeeper
from pgreact.http import HealthApp, serve_http
from pgreact.listeners import Backoff, backend_for
from pgreact.listeners.protocol import ListenerBackend, ListenerConnection, Notification
from pgreact.listeners.supervisor import Listener
from pgreact.metrics import Metrics, PoolSnapshot
from pgreact.notify import NotifyDispatcher
from pgreact.router import Router
from pgreact.settings import Settings, mask_url
from pgreact.store import Store
from pgreact.watchdog import LoopWatchdog

log = structlog.get_logger("pgreact.runtime")

READY_PING_TIMEOUT = 2.0
CANCEL_GRACE = 2.0
"""Seconds of the shutdown timeout kept for cancelled units to roll back and give claims back
(at most half of it, and at least :data:`MIN_CANCEL_GRACE` after cancelling)."""
MIN_CANCEL_GRACE = 1.0


@dataclass
class Daemon:
    """One pgreact process. ``run()`` until ``stop()``; tests run several in one loop."""

    settings: Settings
    router: Router
    registry: CollectorRegistry | None = None
    listener_backend: ListenerBackend | None = None
    owner: int = field(default_factory=lambda: secrets.randbelow(2**31 - 2) + 1)
    # ``pgreact run``: end the process when handlers ignore cancellation past the shutdown
    # deadline. (Embedded in another program, the daemon leaves that decision to its host and
    # keeps waiting for them.)
    exit_when_stuck: bool = False

    def __post_init__(self) -> None:
        self.metrics = Metrics(self.registry)
        self.http_port: int | None = None
        self._stop = anyio.Event()
        self._listener: Listener | None = None
        self._engine: AsyncEngine | None = None
        self._housekeeper: Housekeeper | None = None

    def stop(self) -> None:
        """Ask for a graceful stop (what SIGTERM does)."""
        self._stop.set()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        s = self.settings
        engine = create_write_engine(s)
        self._engine = engine
        try:
            await self._run(engine, task_status)
        finally:
            with anyio.CancelScope(shield=True):
                await engine.dispose()

    async def _run(self, engine: AsyncEngine, task_status: TaskStatus[None]) -> None:
        s = self.settings
        schema = s.schema_name
        await self._check_installed(engine)
        rings = await load_verifier(engine, schema)
        presence_key = installer.lock_key(schema)
        store = Store(
            schema,
            owner=self.owner,
            presence_key=presence_key,
            max_attempts=s.max_attempts,
            retry_base=s.retry_base,
            retry_max=s.retry_max,
            lease_seconds=_lease_seconds(s),
        )
        durable = self.router.durable
        # Each handler transaction in flight holds a pooled connection, and only the pool's
        # own connections stay open: an overflow connection is closed when it is returned, so
        # units working on overflow connections connected anew for every batch (a new server
        # process, cold caches; measured: 4-5 connects per 2,400-event burst at the defaults).
        # Keep one back for the housekeeping queries and the readiness ping; the overflow
        # absorbs those spikes.
        capacity = max(1, s.pool_size - 1)
        concurrency = min(s.concurrency, capacity)
        if concurrency < s.concurrency:  # start-up warned already (settings.config_warnings)
            log.debug(
                "concurrency_capped",
                requested=s.concurrency,
                effective=concurrency,
                hint="raise PGREACT_POOL_SIZE to run more handler transactions at once",
            )
        # Notices a handler that blocks the event loop, charges it, spares the others.
        watchdog = LoopWatchdog(min(1.0, s.handler_timeout / 2), blocking_call)
        dispatcher = Dispatcher(
            engine,
            store,
            durable,
            self.metrics,
            DispatchConfig(
                concurrency=concurrency,
                batch_size=s.batch_size,
                handler_timeout=s.handler_timeout,
                watchdog=watchdog,
            ),
        )
        notify = NotifyDispatcher(self.router.notify, self.metrics, timeout=s.handler_timeout)
        housekeeper = Housekeeper(
            engine,
            store,
            self.metrics,
            handlers=durable,
            wake_all=dispatcher.wake,
            claims_snapshot=dispatcher.claims_snapshot,
            sweep_interval=s.sweep_interval,
            stats_interval=s.stats_interval,
            reap_interval=max(s.sweep_interval, 10.0),
        )
        self._housekeeper = housekeeper
        # A pooled connection that breaks may strand claims (a unit could not give them back
        # through a new connection either): have them reaped as soon as the database answers.
        event.listen(engine.sync_engine.pool, "invalidate", _on_invalidate(housekeeper))
        wake_channel = installer.wake_channel(schema)
        metrics = self.metrics

        def on_notification(note: Notification) -> None:
            metrics.notifications_received.labels(note.channel).inc()
            if note.channel == wake_channel:
                housekeeper.notified()
                # A signed ring of the doorbell, or only a hint: any role that may connect can
                # NOTIFY this channel.
                wake = rings.classify(note.payload)
                dispatcher.wake(wake.table, hint=not wake.firm)
            else:
                notify.offer(note)

        connections = 0

        async def on_connected(conn: ListenerConnection) -> None:
            nonlocal connections
            # Presence: while this session holds the lock, other replicas leave our claims be.
            held = await conn.fetch_value(
                "SELECT pg_try_advisory_lock($1, $2)", presence_key, self.owner
            )
            if not held:
                log.warning("presence_lock_busy", owner=self.owner)
            connections += 1
            if connections > 1:
                metrics.listener_reconnects.inc()
            metrics.listener_connected.set(1)
            dispatcher.allow_claims()  # presence held: our claims are safe from other reapers
            dispatcher.wake()  # catch up on whatever was committed while we were away
            housekeeper.reap_soon()  # and take back claims we could not return while away

        def on_disconnected() -> None:
            metrics.listener_connected.set(0)

        backend = self.listener_backend or backend_for(s.listener_driver)
        listener = Listener(
            backend,
            s.listen_dsn,
            channels=[wake_channel, *notify.channels],
            application_name=f"{s.application_name}-listener",
            on_notification=on_notification,
            heartbeat_interval=s.heartbeat_interval,
            heartbeat_timeout=s.heartbeat_timeout,
            connect_timeout=s.connect_timeout,
            on_connected=on_connected,
            on_disconnected=on_disconnected,
            # A dropped connection that had worked is retried almost at once; only repeated
            # failures back off, to one attempt a second (a server in recovery, an outage): handling
            # resumes within about a second of the server accepting connections again.
            backoff=Backoff(base=0.1, cap=1.0),
            healthy_after=0.0,
        )
        self._listener = listener
        metrics.listener_connected.set(0)
        metrics.build_info.labels(pgreact.__version__, backend.name, s.write_driver).set(1)
        for handler in durable:
            metrics.prime_handler(handler.name)
        for nh in self.router.notify:
            metrics.events_handled.labels(nh.name, "ok")
        for channel in [wake_channel, *notify.channels]:
            metrics.notifications_received.labels(channel)
        for channel in notify.channels:
            metrics.notifications_dropped.labels(channel)
        metrics.observe_pool(lambda: _pool_snapshot(engine))

        metrics.notify_queue_usage.set_function(lambda: listener.queue_usage)
        app = HealthApp(metrics.registry, self._readiness)
        log.info(
            "starting",
            version=pgreact.__version__,
            database=mask_url(s.require_database_url()),
            listen=mask_url(s.effective_listen_url),
            listener=backend.name,
            handlers=[h.name for h in durable],
            notify_channels=notify.channels,
            owner=self.owner,
        )
        async with anyio.create_task_group() as tg:
            http_shutdown = anyio.Event()
            http_done = anyio.Event()

            async def run_http(*, task_status: TaskStatus[int]) -> None:
                try:
                    await serve_http(
                        app, s.http_host, s.http_port, http_shutdown, task_status=task_status
                    )
                finally:
                    http_done.set()

            self.http_port = await tg.start(run_http)
            tg.start_soon(listener.run, name="listener")
            tg.start_soon(notify.run, name="notify")
            tg.start_soon(housekeeper.run, name="housekeeping")
            tg.start_soon(watchdog.run, name="loop-watchdog")
            dispatch_scope = anyio.CancelScope()
            dispatch_done = anyio.Event()

            async def run_dispatcher() -> None:
                with dispatch_scope:
                    await dispatcher.run()
                dispatch_done.set()

            tg.start_soon(run_dispatcher, name="dispatcher")

            async def claim_without_presence() -> None:
                # The listener cannot connect (a pooler, a standby, an outage): work by polling
                # rather than not at all; fencing keeps a takeover from doing anything twice.
                await anyio.sleep(s.connect_timeout)
                dispatcher.allow_claims()

            tg.start_soon(claim_without_presence, name="claim-without-presence")
            log.info("started", http_port=self.http_port)
            task_status.started()

            await self._stop.wait()
            log.info("stopping", drain_timeout=s.shutdown_timeout)
            stopping_at = anyio.current_time()
            dispatcher.stop_claiming()
            grace = min(CANCEL_GRACE, s.shutdown_timeout / 2)
            with anyio.move_on_after(s.shutdown_timeout - grace):
                await dispatch_done.wait()
            if not dispatch_done.is_set():
                log.warning("drain_timeout", detail="cancelling in-flight handlers")
                dispatch_scope.cancel()
                deadline = max(
                    stopping_at + s.shutdown_timeout, anyio.current_time() + MIN_CANCEL_GRACE
                )
                with anyio.CancelScope(deadline=deadline):
                    await dispatch_done.wait()
                if not dispatch_done.is_set():
                    self._abandon(dispatcher)
                    await dispatch_done.wait()
            http_shutdown.set()
            with anyio.move_on_after(3):
                await http_done.wait()
            tg.cancel_scope.cancel()
        notify.close()
        log.info("stopped")

    def _abandon(self, dispatcher: Dispatcher) -> None:
        """Handlers still running after their cancellation (they swallow ``CancelledError``, or
        wait on something that cannot be cancelled) must not keep ``pgreact run`` from ending."""
        log.error(
            "drain_abandoned",
            claims_held=dispatcher.in_flight(),
            detail="handler calls ignored their cancellation past PGREACT_SHUTDOWN_TIMEOUT; "
            "their claims are left to be reaped (a handler must not swallow CancelledError)",
            exiting=self.exit_when_stuck,
        )
        if self.exit_when_stuck:
            # Nothing else can end the process: asyncio's own shutdown would wait for these
            # tasks too. The server rolls their transactions back when the sockets close.
            for stream in (sys.stdout, sys.stderr):
                stream.flush()
            os._exit(0)

    async def _readiness(self) -> dict[str, str]:
        down: dict[str, str] = {}
        listener = self._listener
        if listener is None or not listener.connected:
            why = listener.last_error if listener is not None else None
            down["listener"] = "LISTEN connection is down (reconnecting)" + (
                f": {mask_url(why)[:300]}" if why else ""
            )
        if self._housekeeper is not None:  # tables whose changes are not (all) captured
            down.update(
                (f"capture:{name}", problem)
                for name, problem in self._housekeeper.capture_problems.items()
            )
        engine = self._engine
        if engine is None:
            down["database"] = "not started"
            return down
        try:
            with anyio.fail_after(READY_PING_TIMEOUT):
                async with engine.connect() as conn:
                    await conn.execute(text("SELECT 1"))
        except TimeoutError:
            down["database"] = f"no pooled connection answered within {READY_PING_TIMEOUT:g} s"
        except Exception as exc:
            down["database"] = f"{type(exc).__name__}: {_short(exc)}"
        return down

    async def _check_installed(self, engine: AsyncEngine) -> None:
        """Refuse to run against a database ``pgreact install`` has not prepared: the daemon
        would wait forever for events nobody captures."""
        schema = self.settings.schema_name
        async with engine.connect() as conn:
            version = await installer.schema_version(conn, schema)
            if version < installer.latest_version():
                raise SchemaError(
                    f"pgreact's schema {schema!r} is at version {version}, the daemon needs "
                    f"{installer.latest_version()}: run `pgreact install` first"
                )
            names = {
                r[0]
                for r in await conn.execute(
                    text(f'SELECT handler FROM "{schema}".subscriptions')  # validated identifier
                )
            }
        missing = [h.name for h in self.router.durable if h.name not in names]
        if missing:
            raise SchemaError(
                f"handler(s) {', '.join(missing)} are not installed (no capture set up): "
                "run `pgreact install` with the same PGREACT_HANDLERS"
            )


def _lease_seconds(s: Settings) -> float:
    """A backstop only (a dead owner is noticed through its presence lock at once): long enough
    for a whole batch of calls that each run up to the handler timeout."""
    return s.handler_timeout * max(s.batch_size, 1) + 60


def _on_invalidate(housekeeper: Housekeeper) -> Callable[..., None]:
    def invalidated(*_args: object) -> None:
        housekeeper.connection_lost()

    return invalidated


def _pool_snapshot(engine: AsyncEngine) -> PoolSnapshot | None:
    pool = engine.sync_engine.pool
    try:
        checked_out = int(pool.checkedout())  # type: ignore[attr-defined]
        idle = int(pool.checkedin())  # type: ignore[attr-defined]
        overflow = max(0, int(pool.overflow()))  # type: ignore[attr-defined]
    except AttributeError:
        return None
    return PoolSnapshot(checked_out=checked_out, idle=idle, overflow=overflow)


def _short(exc: BaseException) -> str:
    return str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
