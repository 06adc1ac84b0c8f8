"""The effect row every test handler writes: one per event, no unique constraint, so lost,
duplicated and reordered events are all countable."""

from __future__ import annotations

from sqlalchemy import text

from service import Event

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
