"""What every fault case shares: the scale knob, the two-handler router, a fresh installed
database, waiting for the drain, and the clean verdict."""

from __future__ import annotations

import os

from pgreact import Router
from tests.conftest import TestServer, create_database, to_sa_url
from tests.faults.workload import Verdict, verdict
from tests.handlers.common import effects_router
from tests.support import create_tables, install, sql, wait_until

SCALE = float(os.environ.get("PGREACT_CHAOS_SCALE", "1"))
"""``make chaos`` runs every case longer (PGREACT_CHAOS_SCALE, default 5); CI runs 1."""

HANDLERS = ("single", "batch")


def chaos_router() -> Router:
    return effects_router(50)


async def drained(dsn: str, timeout: float = 60) -> list[Verdict]:
    """Wait until every committed change has its effect (or is dead-lettered), then return the
    verdicts."""

    def done() -> bool:
        return all(verdict(dsn, h).lost <= 0 for h in HANDLERS)

    await wait_until(done, timeout=timeout, interval=0.2, message="drain")
    verdicts = [verdict(dsn, h) for h in HANDLERS]
    for v in verdicts:
        print(f"{v}")  # the soak run collects these lines
    return verdicts


def assert_clean(verdicts: list[Verdict]) -> None:
    for v in verdicts:
        assert v.clean, v
        assert v.changes > 0


async def prepared(
    server: TestServer, driver: str, router: Router | None = None
) -> tuple[str, str, Router]:
    """A fresh database on ``server`` with the test tables and pgreact installed:
    (libpq URL, SQLAlchemy URL for ``driver``, router)."""
    dsn = create_database(server)
    create_tables(dsn)
    sa_url = to_sa_url(dsn, driver)
    router = router or chaos_router()
    await install(sa_url, router)
    return dsn, sa_url, router


def terminate(dsn: str, pattern: str) -> int:
    """Terminate the backends whose application_name is LIKE ``pattern``; how many."""
    rows = sql(
        dsn,
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
        "WHERE application_name LIKE %s AND pid <> pg_backend_pid()",
        [pattern],
    )
    return int(rows[0][0])
