"""Telling the doorbell's own rings from anybody's NOTIFY.

Any role that may connect can ``NOTIFY`` pgreact's channel, so a bare notification is only a
hint, and the dispatcher holds hints back after a claim that found nothing (a storm of them
must not cost a claim each). The doorbell's real rings must never be held back: the capture
trigger signs each one, ``ring/<seq>/<mac>/<table>``, with ``seq`` drawn from a sequence and
``mac`` = sha256(key || sha256(key || "ring/<seq>")) under the owner-only key in
``mark_key`` (the same construction as ``mark_mac`` in the schema). A listener can read a ring's
payload, so a ring counts once: a replayed ``seq`` is a hint again.
"""

from __future__ import annotations

import hashlib
import hmac
from collections import deque
from dataclasses import dataclass, field

import structlog
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine

from pgreact.sql import quote_ident

log = structlog.get_logger("pgreact.doorbell")

PREFIX = "ring/"
RECENT = 4096  # seqs remembered against replays
WINDOW = 1 << 20  # a seq this far below the newest one seen is too old to count


@dataclass(frozen=True, slots=True)
class Wake:
    table: str | None  # the installed name of the table rung for, None: every handler
    firm: bool  # a verified ring (never held back), not a hint


def ring_mac(secret: str, seq: int) -> str:
    body = f"{PREFIX}{seq}"
    inner = hashlib.sha256((secret + body).encode()).hexdigest()
    return hashlib.sha256((secret + inner).encode()).hexdigest()


@dataclass
class RingVerifier:
    """Classifies wake-up payloads; without the key (``None``: a role that may not read it)
    every notification is taken as firm, as before rings were signed."""

    secret: str | None
    _newest: int = 0
    _seen: set[int] = field(default_factory=set)
    _order: deque[int] = field(default_factory=deque)

    def classify(self, payload: str) -> Wake:
        if not payload.startswith(PREFIX):
            return Wake(payload or None, firm=self.secret is None)
        parts = payload.split("/", 3)
        if len(parts) != 4 or not parts[1].isdigit():
            return Wake(None, firm=self.secret is None)
        seq, mac, table = int(parts[1]), parts[2], parts[3] or None
        if self.secret is None:
            return Wake(table, firm=True)
        genuine = hmac.compare_digest(mac, ring_mac(self.secret, seq))
        if not genuine or seq in self._seen or seq < self._newest - WINDOW:
            return Wake(table, firm=False)
        self._remember(seq)
        return Wake(table, firm=True)

    def _remember(self, seq: int) -> None:
        self._seen.add(seq)
        self._order.append(seq)
        if len(self._order) > RECENT:
            self._seen.discard(self._order.popleft())
        self._newest = max(self._newest, seq)


async def load_verifier(engine: AsyncEngine, schema: str) -> RingVerifier:
    """The verifier for this database's rings; one that takes every notification as firm (no
    protection from NOTIFY storms, as before) when this role may not read the key."""
    try:
        async with engine.connect() as conn:
            secret = (
                await conn.execute(text(f"SELECT secret FROM {quote_ident(schema)}.mark_key"))
            ).scalar_one()
            await conn.commit()
    except DBAPIError as exc:
        log.warning(
            "doorbell_unsigned",
            detail="this role may not read the doorbell's key: every notification on the "
            "channel wakes the handlers, so a flood of NOTIFYs from any role costs a claim each",
            hint=f"GRANT SELECT ON {quote_ident(schema)}.mark_key TO the daemon's role "
            "(pgreact install --print-grants ROLE)",
            error=str(exc.orig).splitlines()[0] if exc.orig else str(exc),
        )
        return RingVerifier(None)
    return RingVerifier(str(secret))
