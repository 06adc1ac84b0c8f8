"""What handlers receive: frozen, typed values decoded once at the boundary."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from pgreact.listeners.protocol import Notification

Op = Literal["INSERT", "UPDATE", "DELETE", "TRUNCATE"]
__all__ = ["ALL_OPS", "OPS", "Event", "Notification", "Op"]

OPS: tuple[Op, ...] = ("INSERT", "UPDATE", "DELETE")
"""What a handler subscribes to by default: row changes."""
ALL_OPS: tuple[Op, ...] = (*OPS, "TRUNCATE")
"""Row changes and TRUNCATE (an event with ``key``, ``new`` and ``old`` None; ``key`` is the
partition's ``schema.name`` when only one partition of a partitioned table was truncated)."""


@dataclass(frozen=True, slots=True)
class Event:
    """One captured row change, as one durable handler sees it.

    ``id`` identifies the change itself: every handler subscribed to the table sees the same
    ``id`` for the same change, so it can serve as an idempotency key outside the database.
    """

    id: int
    table: str
    op: Op
    key: str | None
    new: dict[str, Any] | None
    old: dict[str, Any] | None
    created_at: datetime
    attempt: int
