"""The PostgreSQL under test: where it comes from, scratch databases, CPU it spends, machine facts.

By default the run starts its own :class:`~pgreact.devserver.EmbeddedPostgres` (the wheel's
server, ``fsync`` and ``synchronous_commit`` on, data directory on disk, a free 127.0.0.1 port)
and throws it away afterwards. ``--url`` points at an existing server instead; the run then only
creates and drops databases named ``pgreact_bench_*`` on it, and server CPU is not measured.
"""

from __future__ import annotations

import contextlib
import os
import platform
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import psycopg
from psycopg import sql

from pgreact.devserver import EmbeddedPostgres, find_bin_path

DB_PREFIX = "pgreact_bench_"
_CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass
class Server:
    """A server we may create databases on. ``base_url`` is a libpq URL of a maintenance db."""

    base_url: str
    bin_path: Path
    postmaster_pid: int | None = None  # known only for a server this run started
    data_dir: Path | None = None
    created: list[str] = field(default_factory=list)

    def url(self, database: str) -> str:
        parts = urlsplit(self.base_url)
        return urlunsplit(parts._replace(path="/" + quote(database, safe="")))

    def sa_url(self, database: str, driver: str) -> str:
        return "postgresql+" + driver + self.url(database).removeprefix("postgresql")

    def admin(self) -> psycopg.Connection[Any]:
        return psycopg.connect(self.base_url, autocommit=True, connect_timeout=10)

    def create_db(self, name: str, template: str | None = None) -> str:
        """Create ``pgreact_bench_<name>`` (a copy of ``template`` if given); return its name."""
        full = DB_PREFIX + name
        stmt = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(full))
        if template is not None:
            stmt = sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                sql.Identifier(full), sql.Identifier(template)
            )
        with self.admin() as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(full))
            )
            conn.execute(stmt)
        self.created.append(full)
        return full

    def drop_db(self, name: str) -> None:
        with self.admin() as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )
        with contextlib.suppress(ValueError):
            self.created.remove(name)

    def drop_all(self) -> None:
        for name in list(reversed(self.created)):
            with contextlib.suppress(psycopg.Error):
                self.drop_db(name)

    def cpu_seconds(self) -> float | None:
        return server_cpu_seconds(self.postmaster_pid)


@contextlib.contextmanager
def open_server(url: str | None) -> Iterator[Server]:
    """An embedded server for the duration of the block, or the server at ``url``."""
    if url is not None:
        server = Server(base_url=_libpq(url), bin_path=find_bin_path())
        try:
            with server.admin() as conn:
                conn.execute("SELECT 1")
            yield server
        finally:
            server.drop_all()
        return
    with EmbeddedPostgres() as pg:
        yield Server(
            base_url=pg.url("postgres"),
            bin_path=pg.bin_path,
            postmaster_pid=pg.pid,
            data_dir=pg.data_dir,
        )
        # Thrown away with its data directory: no shutdown checkpoint, no DROP DATABASE.
        pg.stop("immediate")


def _libpq(url: str) -> str:
    for prefix in ("postgresql+asyncpg://", "postgresql+psycopg://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql://" + url.removeprefix(prefix)
    return url


def server_cpu_seconds(postmaster_pid: int | None) -> float | None:
    """User+system CPU of the whole server so far: the postmaster, its live children, and (via
    the postmaster's ``cutime``/``cstime``) every child it has already reaped."""
    if postmaster_pid is None:
        return None
    try:
        fields = _stat_fields(postmaster_pid)
    except OSError:
        return None
    ticks = sum(int(f) for f in fields[11:15])  # utime stime cutime cstime
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            child = _stat_fields(int(entry.name))
        except (OSError, IndexError):
            continue
        if int(child[1]) == postmaster_pid:
            ticks += int(child[11]) + int(child[12])
    return ticks / _CLK_TCK


def process_cpu_seconds(pid: int | None) -> float | None:
    """User+system CPU of one process so far (PgBouncer: not a child of the postmaster)."""
    if pid is None:
        return None
    try:
        fields = _stat_fields(pid)
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def cpu_stall_us() -> int | None:
    """Microseconds during which some runnable task waited for a CPU (Linux PSI, machine-wide):
    over an interval, stall / wall is how contended the machine was."""
    try:
        with open("/proc/pressure/cpu", "rb") as fh:
            first = fh.readline().decode()
    except OSError:
        return None
    for part in first.split():
        if part.startswith("total="):
            return int(part.removeprefix("total="))
    return None


def _stat_fields(pid: int) -> list[str]:
    """Fields of /proc/PID/stat after the command name: [0] state, [1] ppid, [11] utime, …"""
    with open(f"/proc/{pid}/stat", "rb") as fh:
        raw = fh.read().decode(errors="replace")
    return raw.rsplit(")", 1)[1].split()


# -- machine facts --------------------------------------------------------------------------


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _filesystem_of(path: Path) -> str:
    """``ext4 (/)``: the filesystem type of the mount holding ``path`` (tmpfs would flatter
    every commit)."""
    best = ("?", "")
    with contextlib.suppress(OSError):
        for line in Path("/proc/mounts").read_text().splitlines():
            parts = line.split()
            if len(parts) >= 3 and str(path).startswith(parts[1]) and len(parts[1]) >= len(best[1]):
                best = (parts[2], parts[1])
    return f"{best[0]} ({best[1]})"


def machine_info(server: Server) -> dict[str, str]:
    import psycopg.pq

    with server.admin() as conn:
        version = str(conn.execute("SHOW server_version").fetchone()[0])  # type: ignore[index]
        settings = {
            name: str(conn.execute(sql.SQL("SHOW {}").format(sql.Identifier(name))).fetchone()[0])  # type: ignore[index]
            for name in ("synchronous_commit", "fsync", "shared_buffers", "max_connections")
        }
    load = os.getloadavg()
    info = {
        "cpu": f"{os.cpu_count()} cores, {_cpu_model()}",
        "load average at start": f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}",
        "os": f"{platform.system()} {platform.release()}",
        "postgresql": f"{version} "
        + ("(embedded, this run)" if server.postmaster_pid else "(--url)")
        + ", "
        + ", ".join(f"{k}={v}" for k, v in settings.items()),
        "python": f"{platform.python_implementation()} {sys.version.split()[0]}",
        "drivers": f"asyncpg {_version('asyncpg')}, psycopg {_version('psycopg')} "
        f"(libpq {psycopg.pq.version()}), SQLAlchemy {_version('sqlalchemy')}",
        "runtime": f"pgreact {_version('pgreact')}, anyio {_version('anyio')}, "
        f"uvloop {_version('uvloop')}, orjson {_version('orjson')}",
    }
    if server.data_dir is not None:
        info["data directory"] = f"{server.data_dir} on {_filesystem_of(server.data_dir)}"
    return info
