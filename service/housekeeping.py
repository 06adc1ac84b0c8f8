"""Periodic work that keeps the pipeline honest when notifications are not enough.

- **sweep**: wake every handler when no notification arrived for ``sweep_interval`` (NOTIFY is a
  hint; events committed while the listener was down are found this way),
- **reap**: take back claims of processes that died or lost them — and, within a second of the
  database answering again, our own claims stranded by a lost connection (their give-back
  failed too, and they block their keys until reaped),
- **stats**: refresh the database-wide gauges with one aggregate query,
- **capture**: at start and then every stats interval, make sure every handler's table is still
  captured (not dropped, renamed or stripped of a trigger): an error log line, the
  ``pgreact_capture_broken`` gauge and the ``/readyz`` detail (:attr:`Housekeeper.capture_problems`)
  say what is wrong until it is fixed; and remove the fences of key-changing updates that were
  handled, so the new key's later events go on.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence

import anyio
import structlog
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from pgreact import installer
from pgreact.metrics import Metrics
from pgreact.router import DurableHandler
from pgreact.sql import quote_ident
from pgreact.store import Store

log = structlog.get_logger("pgreact.housekeeping")

TICK = 0.25
STRANDED_REAP_INTERVAL = 1.0
"""Seconds between reap attempts while claims may be stranded (the database is unreachable)."""
CAPTURE_RELOG_INTERVAL = 60.0
"""Seconds between repeats of the error line while a handler's capture stays broken."""


class Housekeeper:
    def __init__(
        self,
        engine: AsyncEngine,
        store: Store,
        metrics: Metrics,
        *,
        handlers: Sequence[DurableHandler],
        wake_all: Callable[[], None],
        claims_snapshot: Callable[[], tuple[list[int], int]],
        sweep_interval: float,
        stats_interval: float,
        reap_interval: float,
    ) -> None:
        self._engine = engine
        self._store = store
        self._metrics = metrics
        self._durable = list(handlers)
        self._handlers = [h.name for h in handlers]
        self._wake_all = wake_all
        self._claims_snapshot = claims_snapshot
        self._sweep_interval = sweep_interval
        self._stats_interval = stats_interval
        self._reap_interval = reap_interval
        self._last_notification = time.monotonic()
        self._failures_logged_at = -1e9
        self.database_ok = False
        self._reap_requested = False
        self._stranded = False
        self.capture_problems: dict[str, str] = {}
        """Per handler whose table is not (fully) captured: what is wrong and the fix."""
        self._capture_logged_at = -1e9
        self._truncate_noted = False
        self._fences_remain = False

    def reap_soon(self) -> None:
        """Reap at the next tick: e.g. the database is back after a restart, and claims this
        process could not give back while it was down are waiting."""
        self._reap_requested = True

    def connection_lost(self) -> None:
        """A pooled connection broke. A unit that held claims on it could not give them back
        through a new one either if the database is gone or full: reap as soon as it answers
        again instead of a reap interval later."""
        self._stranded = True

    def notified(self) -> None:
        """A wake-up notification arrived: the next sweep can wait."""
        self._last_notification = time.monotonic()

    async def run(self) -> None:
        next_stats = next_reap = next_stranded = 0.0
        while True:
            now = time.monotonic()
            if now - self._last_notification >= self._sweep_interval:
                self._last_notification = now
                self._wake_all()
            stranded = self._stranded and now >= next_stranded
            if now >= next_reap or self._reap_requested or stranded:
                self._reap_requested = self._stranded = False
                next_reap = now + self._reap_interval
                next_stranded = now + STRANDED_REAP_INTERVAL
                await self._guarded(self.reap)
            if now >= next_stats:
                next_stats = now + self._stats_interval
                await self._guarded(self.check_capture)
                await self._guarded(self.refresh_stats)
            elif self._fences_remain:
                await self._guarded(self.release_fences)
            await anyio.sleep(TICK)

    async def reap(self) -> None:
        inflight, watermark = self._claims_snapshot()
        async with self._engine.connect() as conn:
            reaped = await self._store.reap(conn, inflight, watermark)
        for item in reaped:
            self._metrics.claims_reaped.labels(item.handler).inc()
            if item.dead:
                self._metrics.events_handled.labels(item.handler, "dead").inc()
        if reaped:
            log.warning("claims_reaped", count=len(reaped), dead=sum(r.dead for r in reaped))
            self._wake_all()

    async def refresh_stats(self) -> None:
        async with self._engine.connect() as conn:
            stats = {s.handler: s for s in await self._store.stats(conn)}
        for name in self._handlers:
            s = stats.get(name)
            self._metrics.events_pending.labels(name).set(s.pending if s else 0)
            self._metrics.events_waiting_retry.labels(name).set(s.waiting_retry if s else 0)
            self._metrics.events_dead.labels(name).set(s.dead if s else 0)
            age = s.oldest_pending_age if s and s.oldest_pending_age is not None else 0.0
            self._metrics.oldest_pending_age.labels(name).set(age)

    async def check_capture(self) -> None:
        """Is every handler's table still captured? And release finished key-change fences."""
        async with self._engine.connect() as conn:
            problems = await installer.capture_problems(conn, self._store.schema, self._durable)
            await self._release_fences(conn)
        for name in self._handlers:
            self._metrics.capture_broken.labels(name).set(1 if name in problems else 0)
        now = time.monotonic()
        changed = problems != self.capture_problems
        if problems and (changed or now - self._capture_logged_at >= CAPTURE_RELOG_INTERVAL):
            self._capture_logged_at = now
            for name, problem in sorted(problems.items()):
                log.error("capture_broken", handler=name, detail=problem)
        elif changed:
            log.info("capture_restored", handlers=sorted(self.capture_problems))
        self.capture_problems = problems
        if not self._truncate_noted:
            self._truncate_noted = True
            deaf = installer.truncate_deaf(self._durable)
            if deaf:
                # Info, not a warning: it is the default (ops without TRUNCATE), and the
                # truncating session itself gets a WARNING naming these handlers.
                log.info(
                    "truncate_not_handled",
                    handlers=deaf,
                    detail="a TRUNCATE of their tables is not delivered to them (their ops do "
                    "not include TRUNCATE); what they derived from the table goes stale",
                )

    async def release_fences(self) -> None:
        async with self._engine.connect() as conn:
            await self._release_fences(conn)

    async def _release_fences(self, conn: AsyncConnection) -> None:
        """Remove the fences of key-changing updates that were handled (or dead-lettered), so
        the new key's later events go on; look again at every tick while some remain."""
        row = (
            await conn.execute(
                text(f"SELECT * FROM {quote_ident(self._store.schema)}.release_fences()")
            )
        ).one()
        await conn.commit()
        self._fences_remain = bool(row[1])
        if row[0]:
            self._wake_all()

    async def _guarded(self, job: Callable[[], Awaitable[None]]) -> None:
        try:
            with anyio.fail_after(max(self._stats_interval, 5.0)):
                await job()
            self.database_ok = True
        except Exception as exc:
            self.database_ok = False
            self._stranded = True  # a unit may have failed to give its claims back as well
            now = time.monotonic()
            if now - self._failures_logged_at >= 30:
                self._failures_logged_at = now
                log.warning("housekeeping_failed", error=f"{type(exc).__name__}: {exc}")
