"""One test module for every listener backend: asyncpg, psycopg and the in-memory one.

Real backends run against the PostgreSQL the test session started (``pg_dsn``) or, for server
restarts, against a ``private_pg_server``; half-open connections are produced by a small TCP
proxy (:class:`BlackholeProxy`) that silently stops forwarding while keeping both sockets open.
The memory backend stands in for the same faults with its broker hooks.

Timing: heartbeats every 0.3 s, 1 s heartbeat timeout, back-off 0.05 s .. 0.5 s.
"""

from __future__ import annotations

import collections
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Callable, Collection
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import anyio
import anyio.abc
import asyncpg
import pytest
import structlog
from anyio.abc import SocketAttribute

from pgreact.listeners import (
    Backoff,
    Listener,
    ListenerBackend,
    ListenerConnectError,
    ListenerConnection,
    ListenerError,
    ListenerLost,
    Notification,
    backend_for,
    libpq_dsn,
    mask_dsn,
)
from pgreact.listeners.memory import MemoryBackend, MemoryBroker
from tests.support import CountingBackend

pytestmark = pytest.mark.anyio

BACKENDS = ("asyncpg", "psycopg", "memory")
REAL_BACKENDS = ("asyncpg", "psycopg")
HEARTBEAT_INTERVAL = 0.3
HEARTBEAT_TIMEOUT = 1.0
CHANNEL = "pgreact_test"


# -- helpers ----------------------------------------------------------------------------------


async def eventually(
    predicate: Callable[[], bool], within: float, what: str, *, poll: float = 0.005
) -> float:
    """Wait until ``predicate()`` holds; return how long it took. Fail after ``within`` s."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > within:
            pytest.fail(f"timed out after {within}s waiting for {what}")
        await anyio.sleep(poll)
    return time.monotonic() - start


@dataclass
class Recorder:
    """Callbacks for a Listener that only record what happened."""

    notes: list[Notification] = field(default_factory=list)
    connected: list[tuple[float, int]] = field(default_factory=list)  # (monotonic, pid)
    disconnected: list[float] = field(default_factory=list)
    threads: set[int] = field(default_factory=set)

    def on_notification(self, note: Notification) -> None:
        self.notes.append(note)
        self.threads.add(threading.get_ident())

    async def on_connected(self, conn: ListenerConnection) -> None:
        self.connected.append((time.monotonic(), conn.backend_pid))

    def on_disconnected(self) -> None:
        self.disconnected.append(time.monotonic())

    def payloads(self, channel: str = CHANNEL) -> list[str]:
        return [n.payload for n in self.notes if n.channel == channel]


class Harness:
    """What a test needs from "the server", for one backend."""

    name: str
    dsn: str
    backend: ListenerBackend

    @property
    def sender_pid(self) -> int:
        raise NotImplementedError

    async def send(self, channel: str, payload: str) -> None:
        raise NotImplementedError

    async def send_range(self, channel: str, start: int, stop: int) -> None:
        """NOTIFY payloads str(start) .. str(stop - 1), in one transaction."""
        raise NotImplementedError

    async def terminate(self, pid: int) -> None:
        raise NotImplementedError

    async def activity(self, pid: int) -> tuple[str, str, object]:
        """(application_name, state, backend_xid) of a session."""
        raise NotImplementedError


class PgHarness(Harness):
    def __init__(self, name: str, dsn: str, sender: Any) -> None:
        self.name = name
        self.dsn = dsn
        self.backend = backend_for(name)
        self.sender = sender

    @property
    def sender_pid(self) -> int:
        return int(self.sender.get_server_pid())

    async def send(self, channel: str, payload: str) -> None:
        await self.sender.execute("SELECT pg_notify($1, $2)", channel, payload)

    async def send_range(self, channel: str, start: int, stop: int) -> None:
        await self.sender.execute(
            "SELECT pg_notify($1, g::text) FROM generate_series($2::int, $3::int) AS g ORDER BY g",
            channel,
            start,
            stop - 1,
        )

    async def terminate(self, pid: int) -> None:
        assert await self.sender.fetchval("SELECT pg_terminate_backend($1)", pid)

    async def activity(self, pid: int) -> tuple[str, str, object]:
        row = await self.sender.fetchrow(
            "SELECT application_name, state, backend_xid FROM pg_stat_activity WHERE pid = $1",
            pid,
        )
        assert row is not None, f"no session with pid {pid}"
        return row["application_name"], row["state"], row["backend_xid"]


class MemoryHarness(Harness):
    SENDER_PID = 4242

    def __init__(self) -> None:
        self.name = "memory"
        self.dsn = "memory://"
        self.broker = MemoryBroker(queue_usage=0.25)
        self.backend = MemoryBackend(self.broker)

    @property
    def sender_pid(self) -> int:
        return self.SENDER_PID

    async def send(self, channel: str, payload: str) -> None:
        self.broker.notify(channel, payload, pid=self.SENDER_PID)

    async def send_range(self, channel: str, start: int, stop: int) -> None:
        for i in range(start, stop):
            self.broker.notify(channel, str(i), pid=self.SENDER_PID)
        await anyio.lowlevel.checkpoint()

    async def terminate(self, pid: int) -> None:
        assert self.broker.drop(pid)

    async def activity(self, pid: int) -> tuple[str, str, object]:
        conn = next(c for c in self.broker.connections if c.backend_pid == pid)
        return conn.application_name, "idle", None


@pytest.fixture(params=BACKENDS)
async def harness(request: pytest.FixtureRequest) -> AsyncIterator[Harness]:
    name = str(request.param)
    if name == "memory":
        yield MemoryHarness()
        return
    dsn = str(request.getfixturevalue("pg_dsn"))
    sender = await asyncpg.connect(dsn)
    try:
        yield PgHarness(name, dsn, sender)
    finally:
        await sender.close()


def make_listener(
    backend: ListenerBackend,
    dsn: str,
    recorder: Recorder,
    *,
    channels: Collection[str] = (CHANNEL,),
    application_name: str = "pgreact-test",
    connect_timeout: float = 5.0,
    **kwargs: Any,
) -> Listener:
    return Listener(
        backend,
        dsn,
        channels=channels,
        application_name=application_name,
        on_notification=recorder.on_notification,
        on_connected=recorder.on_connected,
        on_disconnected=recorder.on_disconnected,
        heartbeat_interval=HEARTBEAT_INTERVAL,
        heartbeat_timeout=HEARTBEAT_TIMEOUT,
        connect_timeout=connect_timeout,
        backoff=Backoff(0.05, 0.5),
        **kwargs,
    )


@contextlib.asynccontextmanager
async def running(listener: Listener) -> AsyncIterator[anyio.abc.TaskGroup]:
    """Run ``listener`` (started: first connection up) for the duration of the block."""
    async with anyio.create_task_group() as tg:
        with anyio.fail_after(15):
            await tg.start(listener.run)
        yield tg
        tg.cancel_scope.cancel()


# -- delivery ---------------------------------------------------------------------------------


async def test_receives_notification_with_channel_payload_and_pid(harness: Harness) -> None:
    rec = Recorder()
    odd_channel = 'Mixed "Case" chän'  # needs identifier quoting in LISTEN
    listener = make_listener(harness.backend, harness.dsn, rec, channels=[CHANNEL, odd_channel])
    async with running(listener):
        assert listener.connected
        assert listener.backend_name == harness.name
        await harness.send(CHANNEL, "hello")
        await harness.send(odd_channel, "odd")
        await harness.send("not_listened", "ignored")
        await eventually(lambda: len(rec.notes) >= 2, 5, "two notifications")
        await anyio.sleep(0.1)
    assert rec.notes == [
        Notification(channel=CHANNEL, payload="hello", pid=harness.sender_pid),
        Notification(channel=odd_channel, payload="odd", pid=harness.sender_pid),
    ]
    assert not listener.connected


async def test_unicode_and_near_limit_payloads(harness: Harness) -> None:
    rec = Recorder()
    unicode_payload = "héllo wörld ✓ 日本語 🎉 \\ ' \" \n\t end"
    big = "x" * 7990 + "€€€"  # 7999 bytes in UTF-8: the largest payload PostgreSQL accepts
    assert len(big.encode()) == 7999
    async with running(make_listener(harness.backend, harness.dsn, rec)):
        await harness.send(CHANNEL, unicode_payload)
        await harness.send(CHANNEL, big)
        await harness.send(CHANNEL, "")
        await eventually(lambda: len(rec.notes) >= 3, 5, "three notifications")
    assert rec.payloads() == [unicode_payload, big, ""]


@pytest.mark.parametrize("transactions", [1, 500])
async def test_many_notifications_none_lost_order_kept(
    harness: Harness, transactions: int, capsys: pytest.CaptureFixture[str]
) -> None:
    total = 5000
    rec = Recorder()
    listener = make_listener(harness.backend, harness.dsn, rec)
    lags: list[float] = []

    async def measure_loop_lag() -> None:
        while True:
            before = time.monotonic()
            await anyio.sleep(0.005)
            lags.append(time.monotonic() - before - 0.005)

    pings = 0

    async def query_meanwhile() -> None:
        # Commands on the listening connection while notifications pour in: for psycopg this
        # interrupts notifies() again and again (notifications then arrive during commands).
        nonlocal pings
        while True:
            conn = listener.connection
            if conn is not None:
                with contextlib.suppress(ListenerError):
                    await conn.fetch_value("SELECT 1")
                    pings += 1
            await anyio.lowlevel.checkpoint()

    async with running(listener) as tg:
        tg.start_soon(measure_loop_lag)
        tg.start_soon(query_meanwhile)
        start = time.monotonic()
        per_tx = total // transactions
        for first in range(0, total, per_tx):
            await harness.send_range(CHANNEL, first, first + per_tx)
        sent = time.monotonic()
        await eventually(lambda: len(rec.notes) >= total, 30, f"{total} notifications")
        done = time.monotonic()
        await anyio.sleep(HEARTBEAT_INTERVAL * 2)  # nothing more arrives, heartbeats stay hidden
        assert listener.connected
    assert rec.payloads() == [str(i) for i in range(total)]
    assert len(rec.notes) == total
    assert rec.threads == {threading.get_ident()}  # called in the event loop's thread
    # The callback only records: the loop keeps turning while thousands arrive.
    assert max(lags) < 0.5, f"event loop stalled for {max(lags):.3f}s"
    assert pings > 10
    with capsys.disabled():
        print(
            f"\n[{harness.name}] {total} notifications in {transactions} tx: sent in"
            f" {sent - start:.3f}s, all received after {done - start:.3f}s"
            f" ({total / (done - start):,.0f}/s end to end, max loop lag {max(lags) * 1000:.1f} ms,"
            f" {pings} queries on the listening connection meanwhile)"
        )


async def test_heartbeats_are_consumed_and_queue_usage_read(harness: Harness) -> None:
    rec = Recorder()
    listener = make_listener(harness.backend, harness.dsn, rec)
    before = time.monotonic()
    async with running(listener):
        assert listener.last_heartbeat_ok is not None  # the first heartbeat precedes "connected"
        first = listener.last_heartbeat_ok
        await eventually(
            lambda: (listener.last_heartbeat_ok or 0) > first + HEARTBEAT_INTERVAL,
            5,
            "a later heartbeat",
        )
        assert listener.last_heartbeat_ok is not None
        assert before < listener.last_heartbeat_ok <= time.monotonic()
    assert rec.notes == []  # heartbeat notifications never reach on_notification
    assert listener.heartbeat_channel.startswith("pgreact_hb_")
    if harness.name == "memory":
        assert listener.queue_usage == 0.25
    else:
        assert 0.0 <= listener.queue_usage < 0.01


async def test_application_name_and_never_idle_in_transaction(harness: Harness) -> None:
    rec = Recorder()
    listener = make_listener(harness.backend, harness.dsn, rec, application_name="pgreact-probe")
    async with running(listener):
        assert listener.connection is not None
        pid = listener.connection.backend_pid
        states = set()
        for i in range(40):  # ~1.2 s: several heartbeats and notifications in between
            await harness.send(CHANNEL, str(i))
            app, state, xid = await harness.activity(pid)
            assert app == "pgreact-probe"
            assert xid is None, "the listener connection holds a transaction id"
            states.add(state)
            await anyio.sleep(0.03)
        await eventually(lambda: len(rec.notes) == 40, 5, "all notifications")
    assert states <= {"idle", "active"}, states


# -- faults -----------------------------------------------------------------------------------


async def test_reconnects_after_backend_terminated(harness: Harness) -> None:
    rec = Recorder()
    listener = make_listener(harness.backend, harness.dsn, rec)
    async with running(listener):
        for round_no in range(1, 3):
            assert listener.connection is not None
            old_pid = listener.connection.backend_pid
            killed_at = time.monotonic()
            await harness.terminate(old_pid)
            await eventually(lambda n=round_no: len(rec.connected) > n, 5, "on_connected again")
            took = rec.connected[-1][0] - killed_at
            assert took < 1.0, f"reconnect took {took:.3f}s"
            assert rec.connected[-1][1] != old_pid
            assert listener.connected
            assert listener.reconnects == round_no
            assert len(rec.disconnected) == round_no
            print(f"[{harness.name}] reconnected {took * 1000:.0f} ms after terminate")
        await harness.send(CHANNEL, "after")
        await eventually(lambda: rec.payloads() == ["after"], 5, "delivery after reconnect")


class ServerFaults:
    """Stop/start/restart of "the server" for one backend."""

    def __init__(self, harness_name: str, request: pytest.FixtureRequest) -> None:
        self.name = harness_name
        if harness_name == "memory":
            self.broker = MemoryBroker()
            self.backend: ListenerBackend = MemoryBackend(self.broker)
            self.dsn = "memory://"
        else:
            self.server = request.getfixturevalue("private_pg_server")
            self.backend = backend_for(harness_name)
            self.dsn = self.server.dsn("postgres")

    async def restart(self) -> None:
        if self.name == "memory":
            self.broker.refuse_connections(True)
            self.broker.drop_all()
            await anyio.sleep(0.1)
            self.broker.refuse_connections(False)
        else:
            await anyio.to_thread.run_sync(self.server.restart)

    async def stop(self) -> None:
        if self.name == "memory":
            self.broker.refuse_connections(True)
            self.broker.drop_all()
        else:
            await anyio.to_thread.run_sync(self.server.stop)

    async def start(self) -> None:
        if self.name == "memory":
            self.broker.refuse_connections(False)
        else:
            await anyio.to_thread.run_sync(self.server.start)


@pytest.mark.parametrize("backend_name", BACKENDS)
async def test_survives_server_restart_and_outage(
    backend_name: str, request: pytest.FixtureRequest
) -> None:
    faults = ServerFaults(backend_name, request)
    counting = CountingBackend(faults.backend)
    rec = Recorder()
    listener = make_listener(counting, faults.dsn, rec, connect_timeout=2.0)
    with structlog.testing.capture_logs() as logs:
        async with running(listener):
            # 1. A restart: the connection drops, the next attempts succeed.
            await faults.restart()
            await eventually(lambda: len(rec.connected) == 2, 10, "reconnect after restart")
            assert listener.reconnects == 1

            # 2. An outage: keeps trying with back-off, never gives up.
            await faults.stop()
            await eventually(lambda: not listener.connected, 5, "loss noticed")
            failures_before = counting.failures
            await anyio.sleep(2.0)
            retried = counting.failures - failures_before
            # back-off 0.05 s .. 0.5 s: a few retries per second, not a tight loop
            assert 3 <= retried <= 30, retried
            assert not listener.connected
            started = time.monotonic()
            await faults.start()
            await eventually(lambda: len(rec.connected) == 3, 10, "reconnect after start")
            print(f"[{backend_name}] reconnected {time.monotonic() - started:.3f}s after start")
            assert listener.connected
            assert listener.reconnects == 2
    # Each distinct error is a warning once; identical repeats within 30 s are debug lines.
    failed = [e for e in logs if e["event"].startswith("listener connect ")]
    warned = [e["error"] for e in failed if e["log_level"] == "warning"]
    assert warned
    # (at most once per outage: the slate is wiped after each successful connect)
    assert max(collections.Counter(warned).values()) <= 2, warned
    assert len(failed) > len(warned)
    assert all({"backend", "attempt", "delay", "dsn", "error"} <= e.keys() for e in failed)


class BlackholeProxy:
    """A TCP proxy that can silently stop forwarding on its open connections.

    After :meth:`blackhole`, bytes from either side of the connections open at that moment are
    read and dropped; the sockets stay open (like a dead peer behind a NAT that forgot the
    flow). Connections made afterwards are forwarded normally.
    """

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.port = 0
        self._links: list[dict[str, bool]] = []

    async def serve(self, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        async with await anyio.create_tcp_listener(local_host="127.0.0.1") as listener:
            self.port = listener.extra(SocketAttribute.local_port)  # noqa: S610
            task_status.started()
            await listener.serve(self._handle)

    def blackhole(self) -> None:
        for link in self._links:
            link["dead"] = True

    async def _handle(self, client: anyio.abc.SocketStream) -> None:
        link = {"dead": False}
        self._links.append(link)
        async with (
            client,
            await anyio.connect_tcp(*self.target) as upstream,
            anyio.create_task_group() as tg,
        ):
            tg.start_soon(self._pump, client, upstream, link, tg.cancel_scope)
            tg.start_soon(self._pump, upstream, client, link, tg.cancel_scope)

    @staticmethod
    async def _pump(
        src: anyio.abc.SocketStream,
        dst: anyio.abc.SocketStream,
        link: dict[str, bool],
        scope: anyio.CancelScope,
    ) -> None:
        with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            async for chunk in src:
                if not link["dead"]:
                    await dst.send(chunk)
        scope.cancel()  # one side hung up: close both


async def test_heartbeat_detects_half_open_connection(harness: Harness) -> None:
    rec = Recorder()
    async with anyio.create_task_group() as tg:
        proxy: BlackholeProxy | None = None
        dsn = harness.dsn
        if isinstance(harness, PgHarness):
            host, port = host_port(harness.dsn)
            proxy = BlackholeProxy(host, port)
            await tg.start(proxy.serve)
            dsn = harness.dsn.replace(f":{port}/", f":{proxy.port}/")
        listener = make_listener(harness.backend, dsn, rec, connect_timeout=3.0)
        await tg.start(listener.run)
        await anyio.sleep(HEARTBEAT_INTERVAL)

        cut_at = time.monotonic()
        if proxy is not None:
            proxy.blackhole()
        else:
            assert isinstance(harness, MemoryHarness)
            harness.broker.stall(True)
        await harness.send(CHANNEL, "lost in the void")  # never delivered to the dead link
        budget = HEARTBEAT_INTERVAL + HEARTBEAT_TIMEOUT + 1.0
        await eventually(lambda: bool(rec.disconnected), budget + 1, "half-open detected")
        detected = rec.disconnected[0] - cut_at
        assert detected <= budget, f"detected after {detected:.3f}s"
        assert listener.reconnects == 1
        print(f"[{harness.name}] half-open connection detected after {detected:.3f}s")
        if isinstance(harness, MemoryHarness):
            harness.broker.stall(False)  # new connections work again (the proxy allows them)

        await eventually(lambda: listener.connected, 10, "reconnect")
        print(f"[{harness.name}] reconnected {rec.connected[-1][0] - cut_at:.3f}s after the cut")
        await harness.send(CHANNEL, "back")
        await eventually(lambda: "back" in rec.payloads(), 5, "delivery after reconnect")
        tg.cancel_scope.cancel()
    assert "lost in the void" not in rec.payloads()


def host_port(dsn: str) -> tuple[str, int]:
    parts = urlsplit(dsn)
    return parts.hostname or "127.0.0.1", parts.port or 5432


# -- supervisor behaviour (memory backend: deterministic faults) -------------------------------


async def test_start_waits_for_first_connection() -> None:
    broker = MemoryBroker()
    broker.refuse_connections(True)
    rec = Recorder()
    listener = make_listener(MemoryBackend(broker), "memory://", rec)
    async with anyio.create_task_group() as tg:

        async def unrefuse_later() -> None:
            await anyio.sleep(0.3)
            broker.refuse_connections(False)

        tg.start_soon(unrefuse_later)
        started = time.monotonic()
        await tg.start(listener.run)
        assert time.monotonic() - started >= 0.3
        assert listener.connected
        assert broker.connect_attempts >= 3
        assert listener.reconnects == 0  # failed attempts are not reconnects
        tg.cancel_scope.cancel()
    assert broker.connections == []  # cancelled: the connection is closed
    assert not listener.connected
    assert rec.disconnected == []  # shutdown is not a loss


async def test_connect_to_stalled_server_times_out_and_retries() -> None:
    broker = MemoryBroker()
    broker.stall(True)
    backend = CountingBackend(MemoryBackend(broker))
    rec = Recorder()
    listener = make_listener(backend, "memory://", rec, connect_timeout=0.2)
    async with anyio.create_task_group() as tg:
        tg.start_soon(listener.run)
        await eventually(lambda: backend.failures >= 2, 5, "two timed-out attempts")
        assert not listener.connected
        broker.stall(False)
        await eventually(lambda: listener.connected, 5, "connected once reachable")
        tg.cancel_scope.cancel()
    assert len(rec.connected) == 1


async def test_stalled_on_connected_counts_as_failure() -> None:
    broker = MemoryBroker()
    stalled_once: list[bool] = []

    async def on_connected(conn: ListenerConnection) -> None:
        if not stalled_once:
            stalled_once.append(True)
            await anyio.sleep_forever()

    backend = CountingBackend(MemoryBackend(broker))
    listener = Listener(
        backend,
        "memory://",
        channels=[CHANNEL],
        application_name="t",
        on_notification=lambda _n: None,
        on_connected=on_connected,
        connect_timeout=0.2,
        backoff=Backoff(0.01, 0.05),
    )
    async with running(listener):
        # Each attempt opens the listening connection and a short-lived delivery-test sender.
        assert backend.attempts == 4
    assert broker.connections == []


async def test_on_connected_failure_is_a_connection_failure() -> None:
    broker = MemoryBroker()
    calls: list[int] = []

    async def flaky_on_connected(conn: ListenerConnection) -> None:
        calls.append(conn.backend_pid)
        if len(calls) < 3:
            raise RuntimeError("presence lock unavailable")

    listener = Listener(
        MemoryBackend(broker),
        "memory://",
        channels=[CHANNEL],
        application_name="t",
        on_notification=lambda _n: None,
        on_connected=flaky_on_connected,
        backoff=Backoff(0.01, 0.05),
    )
    with structlog.testing.capture_logs() as logs:
        async with running(listener):
            assert len(calls) == 3
            assert len(set(calls)) == 3  # a new connection each time
            assert len(broker.connections) == 1  # the failed ones were closed
    errors = [e for e in logs if e["event"] == "on_connected raised"]
    assert len(errors) == 2
    assert errors[0]["log_level"] == "error"


async def test_on_connected_can_query_and_notify() -> None:
    broker = MemoryBroker()
    broker.set_value("pg_try_advisory_lock", False)
    seen: list[object] = []

    async def on_connected(conn: ListenerConnection) -> None:
        seen.append(await conn.fetch_value("SELECT pg_try_advisory_lock($1)", 42))
        await conn.notify(CHANNEL, "catch-up")

    rec = Recorder()
    listener = Listener(
        MemoryBackend(broker),
        "memory://",
        channels=[CHANNEL],
        application_name="t",
        on_notification=rec.on_notification,
        on_connected=on_connected,
    )
    async with running(listener):
        await eventually(lambda: bool(rec.notes), 2, "self notification")
    assert seen == [False]
    assert ("SELECT pg_try_advisory_lock($1)", (42,)) in broker.queries
    assert rec.payloads() == ["catch-up"]


async def test_broken_listen_delivery_is_reported_like_a_transaction_pooler() -> None:
    broker = MemoryBroker()
    broker.set_value("pg_notify", "")  # NOTIFY accepted but never delivered back
    backend = CountingBackend(MemoryBackend(broker))
    listener = Listener(
        backend,
        "postgresql://app:hunter2@pooler:6432/app",
        channels=[CHANNEL],
        application_name="t",
        on_notification=lambda _n: None,
        heartbeat_timeout=0.1,
        backoff=Backoff(0.01, 0.02),
    )
    with structlog.testing.capture_logs() as logs:
        async with anyio.create_task_group() as tg:
            tg.start_soon(listener.run)
            await eventually(lambda: backend.attempts >= 3, 5, "three attempts")
            assert not listener.connected
            tg.cancel_scope.cancel()
    assert broker.connections == []
    warning = next(e for e in logs if e["log_level"] == "warning")
    assert "transaction-mode pooler" in warning["error"]
    assert warning["dsn"] == "postgresql://app:***@pooler:6432/app"
    assert "hunter2" not in repr(logs)


async def test_repeated_identical_failures_are_logged_once() -> None:
    broker = MemoryBroker()
    broker.refuse_connections(True)
    listener = make_listener(MemoryBackend(broker), "memory://", Recorder())
    listener._backoff = Backoff(0.001, 0.002)
    with structlog.testing.capture_logs() as logs:
        async with anyio.create_task_group() as tg:
            tg.start_soon(listener.run)
            await eventually(lambda: broker.connect_attempts >= 50, 5, "50 attempts")
            tg.cancel_scope.cancel()
    levels = [e["log_level"] for e in logs if e["event"].startswith("listener connect ")]
    assert levels.count("warning") == 1
    assert levels.count("debug") >= 45


async def test_backoff_resets_only_after_a_healthy_period() -> None:
    broker = MemoryBroker()
    rec = Recorder()
    backoff = Backoff(0.01, 1.0)
    listener = Listener(
        MemoryBackend(broker),
        "memory://",
        channels=[CHANNEL],
        application_name="t",
        on_notification=rec.on_notification,
        on_connected=rec.on_connected,
        heartbeat_interval=0.05,
        backoff=backoff,
        healthy_after=0.5,
    )
    async with running(listener):
        for n in range(1, 4):  # flapping: dropped right after each connect
            broker.drop_all()
            await eventually(lambda n=n: len(rec.connected) > n, 5, "reconnect")
        assert backoff.attempt == 3  # growing, not reset
        connected_at = rec.connected[-1][0]
        await eventually(lambda: backoff.attempt == 0, 10, "the back-off reset")
        # Not before the connection had been healthy for healthy_after (load only delays it).
        assert time.monotonic() - connected_at >= 0.5


async def test_notification_callback_errors_do_not_break_the_listener() -> None:
    broker = MemoryBroker()
    got: list[str] = []

    def picky(note: Notification) -> None:
        if note.payload == "bad":
            raise ValueError("cannot handle")
        got.append(note.payload)

    listener = Listener(
        MemoryBackend(broker),
        "memory://",
        channels=[CHANNEL],
        application_name="t",
        on_notification=picky,
    )
    with structlog.testing.capture_logs() as logs:
        async with running(listener):
            for payload in ("a", "bad", "b"):
                broker.notify(CHANNEL, payload)
            assert listener.connected
    assert got == ["a", "b"]
    assert any(e["event"] == "on_notification raised" for e in logs)


async def test_run_twice_concurrently_is_refused() -> None:
    listener = make_listener(MemoryBackend(), "memory://", Recorder())
    async with running(listener):
        with pytest.raises(RuntimeError, match="already running"):
            await listener.run()


# -- backends directly --------------------------------------------------------------------------


@pytest.mark.parametrize("name", REAL_BACKENDS)
async def test_connect_error_is_translated(name: str) -> None:
    async with await anyio.create_tcp_listener(local_host="127.0.0.1") as closed:
        port = closed.extra(SocketAttribute.local_port)  # noqa: S610
    with pytest.raises(ListenerConnectError, match="could not connect") as info:
        await backend_for(name).connect(
            f"postgresql+{name}://u:pw@127.0.0.1:{port}/db",
            application_name="t",
            on_notification=lambda _n: None,
            connect_timeout=2,
        )
    assert info.value.__cause__ is not None


async def test_connection_api_and_errors(harness: Harness) -> None:
    got: list[Notification] = []
    conn = await harness.backend.connect(
        harness.dsn, application_name="direct", on_notification=got.append, connect_timeout=5
    )
    try:
        await conn.listen([CHANNEL])
        await conn.notify(CHANNEL, "self")
        assert await conn.fetch_value("SELECT pg_backend_pid()") == conn.backend_pid
        await eventually(lambda: bool(got), 5, "self notification")
        assert got == [Notification(CHANNEL, "self", conn.backend_pid)]
        if harness.name != "memory":
            assert await conn.fetch_value("SELECT $1::int + $2::int", 2, 3) == 5
            assert await conn.fetch_value("SELECT 'a%s'") == "a%s"
            assert await conn.fetch_value("SELECT NULL") is None
            with pytest.raises(ListenerError) as info:
                await conn.fetch_value("SELECT * FROM no_such_table")
            assert not isinstance(info.value, ListenerLost)  # still usable:
            assert await conn.fetch_value("SELECT 1") == 1
        await harness.terminate(conn.backend_pid)
        with anyio.fail_after(5), pytest.raises(ListenerLost):
            await conn.wait_closed()
        with pytest.raises(ListenerLost):
            await conn.notify(CHANNEL, "after")
    finally:
        await conn.aclose()
        await conn.aclose()  # twice is fine
    conn2 = await harness.backend.connect(
        harness.dsn, application_name="direct", on_notification=got.append, connect_timeout=5
    )
    await conn2.aclose()
    with anyio.fail_after(2):
        await conn2.wait_closed()  # returns (no error) once closed by us


def test_backend_for() -> None:
    for name in BACKENDS:
        assert backend_for(name).name == name
    with pytest.raises(ValueError, match="asyncpg, psycopg, memory"):
        backend_for("pg8000")


@pytest.mark.parametrize(
    ("dsn", "masked"),
    [
        ("postgresql://app:s3cr%40t@db:5432/app", "postgresql://app:***@db:5432/app"),
        (
            "postgresql+asyncpg://app:pw@db/app?sslmode=require",
            "postgresql+asyncpg://app:***@db/app?sslmode=require",
        ),
        ("postgresql://app@db/app?password=pw&x=1", "postgresql://app@db/app?password=***&x=1"),
        ("postgresql://db/app", "postgresql://db/app"),
        ("host=db password='a b' user=app", "host=db password=*** user=app"),
        ("host=db password=pw", "host=db password=***"),
    ],
)
def test_mask_dsn(dsn: str, masked: str) -> None:
    assert mask_dsn(dsn) == masked


def test_libpq_dsn_strips_driver_suffix() -> None:
    assert libpq_dsn("postgresql+asyncpg://u@h/d") == "postgresql://u@h/d"
    assert libpq_dsn("postgres+psycopg://u@h/d") == "postgres://u@h/d"
    assert libpq_dsn("postgresql://u@h/d") == "postgresql://u@h/d"
    assert libpq_dsn("host=h dbname=d") == "host=h dbname=d"
