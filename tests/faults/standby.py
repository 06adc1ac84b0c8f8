"""A hot standby of an embedded server (``pg_basebackup -R``), to be promoted at will.

Built from the primary's own binaries and run like it (as the unprivileged account that owns
the primary's data directory when we are root). The standby is a child of this process and is
stopped and deleted when its ``with`` block ends; ``promote()`` is ``pg_ctl promote -w``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any, Self
from urllib.parse import quote

import psycopg

from pgreact.devserver import CONF_FILE, EmbeddedPostgres, find_free_port, temp_root


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("PG")}


class HotStandby:
    def __init__(self, primary: EmbeddedPostgres) -> None:
        self.primary = primary
        self.port = find_free_port()
        self.host = primary.host
        self._bin = primary.bin_path
        owner = primary.data_dir.stat()
        self._as: dict[str, Any] = (
            {"user": owner.st_uid, "group": owner.st_gid, "extra_groups": []}
            if os.geteuid() == 0
            else {}
        )
        self._root = Path(tempfile.mkdtemp(prefix="pgreact-standby-", dir=temp_root()))
        self.data_dir = self._root / "data"
        self._proc: subprocess.Popen[bytes] | None = None

    def dsn(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@{self.host}:{self.port}/{quote(database, safe='')}"

    def __enter__(self) -> Self:
        """Stop and delete the standby on exit (started or not)."""
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def start(self, timeout: float = 60) -> None:
        if self._as:
            os.chown(self._root, self._as["user"], self._as["group"])
        self._run(
            "pg_basebackup",
            *("-D", str(self.data_dir), "-d", self.primary.url()),
            *("-R", "-X", "stream", "-c", "fast", "--no-sync"),
        )
        # The copied settings carry the primary's port and socket directory: ours instead.
        conf = self.data_dir / CONF_FILE
        lines = [
            line
            for line in conf.read_text().splitlines()
            if not line.startswith(("port ", "unix_socket_directories "))
        ]
        lines += [f"port = '{self.port}'", f"unix_socket_directories = '{self._root}'"]
        conf.write_text("\n".join(lines) + "\n")
        with (self._root / "postgres.log").open("ab") as log:
            self._proc = subprocess.Popen(
                [str(self._bin / "postgres"), "-D", str(self.data_dir)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd="/",
                env=_clean_env(),
                start_new_session=True,
                **self._as,
            )
        deadline = time.monotonic() + timeout
        while True:
            if self._proc.poll() is not None:
                raise RuntimeError(f"the standby exited during start-up:\n{self.log_tail()}")
            try:
                with psycopg.connect(self.dsn(), connect_timeout=2) as conn:
                    row = conn.execute("SELECT pg_is_in_recovery()").fetchone()
                    assert row == (True,), row
                    return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def caught_up(self) -> bool:
        """True once the standby has replayed everything the primary has written so far."""
        with psycopg.connect(self.primary.url(), autocommit=True) as conn:
            row = conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()
        assert row is not None
        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            done = conn.execute(
                "SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", [row[0]]
            ).fetchone()
        return done == (True,)

    def promote(self) -> None:
        """``pg_ctl promote -w``: returns once the server accepts writes."""
        self._run("pg_ctl", "promote", "-D", str(self.data_dir), "-w", "-t", "60")

    def log_tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            text = (self._root / "postgres.log").read_text(errors="replace")
            return "\n".join(text.splitlines()[-lines:])
        return "(no log)"

    def close(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # a fast shutdown
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(self._root, ignore_errors=True)

    def _run(self, tool: str, *args: str) -> None:
        result = subprocess.run(
            [str(self._bin / tool), *args],
            capture_output=True,
            text=True,
            cwd="/",
            env=_clean_env(),
            timeout=120,
            check=False,
            **self._as,
        )
        if result.returncode != 0:
            raise RuntimeError(f"{tool} failed ({result.returncode}): {result.stderr.strip()}")
