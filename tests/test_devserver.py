"""The embedded server and the database fixtures: the ground every other test stands on."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest
from conftest import (
    DB_PREFIX,
    TestServer,
    create_database,
    drop_database,
    fresh_database,
    to_sa_url,
)
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from pgreact.devserver import DevServerError, EmbeddedPostgres, temp_root


@pytest.fixture(scope="module")
def embedded() -> Iterator[EmbeddedPostgres]:
    """One server for the read-only checks (pg_server may be an external one)."""
    with EmbeddedPostgres() as pg:
        yield pg


def _embedded(server: TestServer) -> EmbeddedPostgres:
    assert isinstance(server.control, EmbeddedPostgres)
    return server.control


async def _fetch_one(url: str, driver: str, query: str) -> tuple[Any, ...]:
    if driver == "asyncpg":
        conn = await asyncpg.connect(url)
        try:
            return tuple(await conn.fetchrow(query))
        finally:
            await conn.close()
    async with await psycopg.AsyncConnection.connect(url) as aconn:
        cur = await aconn.execute(query)
        row = await cur.fetchone()
        assert row is not None
        return tuple(row)


def _scalar(dsn: str, query: str) -> Any:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(query).fetchone()
    assert row is not None
    return row[0]


def _execute(dsn: str, statement: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(statement)


def _database_exists(server: TestServer, name: str) -> bool:
    with psycopg.connect(server.dsn(server.maintenance_db), autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM pg_database WHERE datname = %s", [name]).fetchone()
    assert row is not None
    return bool(row[0])


# -- the embedded server ----------------------------------------------------------------------


@pytest.mark.anyio
async def test_accepts_connections_from_both_drivers(
    embedded: EmbeddedPostgres, driver: str
) -> None:
    row = await _fetch_one(
        embedded.url(),
        driver,
        "SELECT current_user, inet_server_addr()::text, inet_server_port(),"
        " current_setting('server_encoding'), current_setting('max_connections'),"
        " current_setting('fsync'), current_setting('synchronous_commit'),"
        " (SELECT rolsuper FROM pg_roles WHERE rolname = current_user)",
    )
    assert row == ("postgres", "127.0.0.1/32", embedded.port, "UTF8", "300", "on", "on", True)


def test_url_paths_and_psql(embedded: EmbeddedPostgres) -> None:
    assert embedded.url("a db") == f"postgresql://postgres@127.0.0.1:{embedded.port}/a%20db"
    for tool in ("psql", "pgbench", "pg_ctl", "postgres"):
        assert os.access(embedded.bin_path / tool, os.X_OK)
    assert embedded.psql("SELECT 1 + 1; SELECT 'x'") == "2\nx\n"
    with pytest.raises(DevServerError, match="no_such_table"):
        embedded.psql("SELECT * FROM no_such_table")
    assert "ready to accept connections" in embedded.log_path.read_text()
    assert (embedded.data_dir.stat().st_mode & 0o777) == 0o700
    if os.geteuid() == 0:  # PostgreSQL refuses root: it must run as the service user
        status = Path(f"/proc/{embedded.pid}/status").read_text()
        uid_line = next(line for line in status.splitlines() if line.startswith("Uid:"))
        assert uid_line.split()[1] != "0"


def test_restart_keeps_port_and_data_and_cuts_connections(
    private_pg_server: TestServer,
) -> None:
    pg = _embedded(private_pg_server)
    assert private_pg_server.controllable
    dsn = private_pg_server.dsn("postgres")
    _execute(dsn, "CREATE TABLE kept AS SELECT 42 AS answer")
    port, pid = pg.port, pg.pid
    with psycopg.connect(dsn, autocommit=True) as conn:
        private_pg_server.restart()
        with pytest.raises(psycopg.OperationalError):
            conn.execute("SELECT 1")
    assert pg.is_running()
    assert pg.port == port == private_pg_server.port
    assert pg.pid != pid
    assert _scalar(dsn, "SELECT answer FROM kept") == 42


def test_crash_keeps_committed_rows_only(private_pg_server: TestServer) -> None:
    pg = _embedded(private_pg_server)
    dsn = private_pg_server.dsn("postgres")
    _execute(dsn, "CREATE TABLE t AS SELECT generate_series(1, 1000) AS id")
    # Two kinds of crash on one server (a server start costs about a second here).
    for crash in (private_pg_server.kill, lambda: private_pg_server.stop("immediate")):
        in_flight = psycopg.connect(dsn)  # a transaction that never commits
        try:
            in_flight.execute("INSERT INTO t VALUES (-1)")
            crash()
            assert not pg.is_running()
            with pytest.raises(psycopg.OperationalError):
                in_flight.execute("SELECT 1")
        finally:
            in_flight.close()
        private_pg_server.start()
        assert "not properly shut down; automatic recovery in progress" in pg.log_tail(20)
        assert _scalar(dsn, "SELECT count(*) FROM t WHERE id > 0") == 1000
        assert _scalar(dsn, "SELECT count(*) FROM t WHERE id < 0") == 0
        _execute(dsn, "INSERT INTO t VALUES (1001)")
        _execute(dsn, "DELETE FROM t WHERE id = 1001")


def test_shared_server_refuses_fault_actions() -> None:
    shared = TestServer(host="127.0.0.1", port=1, user="u", source="env")
    assert not shared.controllable
    for action in (shared.stop, shared.start, shared.restart, shared.kill):
        with pytest.raises(pytest.fail.Exception, match="private_pg_server"):
            action()


def test_context_manager_stops_and_removes_everything() -> None:
    with EmbeddedPostgres() as pg:
        data, pid, port = pg.data_dir, pg.pid, pg.port
        assert pid is not None
        assert data.is_dir()
    assert not pg.is_running()
    assert not data.exists()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    with socket.socket() as sock:  # the port is free again
        sock.bind(("127.0.0.1", port))
    with pytest.raises(DevServerError, match="cleaned up"):
        pg.start()


def test_start_failure_reports_the_log_tail() -> None:
    pg = EmbeddedPostgres(settings={"shared_buffers": "plenty"})
    with pytest.raises(DevServerError, match=r"(?s)exited with code.*shared_buffers"), pg:
        pass
    assert not pg.data_dir.exists()


def test_reserved_settings_are_rejected() -> None:
    with pytest.raises(ValueError, match="port"):
        EmbeddedPostgres(settings={"port": "5432"})


def test_given_data_dir_persists_even_when_too_deep_for_a_socket() -> None:
    with tempfile.TemporaryDirectory(dir=temp_root()) as tmp:
        data = Path(tmp) / ("d" * 100) / "data"  # too deep for the socket (108-byte limit)
        with EmbeddedPostgres(data_dir=data) as pg:
            pg.psql("CREATE TABLE persisted AS SELECT 'yes' AS v")
        assert (data / "PG_VERSION").is_file()  # not ours to delete
        with EmbeddedPostgres(data_dir=data) as pg:
            assert pg.psql("SELECT v FROM persisted") == "yes\n"


# -- databases per test -----------------------------------------------------------------------


def test_pg_dsn_is_a_fresh_empty_database(pg_dsn: str, pg_server: TestServer) -> None:
    name = _scalar(pg_dsn, "SELECT current_database()")
    assert name.startswith(DB_PREFIX)
    assert pg_server.dsn(name) == pg_dsn
    tables = (
        "SELECT count(*) FROM pg_tables"
        " WHERE schemaname NOT IN ('pg_catalog', 'information_schema')"
    )
    assert _scalar(pg_dsn, tables) == 0


@pytest.fixture
def checks_pg_dsn_dropped(pg_server: TestServer) -> Iterator[list[str]]:
    """Requested before pg_dsn, so its teardown runs after pg_dsn's: the database must be gone."""
    seen: list[str] = []
    yield seen
    assert seen
    assert not _database_exists(pg_server, seen[0])


def test_pg_dsn_is_dropped_after_the_test(
    checks_pg_dsn_dropped: list[str], pg_dsn: str, pg_server: TestServer
) -> None:
    name = _scalar(pg_dsn, "SELECT current_database()")
    checks_pg_dsn_dropped.append(name)
    assert _database_exists(pg_server, name)


def test_fresh_databases_are_isolated_and_dropped_even_in_use(pg_server: TestServer) -> None:
    with fresh_database(pg_server) as a, fresh_database(pg_server) as b:
        _execute(a, "CREATE TABLE only_in_a AS SELECT 1 AS x")
        assert _scalar(b, "SELECT to_regclass('only_in_a') IS NULL")
        lingering = psycopg.connect(a)  # DROP ... WITH (FORCE) must not wait for it
        names = [_scalar(dsn, "SELECT current_database()") for dsn in (a, b)]
    try:
        assert not any(_database_exists(pg_server, name) for name in names)
    finally:
        lingering.close()


def test_create_database_by_name(pg_server: TestServer) -> None:
    name = f"{DB_PREFIX}named_{uuid.uuid4().hex[:8]}"
    dsn = create_database(pg_server, name)
    try:
        assert dsn == pg_server.dsn(name)
        assert _scalar(dsn, "SELECT current_database()") == name
    finally:
        drop_database(pg_server, dsn)
    assert not _database_exists(pg_server, name)


@pytest.mark.anyio
async def test_sa_url_connects_with_its_driver(sa_url: str, driver: str, pg_dsn: str) -> None:
    assert sa_url == to_sa_url(pg_dsn, driver)
    assert sa_url.startswith(f"postgresql+{driver}://")
    engine = create_async_engine(sa_url)
    try:
        async with engine.connect() as conn:
            assert (await conn.execute(text("SELECT current_database()"))).scalar_one() in pg_dsn
    finally:
        await engine.dispose()


def test_to_sa_url_rejects_what_it_cannot_convert() -> None:
    with pytest.raises(ValueError, match="driver"):
        to_sa_url("postgresql://h/db", "psycopg2")
    with pytest.raises(ValueError, match="libpq URL"):
        to_sa_url("host=h dbname=db", "asyncpg")


def test_watchdog_stops_the_server_when_its_owner_dies() -> None:
    # The owner is SIGKILLed: no atexit, no cleanup(). The watchdog must stop the server and
    # delete its temporary data directory.
    owner = subprocess.Popen(
        [sys.executable, "-c", _OWNER_SCRIPT],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    try:
        assert owner.stdout is not None
        pid_text, data_text = owner.stdout.readline().split()
    finally:
        owner.kill()
        owner.wait()
        if owner.stdout is not None:
            owner.stdout.close()
    postmaster, data = int(pid_text), Path(data_text)
    deadline = time.monotonic() + 30
    while _process_alive(postmaster) or data.exists():
        assert time.monotonic() < deadline, "the orphaned server was not stopped"
        time.sleep(0.05)


_OWNER_SCRIPT = """
from pgreact.devserver import EmbeddedPostgres
pg = EmbeddedPostgres()
pg.start()
print(pg.pid, pg.data_dir, flush=True)
import time; time.sleep(60)
"""


def _process_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"
