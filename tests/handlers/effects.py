"""Writes one effect row per event; behaviour tunable through environment variables so the same
module serves the process-level tests:

- ``PGREACT_TEST_FAIL_KEYS``: comma-separated row keys whose events always raise,
- ``PGREACT_TEST_SLEEP``: seconds each call sleeps (to keep work in flight during signals),
- ``PGREACT_TEST_CRASH_KEY``: a row key whose event kills the process (os._exit).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import anyio
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from service import Event, Router

router = Router()

INSERT = text(
    "INSERT INTO effects (handler, event_id, k, op, v, attempt) "
    "VALUES (:h, :e, :k, :op, :v, :a)"
)
FAIL_KEYS = {k for k in os.environ.get("PGREACT_TEST_FAIL_KEYS", "").split(",") if k}
SLEEP = float(os.environ.get("PGREACT_TEST_SLEEP", "0") or 0)
CRASH_KEY = os.environ.get("PGREACT_TEST_CRASH_KEY", "")


def _row(handler: str, event: Event) -> dict[str, object]:
    image = event.new or event.old or {}
    return {
        "h": handler,
        "e": event.id,
        "k": event.key,
        "op": event.op,
        "v": image.get("v"),
        "a": event.attempt,
    }


@router.on("public.source", name="single")
async def single(event: Event, session: AsyncSession) -> None:
    if event.key == CRASH_KEY:
        os._exit(17)
    if event.key in FAIL_KEYS:
        raise RuntimeError(f"refusing key {event.key}")
    if SLEEP:
        await anyio.sleep(SLEEP)
    await session.execute(INSERT, _row("single", event))


@router.on_batch("public.source", name="batch", max_size=50)
async def batch(events: Sequence[Event], session: AsyncSession) -> None:
    if SLEEP:
        await anyio.sleep(SLEEP)
    await session.execute(INSERT, [_row("batch", e) for e in events])
