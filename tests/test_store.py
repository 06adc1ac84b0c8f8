"""Who pays for a failure (service/store.py): a handler that raised is charged at once and its
retry rides the normal claims; a process that died has its claims taken back by the reaper,
which charges only crash suspects. Against a real server, for both drivers."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from sqlalchemy.ext.asyncio import AsyncConnection, create_async_engine

from pgreact.db import create_write_engine
from pgreact.store import Store
from tests.support import make_settings, queue_for_noop_handler, sql

pytestmark = pytest.mark.anyio

MAX_ATTEMPTS = 3
PRESENCE_KEY = 4242  # no process holds a presence lock under it: every other owner is gone


@pytest.fixture
async def conn(pg_dsn: str, sa_url: str) -> AsyncIterator[AsyncConnection]:
    await queue_for_noop_handler(pg_dsn, sa_url, 3)
    engine = create_async_engine(sa_url)
    try:
        async with engine.connect() as connection:
            yield connection
    finally:
        await engine.dispose()


def store(owner: int) -> Store:
    return Store(
        "pgreact",
        owner=owner,
        presence_key=PRESENCE_KEY,
        max_attempts=MAX_ATTEMPTS,
        retry_base=0.0,
        retry_max=0.0,
    )


def state(pg_dsn: str, key: str) -> tuple[int, bool, bool, str | None]:
    """(attempts, crashed, dead, last_error) of the delivery of ``key``."""
    ((attempts, crashed, dead, error),) = sql(
        pg_dsn,
        "SELECT attempts, crashed, dead_at IS NOT NULL, last_error FROM pgreact.queue "
        "WHERE row_key = %s",
        [key],
    )
    return attempts, crashed, dead, error


async def test_a_retry_after_a_raise_rides_the_normal_claim(
    conn: AsyncConnection, pg_dsn: str
) -> None:
    first = store(owner=1)
    claimed = await first.claim(conn, "h", 10, token=1, suspects=0)
    assert [c.event.key for c in claimed] == ["1", "2", "3"]
    assert await first.record_failure_alone(conn, claimed[1].delivery_id, 1, "ValueError: 2")
    await conn.begin()
    acked = [claimed[0].delivery_id, claimed[2].delivery_id]
    assert await first.settle(conn, acked, [], token=1) == (2, {})
    await conn.commit()

    # No crash-suspect slot is needed for it: the claim that takes no suspect takes it.
    (retry,) = await first.claim(conn, "h", 10, token=2, suspects=0)
    assert (retry.event.key, retry.failed_before, retry.crashed) == ("2", True, False)
    assert state(pg_dsn, "2")[:2] == (2, False)


async def test_the_reaper_charges_a_crash_only_to_crash_suspects(
    conn: AsyncConnection, pg_dsn: str
) -> None:
    dying, survivor = store(owner=1), store(owner=2)
    claimed = await dying.claim(conn, "h", 10, token=1, suspects=0)
    # "2" raised before: a retry, not a crash suspect.
    assert await dying.record_failure_alone(conn, claimed[1].delivery_id, 1, "ValueError: 2")
    retry = await dying.claim(conn, "h", 10, token=2, suspects=0)
    assert [c.event.key for c in retry] == ["2"]

    # Owner 1 dies holding all three. None of them was a crash suspect: the attempts are
    # refunded, and each becomes one.
    reaped = await survivor.reap(conn, inflight=[], watermark=0)
    assert sorted(r.dead for r in reaped) == [False] * 3
    assert [state(pg_dsn, k)[:3] for k in "123"] == [
        (0, True, False),
        (1, True, False),
        (0, True, False),
    ]
    abandoned = "claim abandoned: the process handling attempt 2 stopped without finishing it"
    assert state(pg_dsn, "2")[3] == abandoned

    # Crash suspects come one per claim (the slot), never with a claim that takes none.
    assert await survivor.claim(conn, "h", 10, token=3, suspects=0) == []
    (suspect,) = await survivor.claim(conn, "h", 10, token=4, suspects=1)
    assert (suspect.event.key, suspect.crashed) == ("1", True)

    # Owner 2 dies on it: as a crash suspect it is charged, until it is dead.
    for attempt in range(1, MAX_ATTEMPTS + 1):
        await dying.reap(conn, inflight=[], watermark=0)
        assert state(pg_dsn, "1")[:3] == (attempt, True, attempt == MAX_ATTEMPTS)
        if attempt < MAX_ATTEMPTS:
            (suspect,) = await survivor.claim(conn, "h", 10, token=10 + attempt, suspects=1)
            assert suspect.event.key == "1"

    # Once the handler is fixed, a dead letter requeued runs as an ordinary retry again.
    assert await survivor.dead_retry(conn, None) == 1
    assert state(pg_dsn, "1")[:3] == (0, False, False)


async def test_the_claim_keeps_an_index_plan_after_a_bulk_load(pg_dsn: str, sa_url: str) -> None:
    """The claim as the daemon runs it (the write engine's connection settings, the driver's
    own prepared statement), run often on an empty queue, then 30,000 changes loaded without
    ANALYZE: the plan it now gets must use the queue's indexes. A generic plan cached while the
    queue was empty scanned it sequentially, with a sequential NOT EXISTS per row (quadratic:
    14.7 s per claim at 10k rows)."""
    await queue_for_noop_handler(pg_dsn, sa_url, 0)
    engine = create_write_engine(make_settings(sa_url, pool_size=1, max_overflow=0))
    claimer = store(owner=1)
    try:
        async with engine.connect() as conn:
            # psycopg prepares on the 6th run; the server may settle on a generic plan 5 runs later
            for token in range(1, 16):
                assert await claimer.claim(conn, "h", 100, token=token) == []
            sql(pg_dsn, "INSERT INTO source SELECT g, g FROM generate_series(1, 30000) g")
            ((name, generic),) = (
                await conn.exec_driver_sql(
                    "SELECT name, generic_plans FROM pg_prepared_statements "
                    "WHERE statement LIKE '%%fresh AS%%' AND statement LIKE '%%claim_token =%%' "
                    "AND statement NOT LIKE '%%pg_prepared_statements%%'"
                )
            ).all()
            values = {"handler": "h", "limit": 100, "suspects": 1, "owner": 1, "token": 99}
            names = claimer._claim._names  # the order of the statement's parameters
            literals = ", ".join(repr(values.get(n, 60.0)) for n in names)
            explain = f"EXPLAIN (FORMAT JSON) EXECUTE {name}({literals})"
            plan = (await conn.exec_driver_sql(explain)).scalar_one()
            await conn.rollback()
    finally:
        await engine.dispose()
    plan = json.loads(plan) if isinstance(plan, str) else plan
    scans = list(_scans(plan[0]["Plan"]))
    assert ("Seq Scan", "queue") not in scans, scans
    assert any(kind.startswith("Index") and rel == "queue" for kind, rel in scans), scans
    assert generic == 0, "a generic plan was used"


def _scans(node: dict[str, Any]) -> Iterator[tuple[str, str]]:
    if "Relation Name" in node:
        yield node["Node Type"], node["Relation Name"]
    for child in node.get("Plans", []):
        yield from _scans(child)
