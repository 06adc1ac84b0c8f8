"""Takes every connection slot a server has left, the way another application gone wild does."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import psycopg

from tests.support import libpq

APPLICATION_NAME = "connection-hog"


def _refused(exc: psycopg.OperationalError) -> bool:
    # libpq reports connection failures without a SQLSTATE; the server's text is stable.
    return "too many clients" in str(exc) or "remaining connection slots" in str(exc)


@dataclass
class ConnectionHog:
    dsn: str
    held: list[psycopg.Connection[Any]] = field(default_factory=list)

    def exhaust(self, evict: str | None = None, settle: float = 0.5, timeout: float = 30) -> int:
        """Open connections until the server refuses more. With ``evict``, also terminate the
        sessions whose application_name is ``evict`` and take their slots, until none is left
        and the server has stayed full for ``settle`` seconds. Returns how many are held."""
        deadline = time.monotonic() + timeout
        quiet_since: float | None = None
        while True:
            changed = self._grab()
            if evict and self.held:
                row = (
                    self.held[0]
                    .execute(
                        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                        "WHERE application_name = %s",
                        [evict],
                    )
                    .fetchone()
                )
                changed += int(row[0]) if row else 0
            now = time.monotonic()
            if changed:
                quiet_since = None
            elif quiet_since is None:
                quiet_since = now
            elif now - quiet_since >= settle:
                return len(self.held)
            if now > deadline:
                raise AssertionError(f"the server did not stay full within {timeout:g} s")
            time.sleep(0.02)

    def query(self, statement: str, params: Any = None) -> list[tuple[Any, ...]]:
        """Run a statement on a held connection (the server has no slot for a new one)."""
        cur = self.held[0].execute(statement, params)
        return cur.fetchall() if cur.description else []

    def release(self) -> None:
        for conn in self.held:
            conn.close()
        self.held.clear()

    def _grab(self) -> int:
        grabbed = 0
        while True:
            try:
                conn = psycopg.connect(
                    libpq(self.dsn),
                    autocommit=True,
                    application_name=APPLICATION_NAME,
                    connect_timeout=5,
                )
            except psycopg.OperationalError as exc:
                if _refused(exc):
                    return grabbed
                raise
            self.held.append(conn)
            grabbed += 1
