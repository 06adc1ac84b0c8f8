"""The effect row every test handler writes: one per event, no unique constraint, so lost,
duplicated and reordered events are all countable."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from pgreact import Event, Router

EFFECT = text(
    "INSERT INTO effects (handler, event_id, k, op, v, attempt) VALUES (:h, :e, :k, :op, :v, :a)"
)


def effect_row(handler: str, event: Event) -> dict[str, object]:
    image = event.new or event.old or {}
    return {
        "h": handler,
        "e": event.id,
        "k": event.key,
        "op": event.op,
        "v": image.get("v"),
        "a": event.attempt,
    }


def effects_router(batch_max_size: int) -> Router:
    """Two handlers on ``public.source`` writing effect rows: ``single`` (``on``) and ``batch``
    (``on_batch``)."""
    router = Router()

    @router.on("source", name="single")
    async def single(event: Event, session: AsyncSession) -> None:
        await session.execute(EFFECT, effect_row("single", event))

    @router.on_batch("public.source", name="batch", max_size=batch_max_size)
    async def batch(events: Sequence[Event], session: AsyncSession) -> None:
        await session.execute(EFFECT, [effect_row("batch", e) for e in events])

    return router
