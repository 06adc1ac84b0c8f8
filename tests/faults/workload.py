"""Keeps changes flowing during a fault, and counts what came out the other end.

Every change is an INSERT of a new key (v = 0) or an UPDATE ``v = v + 1`` of an existing key,
so the source table alone says what was committed — whatever the writers saw of their own
commits during the fault — and each key's effects must carry v = 0, 1, 2, … in order.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import time
from dataclasses import dataclass, field

import anyio
import psycopg

from tests.support import libpq, sql

PROBE_BASE = 10**12  # probe keys live far above workload keys
POISON = "poison"  # source.payload of rows the poison cases' handlers refuse


@dataclass
class Workload:
    dsn: str
    writers: int = 4
    rate: float = 400.0  # changes per second, all writers together
    update_share: float = 0.6
    seed: int = 7
    poison_every: int = 0  # > 0: every n-th new key is written with payload 'poison'
    attempted: int = 0
    errors: int = 0
    _next_key: int = 1
    _keys: list[int] = field(default_factory=list)

    async def run(self, duration: float) -> None:
        """Write for ``duration`` seconds, riding through connection errors."""
        deadline = time.monotonic() + duration
        async with anyio.create_task_group() as tg:
            for n in range(self.writers):
                tg.start_soon(self._writer, n, deadline)

    async def _writer(self, n: int, deadline: float) -> None:
        rng = random.Random(self.seed + n)
        interval = self.writers / self.rate
        conn: psycopg.AsyncConnection[object] | None = None
        next_at = time.monotonic()
        while time.monotonic() < deadline:
            try:
                if conn is None or conn.closed:
                    conn = await psycopg.AsyncConnection.connect(
                        libpq(self.dsn), autocommit=True, connect_timeout=2
                    )
                self.attempted += 1
                if self._keys and rng.random() < self.update_share:
                    key = rng.choice(self._keys)
                    await conn.execute("UPDATE source SET v = v + 1 WHERE id = %s", [key])
                else:
                    key = self._next_key
                    self._next_key += 1
                    poison = self.poison_every > 0 and key % self.poison_every == 0
                    await conn.execute(
                        "INSERT INTO source (id, v, payload) VALUES (%s, 0, %s)",
                        [key, POISON if poison else None],
                    )
                    self._keys.append(key)
            except (psycopg.Error, OSError):
                self.errors += 1
                if conn is not None:
                    await conn.close()
                conn = None
                await anyio.sleep(0.05)
            next_at += interval
            await anyio.sleep(max(0.0, next_at - time.monotonic()))
        if conn is not None:
            await conn.close()


@dataclass(frozen=True)
class Verdict:
    handler: str
    changes: int
    effects: int
    lost: int
    duplicates: int
    out_of_order: int
    dead: int

    @property
    def clean(self) -> bool:
        return self.lost == 0 and self.duplicates == 0 and self.out_of_order == 0


def expected_changes(dsn: str) -> int:
    (row,) = sql(dsn, f"SELECT count(*) + coalesce(sum(v), 0) FROM source WHERE id < {PROBE_BASE}")
    return int(row[0])


def verdict(dsn: str, handler: str) -> Verdict:
    """Compare effects of ``handler`` with what the source table says was committed."""
    changes = expected_changes(dsn)
    (row,) = sql(
        dsn,
        f"""
        WITH e AS (SELECT * FROM effects WHERE handler = %(h)s AND k::bigint < {PROBE_BASE}),
        expected AS (SELECT s.id::text AS k, g AS v FROM source s,
                     generate_series(0, s.v) g WHERE s.id < {PROBE_BASE}),
        dead AS (SELECT count(*) AS n FROM pgreact.queue
                 WHERE handler = %(h)s AND dead_at IS NOT NULL)
        SELECT
          (SELECT count(*) FROM e),
          (SELECT count(*) FROM expected x WHERE NOT EXISTS
              (SELECT 1 FROM e WHERE e.k = x.k AND e.v = x.v)) - (SELECT n FROM dead),
          (SELECT count(*) - count(DISTINCT event_id) FROM e),
          (SELECT count(*) FROM (SELECT v, lag(v) OVER (PARTITION BY k ORDER BY seq) AS prev
                                 FROM e) o WHERE o.prev IS NOT NULL AND o.v <= o.prev),
          (SELECT n FROM dead)
        """,
        {"h": handler},
    )
    effects, lost, dups, disorder, dead = (int(x) for x in row)
    return Verdict(handler, changes, effects, lost, dups, disorder, dead)


def report(
    case: str,
    driver: str,
    verdicts: list[Verdict],
    recovery: float | None,
    note: str | None = None,
) -> None:
    """Append one line per handler to $PGREACT_CHAOS_REPORT (JSON lines) for the soak table;
    ``note`` carries a case's own figure (e.g. throughput under poison)."""
    if note:
        print(f"{case} [{driver}]: {note}")
    path = os.environ.get("PGREACT_CHAOS_REPORT")
    if not path:
        return
    with open(path, "a", encoding="utf-8") as out:
        for v in verdicts:
            row = {
                "case": case,
                "driver": driver,
                **dataclasses.asdict(v),
                "recovery": recovery,
                "note": note,
            }
            out.write(json.dumps(row) + "\n")


async def recovery_time(dsn: str, handler: str, timeout: float = 30.0) -> float:
    """Seconds from committing a probe change until ``handler`` has handled it."""
    key = PROBE_BASE + random.randrange(10**9)
    started = time.monotonic()
    deadline = started + timeout
    inserted = False
    while time.monotonic() < deadline:
        try:
            if not inserted:
                sql(dsn, "INSERT INTO source (id, v) VALUES (%s, 0)", [key])
                inserted = True
            found = sql(
                dsn, "SELECT 1 FROM effects WHERE handler = %s AND k = %s", [handler, str(key)]
            )
            if found:
                return time.monotonic() - started
        except psycopg.Error:
            pass
        await anyio.sleep(0.02)
    raise AssertionError(f"probe change not handled by {handler} within {timeout:g} s")
