"""A real PgBouncer for tests: started on a free loopback port in front of a test server.

Fixtures (register with ``pytest_plugins = ["tests.pgbouncer"]`` in a test module):

- ``pgbouncer_bin`` (session) — path of the ``pgbouncer`` binary. Missing: the test is skipped
  with the command that installs it, or fails under ``CI=true`` (CI must run these tests).
- ``pgbouncer`` (session) — a :class:`PgBouncer` in **transaction** mode in front of
  ``pg_server``; every database name is forwarded, so it serves each test's fresh database.
- ``start_pgbouncer`` — a factory for a private instance (another pool mode, a pool size of
  one, ...), stopped at the end of the test.

Starting and stopping the process lives in :mod:`tests.pgbouncer_core` (no pytest there: the
benchmark uses it too); what the instance looks like — strict, like most managed poolers — is
described there.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from conftest import IN_CI, TestServer

from tests import pgbouncer_core
from tests.pgbouncer_core import (
    INSTALL_HINT,
    LENIENT,
    STRICT,
    PgBouncer,
    PgBouncerError,
    PoolMode,
    find_pgbouncer,
)

__all__ = ["LENIENT", "STRICT", "PgBouncer", "PoolMode", "start"]


def start(
    binary: str,
    server: TestServer,
    *,
    pool_mode: PoolMode = "transaction",
    pool_size: int = 4,
    ignore_startup_parameters: str = STRICT,
) -> PgBouncer:
    """Start PgBouncer in front of ``server``; the test fails if it does not come up."""
    try:
        return pgbouncer_core.start(
            binary,
            server,
            pool_mode=pool_mode,
            pool_size=pool_size,
            ignore_startup_parameters=ignore_startup_parameters,
        )
    except PgBouncerError as exc:
        pytest.fail(str(exc))


@pytest.fixture(scope="session")
def pgbouncer_bin() -> str:
    binary = find_pgbouncer()
    if binary is None:
        if IN_CI:
            pytest.fail(f"{INSTALL_HINT} (CI=true: refusing to skip)")
        pytest.skip(INSTALL_HINT)
    return binary


@pytest.fixture(scope="session")
def pgbouncer(pgbouncer_bin: str, pg_server: TestServer) -> Iterator[PgBouncer]:
    """A transaction-mode PgBouncer in front of ``pg_server``, shared by the session."""
    bouncer = start(pgbouncer_bin, pg_server, pool_mode="transaction", pool_size=4)
    try:
        yield bouncer
    finally:
        bouncer.stop()


@pytest.fixture
def start_pgbouncer(
    pgbouncer_bin: str, pg_server: TestServer
) -> Iterator[Callable[..., PgBouncer]]:
    """``start_pgbouncer(pool_mode="session", pool_size=1, ignore_startup_parameters=LENIENT)``:
    a private instance."""
    started: list[PgBouncer] = []

    def factory(
        *,
        pool_mode: PoolMode = "transaction",
        pool_size: int = 4,
        ignore_startup_parameters: str = STRICT,
    ) -> PgBouncer:
        bouncer = start(
            pgbouncer_bin,
            pg_server,
            pool_mode=pool_mode,
            pool_size=pool_size,
            ignore_startup_parameters=ignore_startup_parameters,
        )
        started.append(bouncer)
        return bouncer

    try:
        yield factory
    finally:
        for bouncer in started:
            bouncer.stop()
