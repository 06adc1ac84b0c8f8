"""Run a real PgBouncer on a free loopback port in front of a PostgreSQL server.

Process management only, no pytest: :mod:`tests.pgbouncer` wraps it in fixtures, and the
benchmark (``python -m benchmarks.run --pgbouncer``) starts one the same way.

The instance is deliberately strict, like most managed poolers: ``max_prepared_statements`` is 0
(PgBouncer 1.21+ could otherwise track protocol-level prepared statements and hide the failure
mode users see elsewhere), and the only ignored startup parameter is ``extra_float_digits``
(sent by some clients), so a ``statement_timeout`` or ``options`` sent at startup is refused as
by a default PgBouncer (``LENIENT`` ignores them instead, as some deployments do).

PgBouncer refuses to run as root: as root it runs as ``pgreact-pg`` (the user
:mod:`pgreact.devserver` runs PostgreSQL as), or ``nobody``.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import psycopg

PoolMode = Literal["session", "transaction", "statement"]
INSTALL_HINT = (
    "pgbouncer is not installed: run `sudo scripts/install-test-tools.sh` "
    "(Debian: apt-get install pgbouncer)"
)
CANDIDATES = ("/usr/sbin/pgbouncer", "/usr/bin/pgbouncer", "/usr/local/bin/pgbouncer")
START_TIMEOUT = 10.0
STRICT = "extra_float_digits"
# What many deployments add to get past "unsupported startup parameter": the parameters are then
# silently dropped, and the failure moves on to prepared statements.
LENIENT = "extra_float_digits, options, statement_timeout, idle_in_transaction_session_timeout"


class PgBouncerError(RuntimeError):
    """PgBouncer could not be started (the message carries its log)."""


class Upstream(Protocol):
    """The server PgBouncer forwards to (the tests' ``TestServer`` is one)."""

    @property
    def host(self) -> str: ...
    @property
    def port(self) -> int: ...
    @property
    def user(self) -> str: ...
    @property
    def password(self) -> str: ...


def find_pgbouncer() -> str | None:
    found = shutil.which("pgbouncer")
    if found:
        return found
    return next((c for c in CANDIDATES if os.access(c, os.X_OK)), None)


def pgbouncer_version(binary: str) -> tuple[int, ...]:
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, check=False).stdout
    match = re.search(r"PgBouncer (\d+)\.(\d+)(?:\.(\d+))?", out)
    return tuple(int(g or 0) for g in match.groups()) if match else (0,)


@dataclass
class PgBouncer:
    """A running PgBouncer; ``url(db)`` reaches ``db`` on the server through it."""

    __test__ = False

    host: str
    port: int
    pool_mode: PoolMode
    pool_size: int
    server: Upstream
    workdir: Path
    process: subprocess.Popen[bytes]

    def url(self, database: str) -> str:
        """libpq URL of ``database`` (a name, or a URL of the server whose path is used)."""
        if "://" in database:
            database = database.rsplit("/", 1)[1].split("?", 1)[0]
        auth = self.server.user
        return f"postgresql://{auth}@{self.host}:{self.port}/{database}"

    def via(self, direct_url: str) -> str:
        """``direct_url`` (libpq or SQLAlchemy, any driver suffix) rerouted through PgBouncer."""
        scheme, _, rest = direct_url.partition("://")
        database = rest.rsplit("/", 1)[1]
        return f"{scheme}://{self.server.user}@{self.host}:{self.port}/{database}"

    def admin(self, command: str) -> list[tuple[Any, ...]]:
        """Run a console command (``SHOW POOLS``, ``SHOW VERSION``...) on the admin database."""
        with psycopg.connect(
            self.url("pgbouncer"),
            autocommit=True,
            prepare_threshold=None,
            cursor_factory=psycopg.ClientCursor,
            connect_timeout=5,
        ) as conn:
            cur = conn.execute(command)
            return cur.fetchall() if cur.description else []

    def log(self) -> str:
        try:
            return (self.workdir / "pgbouncer.log").read_text(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)  # immediate shutdown
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)
        shutil.rmtree(self.workdir, ignore_errors=True)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run_as() -> pwd.struct_passwd | None:
    if os.geteuid() != 0:
        return None
    for name in ("pgreact-pg", "nobody"):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    raise PgBouncerError(
        "running as root and neither 'pgreact-pg' nor 'nobody' exists to run pgbouncer"
    )


def _ini(
    *,
    server: Upstream,
    port: int,
    workdir: Path,
    pool_mode: PoolMode,
    pool_size: int,
    ignore: str,
    version: tuple[int, ...],
) -> str:
    server_host = "127.0.0.1" if server.host in ("localhost", "") else server.host
    target = f"host={server_host} port={server.port}"
    if server.password:  # a server that wants a password: PgBouncer logs in for the client
        target += f" user={server.user} password={server.password}"
    lines = [
        "[databases]",
        f"* = {target}",
        "[pgbouncer]",
        "listen_addr = 127.0.0.1",
        f"listen_port = {port}",
        "unix_socket_dir =",
        "auth_type = trust",
        f"auth_file = {workdir / 'userlist.txt'}",
        f"admin_users = {server.user}",
        f"pool_mode = {pool_mode}",
        f"default_pool_size = {pool_size}",
        "min_pool_size = 0",
        "reserve_pool_size = 0",
        "max_client_conn = 500",
        "max_db_connections = 0",
        f"ignore_startup_parameters = {ignore}",
        "server_check_delay = 1",
        "server_login_retry = 1",
        "query_wait_timeout = 30",
        f"logfile = {workdir / 'pgbouncer.log'}",
        f"pidfile = {workdir / 'pgbouncer.pid'}",
        "log_connections = 0",
        "log_disconnections = 0",
    ]
    if version >= (1, 21):
        lines.append("max_prepared_statements = 0")
    return "\n".join(lines) + "\n"


def start(
    binary: str,
    server: Upstream,
    *,
    pool_mode: PoolMode = "transaction",
    pool_size: int = 4,
    ignore_startup_parameters: str = STRICT,
) -> PgBouncer:
    """Start PgBouncer in front of ``server``; retried on a port taken in the meantime.
    Raises :class:`PgBouncerError` when it does not come up."""
    run_as = _run_as()
    version = pgbouncer_version(binary)
    last_log = ""
    for _ in range(3):
        workdir = Path(tempfile.mkdtemp(prefix="pgreact-pgbouncer-"))
        port = _free_port()
        (workdir / "userlist.txt").write_text(f'"{server.user}" ""\n')
        ini = workdir / "pgbouncer.ini"
        ini.write_text(
            _ini(
                server=server,
                port=port,
                workdir=workdir,
                pool_mode=pool_mode,
                pool_size=pool_size,
                ignore=ignore_startup_parameters,
                version=version,
            )
        )
        if run_as is not None:
            os.chmod(workdir, 0o700)
            for path in (workdir, *workdir.iterdir()):
                os.chown(path, run_as.pw_uid, run_as.pw_gid)
        process = subprocess.Popen(
            [binary, "-q", str(ini)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
            cwd=workdir,
            user=run_as.pw_uid if run_as else None,
            group=run_as.pw_gid if run_as else None,
            env={k: v for k, v in os.environ.items() if not k.startswith("PG")},
        )
        bouncer = PgBouncer(
            host="127.0.0.1",
            port=port,
            pool_mode=pool_mode,
            pool_size=pool_size,
            server=server,
            workdir=workdir,
            process=process,
        )
        if _wait_ready(bouncer):
            return bouncer
        last_log = bouncer.log()
        bouncer.stop()
    raise PgBouncerError(f"pgbouncer did not start; its log:\n{last_log}")


def _wait_ready(bouncer: PgBouncer) -> bool:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if bouncer.process.poll() is not None:
            return False  # e.g. the port was taken between _free_port() and bind()
        try:
            bouncer.admin("SHOW VERSION")
        except psycopg.OperationalError:
            time.sleep(0.05)
            continue
        return True
    return False
