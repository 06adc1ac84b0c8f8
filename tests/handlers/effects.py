"""Writes one effect row per event; behaviour tunable through environment variables so the same
module serves the process-level tests:

- ``PGREACT_TEST_FAIL_KEYS``: comma-separated row keys whose events always raise,
- ``PGREACT_TEST_SLEEP``: seconds each call sleeps (to keep work in flight during signals),
- ``PGREACT_TEST_CRASH_KEY``: a row key whose event kills the process (os._exit),
- ``PGREACT_TEST_STUBBORN_KEY``: a row key whose event never ends: it swallows every
  cancellation.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence

import anyio
from sqlalchemy.ext.asyncio import AsyncSession

from pgreact import Event, Router
from tests.handlers.common import EFFECT, effect_row

router = Router()

FAIL_KEYS = {k for k in os.environ.get("PGREACT_TEST_FAIL_KEYS", "").split(",") if k}
SLEEP = float(os.environ.get("PGREACT_TEST_SLEEP", "0") or 0)
CRASH_KEY = os.environ.get("PGREACT_TEST_CRASH_KEY", "")
STUBBORN_KEY = os.environ.get("PGREACT_TEST_STUBBORN_KEY", "")


async def never_ending() -> None:
    """What a handler must not do: swallow the cancellation meant to stop it."""
    while True:
        try:
            await anyio.sleep(0.05)
        except asyncio.CancelledError:
            continue


@router.on("public.source", name="single")
async def single(event: Event, session: AsyncSession) -> None:
    if event.key == CRASH_KEY:
        os._exit(17)
    if event.key == STUBBORN_KEY:
        await never_ending()
    if event.key in FAIL_KEYS:
        raise RuntimeError(f"refusing key {event.key}")
    if SLEEP:
        await anyio.sleep(SLEEP)
    await session.execute(EFFECT, effect_row("single", event))


@router.on_batch("public.source", name="batch", max_size=50)
async def batch(events: Sequence[Event], session: AsyncSession) -> None:
    if SLEEP:
        await anyio.sleep(SLEEP)
    await session.execute(EFFECT, [effect_row("batch", e) for e in events])
