"""Who pays for a failure (service/store.py): a handler that raised is charged at once and its
retry rides the normal claims; a process that died has its claims taken back by the reaper,
which charges only crash suspects. Against a real server, for both drivers."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from sqlalchemy.ext.asyncio import AsyncConnection, create_async_engine

from pgreact.store import Store
from tests.support import queue_for_noop_handler, sql

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
