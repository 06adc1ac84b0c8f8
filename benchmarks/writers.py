"""Change producers, run in the orchestrator process (never in the measured one).

Every statement is an autocommit ``INSERT … SELECT FROM unnest(…)`` of several rows with explicit
ids, so the rows written are known exactly and each statement is one transaction (and, with the
statement-level capture trigger, one wake-up).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import anyio
import asyncpg

INSERT = (
    "INSERT INTO source (id, account, amount, status, note) "
    "SELECT * FROM unnest($1::bigint[], $2::int[], $3::numeric[], $4::text[], $5::text[])"
)
_STATUSES = ("new", "paid", "shipped", "cancelled")


def _columns(
    ids: Sequence[int],
) -> tuple[list[int], list[int], list[Decimal], list[str], list[str]]:
    return (
        list(ids),
        [i % 997 for i in ids],
        [Decimal(i % 100_000) / 100 for i in ids],
        [_STATUSES[i % 4] for i in ids],
        [f"order {i:>10} from the benchmark writer, padded" for i in ids],
    )


@dataclass(frozen=True, slots=True)
class WriteResult:
    rows: int
    statements: int
    started: float  # time.time()
    finished: float

    @property
    def rate(self) -> float:
        return self.rows / max(self.finished - self.started, 1e-9)


async def _connect(url: str) -> Any:
    return await asyncpg.connect(url, server_settings={"application_name": "pgreact-bench-writer"})


async def burst(
    url: str, first_id: int, count: int, *, writers: int = 4, rows_per_statement: int = 10
) -> WriteResult:
    """Write ``count`` rows as fast as ``writers`` connections can, sharing one work list."""
    chunks = deque(
        range(first_id, first_id + count, rows_per_statement),
    )
    end = first_id + count
    conns = [await _connect(url) for _ in range(writers)]
    statements = 0

    async def write(conn: Any) -> None:
        nonlocal statements
        while chunks:
            start = chunks.popleft()
            ids = range(start, min(start + rows_per_statement, end))
            await conn.execute(INSERT, *_columns(ids))
            statements += 1

    started = time.time()
    try:
        async with anyio.create_task_group() as tg:
            for conn in conns:
                tg.start_soon(write, conn)
        finished = time.time()
    finally:
        for conn in conns:
            await conn.close()
    return WriteResult(count, statements, started, finished)


@dataclass(frozen=True, slots=True)
class PacedResult:
    write: WriteResult
    commits: list[tuple[int, float]]  # (source id, time.time() when its COMMIT had returned)
    behind_max: float  # worst lateness against the schedule, seconds


async def paced(
    url: str,
    first_id: int,
    *,
    rate: float,
    seconds: float,
    writers: int,
    rows_per_tx: int,
) -> PacedResult:
    """Write at a steady ``rate`` rows/s: each writer commits ``rows_per_tx`` rows on a fixed
    schedule (phases staggered), and records when each commit returned."""
    per_writer = max(1, round(rate * seconds / (writers * rows_per_tx)))
    interval = writers * rows_per_tx / rate
    conns = [await _connect(url) for _ in range(writers)]
    commits: list[tuple[int, float]] = []
    behind = 0.0
    statements = 0

    async def write(w: int, conn: Any, t0: float) -> None:
        nonlocal behind, statements
        for k in range(per_writer):
            due = t0 + (w / writers + k) * interval
            delay = due - time.perf_counter()
            if delay > 0:
                await anyio.sleep(delay)
            else:
                behind = max(behind, -delay)
            base = first_id + (k * writers + w) * rows_per_tx
            ids = range(base, base + rows_per_tx)
            await conn.execute(INSERT, *_columns(ids))
            now = time.time()
            commits.extend((i, now) for i in ids)
            statements += 1

    started = time.time()
    try:
        t0 = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for w, conn in enumerate(conns):
                tg.start_soon(write, w, conn, t0)
        finished = time.time()
    finally:
        for conn in conns:
            await conn.close()
    total = per_writer * writers * rows_per_tx
    return PacedResult(WriteResult(total, statements, started, finished), commits, behind)


def paced_total(rate: float, seconds: float, writers: int, rows_per_tx: int) -> int:
    """How many rows :func:`paced` will write with these arguments."""
    return max(1, round(rate * seconds / (writers * rows_per_tx))) * writers * rows_per_tx
