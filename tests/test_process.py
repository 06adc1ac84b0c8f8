"""Real ``pgreact run`` processes (``python -m pgreact.cli run``), for both drivers: signals,
several processes on one database, the HTTP probes and metrics, JSON logs, crash loops.

The daemons load :mod:`tests.handlers.effects` (handlers ``single`` and ``batch`` on
``public.source``, one ``effects`` row per event) and are tuned through ``PGREACT_TEST_*``.
Readiness is taken from the daemon's own ``started`` log line, not from HTTP, except in the
tests about HTTP itself. Every wait polls with a deadline; every process is killed at teardown.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from conftest import TestServer, create_database, to_sa_url

from tests.handlers.effects import router as effects_router
from tests.support import create_tables, effect_counts, queue_state, spawn_daemon, sql

PASSWORD = "Pr0cessSecret"  # put into every URL; trust auth ignores it, no output may show it
START_TIMEOUT = 30.0
CONTRACT_METRICS: dict[str, str] = {
    "pgreact_notifications_received_total": "counter",
    "pgreact_events_handled_total": "counter",
    "pgreact_handler_duration_seconds": "histogram",
    "pgreact_event_lag_seconds": "histogram",
    "pgreact_events_pending": "gauge",
    "pgreact_oldest_pending_age_seconds": "gauge",
    "pgreact_events_dead": "gauge",
    "pgreact_listener_connected": "gauge",
    "pgreact_listener_reconnects_total": "counter",
    "pgreact_notify_queue_usage": "gauge",
    "pgreact_db_pool_connections": "gauge",
    "pgreact_build_info": "gauge",
}


# -- helpers ----------------------------------------------------------------------------------


def poll(predicate: Callable[[], Any], timeout: float, message: str, interval: float = 0.05) -> Any:
    """Return the first truthy ``predicate()``; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {message}")
        time.sleep(interval)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def with_password(libpq_url: str) -> str:
    """Put PASSWORD into a URL that has none (the embedded server trusts everyone and ignores
    it); a URL with its own password is left as it is."""
    return re.sub(r"^(postgres(?:ql)?://)([^:@/]+)@", rf"\g<1>\g<2>:{PASSWORD}@", libpq_url)


def http_get(port: int, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
    """One GET over HTTP/1.1 without ``Connection: close``, as Prometheus and kubelet probes
    send it."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return int(resp.status), resp.read()
    finally:
        conn.close()


@dataclass
class Daemon:
    proc: subprocess.Popen[bytes]
    log_path: Path
    port: int

    def lines(self) -> list[str]:
        try:
            return self.log_path.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return []

    def events(self) -> list[dict[str, Any]]:
        out = []
        for line in self.lines():
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if isinstance(record, dict):
                    out.append(record)
        return out

    def logged(self, event: str) -> bool:
        return any(r.get("event") == event for r in self.events())

    def wait_started(self, timeout: float = START_TIMEOUT) -> None:
        def started() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"daemon exited with {self.proc.returncode} before starting:\n{self.tail()}"
                )
            return self.logged("started")

        poll(started, timeout, "the daemon's `started` log line")

    def terminate(self, timeout: float) -> tuple[int, float]:
        """SIGTERM; return (exit code, seconds until the process was gone)."""
        began = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(
                f"daemon still running {timeout:g} s after SIGTERM:\n{self.tail()}"
            ) from None
        return code, time.monotonic() - began

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.lines()[-n:])


@dataclass
class Spawner:
    tmp_path: Path
    base_env: dict[str, str]
    started: list[Daemon] = field(default_factory=list)

    def __call__(self, **extra: str) -> Daemon:
        env = {**self.base_env, **extra}
        port = int(env["PGREACT_HTTP_PORT"])
        log_path = self.tmp_path / f"daemon-{len(self.started)}.log"
        # spawn_daemon leaves its handle on the log file for the garbage collector (the child
        # has its own copy); that ResourceWarning is not this test's business.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)
            proc = spawn_daemon(env, log_path)
        daemon = Daemon(proc, log_path, port)
        self.started.append(daemon)
        return daemon

    def kill_all(self) -> None:
        for daemon in self.started:
            if daemon.proc.poll() is None:
                daemon.proc.kill()
                daemon.proc.wait(10)


def daemon_env(database_url: str, **extra: str) -> dict[str, str]:
    env = {
        "PGREACT_DATABASE_URL": database_url,
        "PGREACT_HANDLERS": "handlers.effects",
        "PGREACT_HTTP_HOST": "127.0.0.1",
        "PGREACT_HTTP_PORT": str(free_port()),
        "PGREACT_LOG_FORMAT": "json",
        "PGREACT_LOG_LEVEL": "INFO",
        "PGREACT_SWEEP_INTERVAL": "0.5",
        "PGREACT_STATS_INTERVAL": "0.5",
        "PGREACT_HEARTBEAT_INTERVAL": "0.5",
        "PGREACT_HEARTBEAT_TIMEOUT": "1",
        "PGREACT_CONNECT_TIMEOUT": "3",
        "PGREACT_RETRY_BASE": "0.05",
        "PGREACT_RETRY_MAX": "0.2",
        "PGREACT_SHUTDOWN_TIMEOUT": "5",
        "PGREACT_POOL_SIZE": "5",
        "PGREACT_TEST_SLEEP": "0",
        "PGREACT_TEST_FAIL_KEYS": "",
        "PGREACT_TEST_CRASH_KEY": "",
    }
    env.update(extra)
    return env


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The daemons inherit os.environ: no stray PGREACT_* setting of the caller may leak in."""
    for name in list(os.environ):
        if name.startswith("PGREACT_") and name != "PGREACT_CACHE_DIR":
            monkeypatch.delenv(name)


def prepare(dsn: str, sa_url: str) -> None:
    """Tables for the effects handlers, and ``pgreact install`` for them."""
    import anyio

    from tests.support import install

    create_tables(dsn)
    anyio.run(install, sa_url, effects_router)


@pytest.fixture
def spawn(tmp_path: Path, pg_dsn: str, driver: str) -> Iterator[Spawner]:
    """Starts daemons on this test's database (URL with a password); kills leftovers."""
    prepare(pg_dsn, to_sa_url(pg_dsn, driver))
    spawner = Spawner(tmp_path, daemon_env(to_sa_url(with_password(pg_dsn), driver)))
    try:
        yield spawner
    finally:
        spawner.kill_all()


# One-line records of the standard logging module ("WARNING:psycopg:..."): the known bug that
# test_drain_timeout_rolls_back_gives_claims_back_and_logs_json pins down. Tests about other
# things tolerate them (a shutdown can race with a library's warning); tracebacks never pass.
STDLIB_RECORD = re.compile(r"^(DEBUG|INFO|WARNING|ERROR|CRITICAL):[\w.]+:.*$")


def assert_json_logs(daemon: Daemon, *, strict: bool = False) -> None:
    """Every line the process wrote is one JSON object with event, level and timestamp, and
    no line shows the database password."""
    lines = daemon.lines()
    assert lines, "the daemon wrote no log lines at all"
    for number, line in enumerate(lines, 1):
        assert PASSWORD not in line, f"line {number} shows the database password: {line}"
        if not strict and STDLIB_RECORD.match(line):
            continue
        try:
            record = json.loads(line)
        except ValueError:
            raise AssertionError(
                f"{daemon.log_path.name} line {number} is not JSON: {line!r}"
            ) from None
        assert isinstance(record, dict), line
        missing = {"event", "level", "timestamp"} - set(record)
        assert not missing, f"line {number} lacks {sorted(missing)}: {line}"


def live_rows(dsn: str) -> int:
    return queue_state(dsn)["live"]


def all_handled(dsn: str, expected: int, handlers: tuple[str, ...] = ("single", "batch")) -> bool:
    return all(effect_counts(dsn, h)[0] >= expected for h in handlers)


def assert_exactly_once(dsn: str, expected: Mapping[str, int]) -> None:
    for handler, count in expected.items():
        assert effect_counts(dsn, handler) == (count, count), (
            f"{handler}: (effect rows, distinct events) should both be {count}"
        )


# -- SIGTERM ----------------------------------------------------------------------------------


def test_sigterm_drains_releases_claims_and_a_successor_finishes(
    spawn: Spawner, pg_dsn: str
) -> None:
    total = 2000
    shutdown_timeout = 1.0
    first = spawn(
        PGREACT_TEST_SLEEP="0.05",
        PGREACT_BATCH_SIZE="20",
        PGREACT_SHUTDOWN_TIMEOUT=str(shutdown_timeout),
    )
    first.wait_started()
    sql(pg_dsn, "INSERT INTO source SELECT g, g FROM generate_series(1, %s::int) g", [total])

    # Work is in flight: some effects committed, claims held, much still to do.
    poll(
        lambda: effect_counts(pg_dsn, "single")[0] > 0 and queue_state(pg_dsn)["claimed"] > 0,
        20,
        "the first daemon to be busy",
    )
    assert effect_counts(pg_dsn, "single")[0] < total // 2, "too fast: nothing left in flight"

    code, took = first.terminate(timeout=shutdown_timeout + 15)
    assert code == 0, first.tail()
    assert took < shutdown_timeout + 5, f"exit took {took:.1f} s after SIGTERM"
    assert queue_state(pg_dsn)["claimed"] == 0, "claims left behind after a graceful stop"
    # Whatever was in flight was given back, not charged as a failed attempt.
    assert sql(pg_dsn, "SELECT coalesce(max(attempts), 0) FROM pgreact.queue")[0][0] == 0
    done_by_first = effect_counts(pg_dsn, "single")[0]
    assert done_by_first < total
    assert_json_logs(first)

    successor = spawn()
    successor.wait_started()
    poll(lambda: all_handled(pg_dsn, total), 60, "the successor to finish the backlog")
    code, _ = successor.terminate(timeout=20)
    assert code == 0, successor.tail()
    assert_exactly_once(pg_dsn, {"single": total, "batch": total})
    assert queue_state(pg_dsn) == {"live": 0, "dead": 0, "claimed": 0}
    assert_json_logs(successor)


def in_transaction(dsn: str) -> int:
    """Backends of the daemon (not this test) sitting inside an open transaction."""
    return int(
        sql(
            dsn,
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND application_name LIKE 'pgreact%%' AND state LIKE 'idle in transaction%%'",
        )[0][0]
    )


def claimed_by(dsn: str, handler: str) -> int:
    statement = "SELECT count(*) FROM pgreact.queue WHERE handler = %s AND claim_token IS NOT NULL"
    return int(sql(dsn, statement, [handler])[0][0])


def test_drain_timeout_rolls_back_gives_claims_back_and_logs_json(
    spawn: Spawner, pg_dsn: str, driver: str, request: pytest.FixtureRequest
) -> None:
    total = 200
    # Each unit: 20 events x 0.2 s in one transaction; the drain deadline is far shorter.
    daemon = spawn(
        PGREACT_TEST_SLEEP="0.2", PGREACT_BATCH_SIZE="20", PGREACT_SHUTDOWN_TIMEOUT="0.5"
    )
    daemon.wait_started()
    sql(pg_dsn, "INSERT INTO source SELECT g, g FROM generate_series(1, %s::int) g", [total])
    # The slow handler (not only the quick batch one) must be inside its transaction.
    poll(
        lambda: in_transaction(pg_dsn) > 0 and claimed_by(pg_dsn, "single") > 0,
        20,
        "a handler inside its transaction",
    )
    assert effect_counts(pg_dsn, "single")[0] == 0  # nothing committed yet

    code, took = daemon.terminate(timeout=20)
    assert code == 0, daemon.tail()
    assert took < 0.5 + 5, f"exit took {took:.1f} s after SIGTERM"
    assert daemon.logged("drain_timeout")
    # The cancelled units were rolled back and their claims given back, attempts refunded.
    assert queue_state(pg_dsn) == {
        "live": 2 * total - effect_counts(pg_dsn)[0],
        "dead": 0,
        "claimed": 0,
    }
    assert effect_counts(pg_dsn, "single")[0] == 0
    assert sql(pg_dsn, "SELECT coalesce(max(attempts), 0) FROM pgreact.queue")[0][0] == 0
    assert_json_logs(daemon, strict=True)


def test_a_handler_that_swallows_cancellation_cannot_hold_sigterm(
    spawn: Spawner, pg_dsn: str
) -> None:
    """Key 5's call never ends, whatever it is told: the process still ends within
    PGREACT_SHUTDOWN_TIMEOUT, says what it abandoned, and a successor (after reaping the claims
    left behind) does everything exactly once."""
    total, shutdown_timeout = 20, 2.0
    daemon = spawn(PGREACT_TEST_STUBBORN_KEY="5", PGREACT_SHUTDOWN_TIMEOUT=str(shutdown_timeout))
    daemon.wait_started()
    sql(pg_dsn, "INSERT INTO source SELECT g, g FROM generate_series(1, %s::int) g", [total])
    poll(
        lambda: all_handled(pg_dsn, total, ("batch",)) and claimed_by(pg_dsn, "single") > 0,
        20,
        "the stubborn call to be running",
    )
    code, took = daemon.terminate(timeout=shutdown_timeout + 15)
    assert code == 0, daemon.tail()
    # The deadline is the shutdown timeout; the rest is the interpreter starting to exit.
    assert took < shutdown_timeout + 3, f"exit took {took:.1f} s after SIGTERM"
    assert daemon.logged("drain_abandoned"), daemon.tail()
    assert_json_logs(daemon, strict=True)

    successor = spawn()
    successor.wait_started()
    poll(lambda: all_handled(pg_dsn, total), 60, "the successor to handle what was left")
    code, _ = successor.terminate(timeout=20)
    assert code == 0, successor.tail()
    assert_exactly_once(pg_dsn, {"single": total, "batch": total})
    assert queue_state(pg_dsn) == {"live": 0, "dead": 0, "claimed": 0}


# -- two processes ----------------------------------------------------------------------------


def handled_by(daemon: Daemon, handler: str) -> int:
    return sum(
        int(r.get("events", 0))
        for r in daemon.events()
        if r.get("event") == "handled" and r.get("handler") == handler
    )


def test_two_processes_share_the_work_without_duplicates_or_losses(
    spawn: Spawner, pg_dsn: str
) -> None:
    """Two daemons, 3,000 changes, and a handler that always fails on one row: every change
    handled exactly once by each handler, the poison row dead-lettered, and every log line of
    both processes (failures with their tracebacks included) one JSON object."""
    env = {
        "PGREACT_TEST_SLEEP": "0.001",
        "PGREACT_TEST_FAIL_KEYS": "7",
        "PGREACT_MAX_ATTEMPTS": "2",
        "PGREACT_LOG_LEVEL": "DEBUG",
    }
    a = spawn(**env)
    b = spawn(**env, PGREACT_HTTP_PORT=str(free_port()))
    a.wait_started()
    b.wait_started()
    # 3,000 changes in 30 transactions while both run: 1,500 inserts, then 1,500 updates.
    for start in range(1, 1501, 100):
        sql(
            pg_dsn,
            "INSERT INTO source SELECT g, g FROM generate_series(%s::int, %s::int) g",
            [start, start + 99],
        )
    for start in range(1, 1501, 100):
        sql(pg_dsn, "UPDATE source SET v = v + 1 WHERE id BETWEEN %s AND %s", [start, start + 99])
    total = 3000
    poll(lambda: all_handled(pg_dsn, total, ("batch",)), 60, "batch to see all 3,000 changes")
    poll(lambda: live_rows(pg_dsn) == 0, 30, "an empty live queue")
    for daemon in (a, b):
        code, _ = daemon.terminate(timeout=20)
        assert code == 0, daemon.tail()

    # Key 7's insert and update failed twice each and were dead-lettered; nothing else was.
    dead = sql(
        pg_dsn,
        "SELECT handler, row_key, op, attempts FROM pgreact.queue WHERE dead_at IS NOT NULL "
        "ORDER BY id",
    )
    assert dead == [("single", "7", "INSERT", 2), ("single", "7", "UPDATE", 2)]
    assert_exactly_once(pg_dsn, {"single": total - 2, "batch": total})
    ops = dict(sql(pg_dsn, "SELECT op, count(*) FROM effects WHERE handler = 'single' GROUP BY 1"))
    assert ops == {"INSERT": 1499, "UPDATE": 1499}
    # Both processes did part of it (else this test would not test two processes).
    for handler, expected in (("single", total - 2), ("batch", total)):
        shares = [handled_by(a, handler), handled_by(b, handler)]
        assert sum(shares) == expected, (handler, shares)
        assert min(shares) > 0, f"one process did all of {handler}'s work: {shares}"

    for daemon in (a, b):
        assert_json_logs(daemon, strict=True)
    records = a.events() + b.events()
    failures = [r for r in records if r.get("event") == "handler_failed"]
    assert len(failures) == 4, failures  # 2 rows x 2 attempts
    assert {r["outcome"] for r in failures} == {"retry", "dead"}
    assert {r["level"] for r in failures} <= {"warning", "error"}
    assert all("refusing key 7" in r["error"] for r in failures)
    for daemon in (a, b):
        names = {r.get("event") for r in daemon.events()}
        assert {"starting", "started", "stopping", "stopped"} <= names


# -- HTTP -------------------------------------------------------------------------------------


def metric_types(body: str) -> dict[str, str]:
    return dict(re.findall(r"^# TYPE (\S+) (\S+)$", body, flags=re.MULTILINE))


def samples(body: str) -> list[str]:
    return [line for line in body.splitlines() if line and not line.startswith("#")]


def check_metrics(port: int, driver: str, handled: int) -> None:
    status, raw = http_get(port, "/metrics")
    assert status == 200
    text = raw.decode()
    types = metric_types(text)
    lines = samples(text)
    for name, kind in CONTRACT_METRICS.items():
        # Counters are declared as `x` or `x_total`, depending on the client library version.
        declared = types.get(name) or types.get(name.removesuffix("_total"))
        assert declared == kind, f"{name}: TYPE {declared!r}, the contract says {kind}"
        sample = f"{name}_bucket" if kind == "histogram" else name
        assert any(re.match(rf"{sample}[{{ ]", line) for line in lines), f"no {name} sample"
    # A few labelled series the contract names.
    assert 'pgreact_notifications_received_total{channel="pgreact_events"}' in text
    for handler in ("single", "batch"):
        pattern = rf'pgreact_events_handled_total\{{handler="{handler}",outcome="ok"\}} (\S+)'
        match = re.search(pattern, text)
        assert match is not None and float(match.group(1)) == handled, handler
        assert f'pgreact_handler_duration_seconds_count{{handler="{handler}"}}' in text
        assert f'pgreact_events_pending{{handler="{handler}"}}' in text
    for state in ("checked_out", "idle", "overflow"):
        assert f'pgreact_db_pool_connections{{state="{state}"}}' in text
    build = re.search(r"^pgreact_build_info\{(.*)\} 1\.0$", text, flags=re.MULTILINE)
    assert build is not None
    labels = dict(re.findall(r'(\w+)="([^"]*)"', build.group(1)))
    assert labels.keys() == {"version", "listener", "driver"}
    assert labels["driver"] == labels["listener"] == driver
    assert "pgreact_listener_connected 1.0" in text
    assert PASSWORD not in text


def test_http_probes_and_metrics_through_a_database_restart(
    private_pg_server: TestServer, driver: str, tmp_path: Path
) -> None:
    dsn = create_database(private_pg_server)
    prepare(dsn, to_sa_url(dsn, driver))
    spawner = Spawner(tmp_path, daemon_env(to_sa_url(with_password(dsn), driver)))
    try:
        daemon = spawner()
        daemon.wait_started()
        port = daemon.port

        def ready_status() -> tuple[int, dict[str, Any]]:
            status, body = http_get(port, "/readyz")
            return status, json.loads(body)

        poll(lambda: ready_status()[0] == 200, 10, "/readyz 200")
        assert http_get(port, "/livez")[0] == 200
        for path in ("/", "/nope", "/metricsx", "/readyz/extra"):
            assert http_get(port, path)[0] == 404, path
        sql(dsn, "INSERT INTO source SELECT g, g FROM generate_series(1, 20) g")
        poll(lambda: all_handled(dsn, 20), 20, "20 events handled")
        check_metrics(port, driver, handled=20)

        private_pg_server.stop()

        def both_down() -> dict[str, Any] | None:
            status, body = ready_status()
            down = body.get("down", {})
            return body if status == 503 and {"listener", "database"} <= set(down) else None

        body = poll(both_down, 10, "/readyz 503 naming the listener and the database")
        assert body["status"] != "ready"
        assert all(isinstance(v, str) and v for v in body["down"].values()), body
        assert PASSWORD not in json.dumps(body)
        assert http_get(port, "/livez")[0] == 200, "liveness must not follow the database"
        assert "pgreact_listener_connected 0.0" in http_get(port, "/metrics")[1].decode()

        private_pg_server.start()
        poll(lambda: ready_status()[0] == 200, 20, "/readyz 200 again after the restart")
        sql(dsn, "INSERT INTO source SELECT g, g FROM generate_series(21, 70) g")
        poll(lambda: all_handled(dsn, 70), 20, "changes made after the restart to be handled")
        assert_exactly_once(dsn, {"single": 70, "batch": 70})
        metrics = http_get(port, "/metrics")[1].decode()
        reconnects = re.search(r"^pgreact_listener_reconnects_total (\S+)$", metrics, re.M)
        assert reconnects is not None and float(reconnects.group(1)) >= 1
    finally:
        spawner.kill_all()


def test_sigterm_after_http_requests_exits_0_with_json_logs(spawn: Spawner) -> None:
    daemon = spawn()
    daemon.wait_started()
    assert http_get(daemon.port, "/livez")[0] == 200
    code, _ = daemon.terminate(timeout=20)
    assert code == 0, daemon.tail()
    assert_json_logs(daemon, strict=True)


# -- crash loop -------------------------------------------------------------------------------


def test_a_handler_that_kills_the_process_is_dead_lettered_after_max_attempts(
    spawn: Spawner, pg_dsn: str
) -> None:
    total, crash_key, max_attempts = 200, "5", 3
    sql(pg_dsn, "INSERT INTO source SELECT g, g FROM generate_series(1, %s::int) g", [total])
    env = {"PGREACT_TEST_CRASH_KEY": crash_key, "PGREACT_MAX_ATTEMPTS": str(max_attempts)}
    crashes = 0
    daemon = None
    for _ in range(max_attempts + 4):  # bounded: a few more lives than attempts
        daemon = spawn(**env)

        def settled(d: Daemon = daemon) -> str | None:
            if d.proc.poll() is not None:
                return "exited"
            state = queue_state(pg_dsn)
            return "done" if state["live"] == 0 and state["dead"] > 0 else None

        outcome = poll(settled, 30, "the daemon to crash or to finish")
        if outcome == "done":
            break
        assert daemon.proc.returncode == 17, daemon.tail()
        crashes += 1
    assert daemon is not None and daemon.proc.poll() is None, "still crashing after the bound"
    code, _ = daemon.terminate(timeout=20)
    assert code == 0, daemon.tail()

    # The first crash is charged to nobody (the whole batch in flight is refunded and isolated);
    # from then on the event runs alone and each crash counts.
    assert crashes == max_attempts + 1
    dead = sql(
        pg_dsn, "SELECT handler, row_key, attempts FROM pgreact.queue WHERE dead_at IS NOT NULL"
    )
    assert dead == [("single", crash_key, max_attempts)]
    assert_exactly_once(pg_dsn, {"single": total - 1, "batch": total})
    keys = {r[0] for r in sql(pg_dsn, "SELECT k FROM effects WHERE handler = 'single'")}
    assert crash_key not in keys
