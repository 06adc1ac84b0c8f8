"""The handlers of ``pgreact demo``: a small order book whose derived tables pgreact maintains.

Source tables (written by the demo's producer)::

    orders(id, customer, status, created_at)
    order_lines(id, order_id, sku, qty, unit_price)

Derived tables (written only by the handlers below)::

    order_totals(order_id, line_count, total)   one row per order that ever had a line
    audit_log(id, event_id, order_id, old_status, new_status, at)   one row per order change

Everything lives in the schema :data:`DEMO_SCHEMA`, pgreact's own queue included, so the demo
can run against someone's real database without touching anything else there: the schema is
marked as the demo's (a comment) and dropped again only when it carries that mark.
"""

from __future__ import annotations

import zlib
from collections import defaultdict
from collections.abc import Mapping, Sequence
from decimal import Decimal
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from pgreact import Event, Router

DEMO_SCHEMA = "pgreact_demo"
SCHEMA_MARK = "pgreact demo data: dropped and re-created by every `pgreact demo` run"

TOTALS_HANDLER = "demo.order_totals"
AUDIT_HANDLER = "demo.audit_log"

# Fixed names only: no user input reaches this DDL.
SCHEMA_DDL: tuple[str, ...] = (
    f"CREATE SCHEMA {DEMO_SCHEMA}",
    f"COMMENT ON SCHEMA {DEMO_SCHEMA} IS '{SCHEMA_MARK}'",
    f"""CREATE TABLE {DEMO_SCHEMA}.orders (
        id         bigserial PRIMARY KEY,
        customer   text NOT NULL,
        status     text NOT NULL,
        created_at timestamptz NOT NULL DEFAULT now()
    )""",
    f"""CREATE TABLE {DEMO_SCHEMA}.order_lines (
        id         bigserial PRIMARY KEY,
        order_id   bigint NOT NULL REFERENCES {DEMO_SCHEMA}.orders (id),
        sku        text NOT NULL,
        qty        integer NOT NULL CHECK (qty > 0),
        unit_price numeric(10, 2) NOT NULL
    )""",
    f"CREATE INDEX order_lines_order_id ON {DEMO_SCHEMA}.order_lines (order_id)",
    f"""CREATE TABLE {DEMO_SCHEMA}.order_totals (
        order_id   bigint PRIMARY KEY,
        line_count integer NOT NULL,
        total      numeric(14, 2) NOT NULL
    )""",
    # No unique constraint on event_id on purpose: a duplicate must be countable, not an error.
    f"""CREATE TABLE {DEMO_SCHEMA}.audit_log (
        id         bigserial PRIMARY KEY,
        event_id   bigint NOT NULL,
        order_id   bigint NOT NULL,
        old_status text,
        new_status text NOT NULL,
        at         timestamptz NOT NULL DEFAULT clock_timestamp()
    )""",
    f"CREATE INDEX audit_log_order_id ON {DEMO_SCHEMA}.audit_log (order_id, id)",
)

# One row per order, all deltas of a batch at once: the cost of a batch is one statement.
_UPSERT_TOTALS = text(f"""
    INSERT INTO {DEMO_SCHEMA}.order_totals AS t (order_id, line_count, total)
    SELECT * FROM unnest(
        CAST(:order_ids AS bigint[]), CAST(:counts AS integer[]), CAST(:totals AS numeric[])
    )
    ON CONFLICT (order_id) DO UPDATE
    SET line_count = t.line_count + EXCLUDED.line_count,
        total = t.total + EXCLUDED.total
""")
_INSERT_AUDIT = text(f"""
    INSERT INTO {DEMO_SCHEMA}.audit_log (event_id, order_id, old_status, new_status)
    VALUES (:event_id, :order_id, :old_status, :new_status)
""")

FLAKY_PERCENT = 1

router = Router()


class SimulatedFailure(RuntimeError):
    """Raised on purpose by the demo's flaky handler; the retry always succeeds."""


def is_flaky(event_id: int) -> bool:
    """About :data:`FLAKY_PERCENT` % of events, chosen by a stable hash of the change id."""
    return zlib.crc32(str(event_id).encode()) % 100 < FLAKY_PERCENT


def _money(value: Any) -> Decimal:
    # numeric travels as a JSON number and decodes to float; numeric(10,2) has at most 10
    # significant digits, so the shortest repr of that float is exactly the stored decimal.
    return Decimal(str(value))


def _line_value(row: Mapping[str, Any]) -> Decimal:
    return int(row["qty"]) * _money(row["unit_price"])


def line_deltas(events: Sequence[Event]) -> dict[int, tuple[int, Decimal]]:
    """``order_id → (Δ line_count, Δ total)`` of a batch of ``order_lines`` changes.

    An old image is taken away and a new image added, so INSERT, UPDATE (even one that moves a
    line to another order) and DELETE are all the same rule, and deltas commute: the order the
    events arrive in does not change the result.
    """
    deltas: dict[int, tuple[int, Decimal]] = defaultdict(lambda: (0, Decimal(0)))
    for event in events:
        for row, sign in ((event.old, -1), (event.new, 1)):
            if row is None:
                continue
            order_id = int(row["order_id"])
            count, total = deltas[order_id]
            deltas[order_id] = (count + sign, total + sign * _line_value(row))
    return {k: v for k, v in deltas.items() if v != (0, Decimal(0))}


# Unordered: deltas commute, so the batch may hold several changes of one line at once.
@router.on_batch(f"{DEMO_SCHEMA}.order_lines", max_size=200, ordered=False, name=TOTALS_HANDLER)
async def maintain_order_totals(events: Sequence[Event], session: AsyncSession) -> None:
    deltas = line_deltas(events)
    if not deltas:
        return
    ids = sorted(deltas)  # a fixed lock order: two batches touching the same orders never deadlock
    await session.execute(
        _UPSERT_TOTALS,
        {
            "order_ids": ids,
            "counts": [deltas[i][0] for i in ids],
            "totals": [deltas[i][1] for i in ids],
        },
    )


# Ordered (the default): one order's changes arrive one at a time, in capture order, so each
# audit row's old_status is the previous row's new_status.
@router.on(f"{DEMO_SCHEMA}.orders", ops=("INSERT", "UPDATE"), name=AUDIT_HANDLER)
async def record_status_change(event: Event, session: AsyncSession) -> None:
    if event.attempt == 1 and is_flaky(event.id):
        raise SimulatedFailure(f"simulated failure of change {event.id}; the retry will succeed")
    new = event.new or {}
    old = event.old or {}
    await session.execute(
        _INSERT_AUDIT,
        {
            "event_id": event.id,
            "order_id": int(new["id"]),
            "old_status": old.get("status"),
            "new_status": new["status"],
        },
    )
