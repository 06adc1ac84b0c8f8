"""The queue's SQL: claim, ack, fail, release, reap — and the read-only views over it.

Life of a delivery (one row of ``queue``: one change for one handler)::

    live ──claim──▶ leased ──ack (same transaction as the handler's writes)──▶ deleted
                      │
                      ├─fail──▶ live again, run_at = now() + back-off   (attempts < max)
                      ├─fail──▶ dead                                    (attempts >= max)
                      └─owner died / lease expired──reap──▶ live again, a crash suspect

A claim is committed on its own before the handler runs, so an attempt that kills the process
still counts and a crash loop ends in the dead-letter state. Every later write is fenced by
``claim_token``: a process whose claim was taken over cannot ack or fail it.

Two kinds of retry: a delivery whose handler raised (``last_error`` set) is claimed like any
other and run alone in its unit; a *crash suspect* (``crashed``: its process died while handling
it) is claimed at most one per claim, and the dispatcher keeps at most one in flight per
process, so that when a suspect kills the process again, nothing else is charged for it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, cast

import orjson
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from pgreact.events import Event
from pgreact.sql import quote_ident

MAX_ERROR_LENGTH = 4000


@dataclass(frozen=True, slots=True)
class Claimed:
    """A delivery this process holds, with the event it carries."""

    delivery_id: int
    event: Event
    failed_before: bool  # its handler raised, or its process died, on an earlier attempt
    crashed: bool  # its process died on an earlier attempt (a crash suspect)
    created: float  # event.created_at as a Unix timestamp, for the lag metric


@dataclass(frozen=True, slots=True)
class HandlerStats:
    handler: str
    pending: int
    waiting_retry: int
    dead: int
    oldest_pending_age: float | None


@dataclass(frozen=True, slots=True)
class DeadLetter:
    delivery_id: int
    handler: str
    change_id: int
    table: str
    op: str
    key: str | None
    attempts: int
    last_error: str | None
    created_at: datetime
    dead_at: datetime


@dataclass(frozen=True, slots=True)
class Reaped:
    handler: str
    dead: bool


def decode_row(raw: str | None) -> dict[str, Any] | None:
    """Row images travel as JSON text so both drivers decode them identically."""
    if raw is None:
        return None
    try:
        return cast(dict[str, Any], orjson.loads(raw))
    except orjson.JSONDecodeError:
        # orjson refuses numbers beyond a double's range (a numeric such as 1e400); the
        # standard library keeps them exact as Decimal rather than failing the event forever.
        return cast(dict[str, Any], json.loads(raw, parse_float=Decimal))


# SQLAlchemy's own rule for a bind parameter in text(): ``:name``, but not ``::type``.
_BIND = re.compile(r"(?<![:\w\\]):(\w+)(?!:)")


def storable_text(text: str) -> str:
    """``text`` as PostgreSQL can store it. An exception message may hold NUL (which text
    columns refuse) or a lone surrogate (from ``surrogateescape`` decoding, which no driver can
    encode): either made the failure's record fail in turn, and the event loop forever."""
    return text.replace("\x00", "\\0").encode("utf-8", "backslashreplace").decode("utf-8")


class DriverStatement:
    """A statement that runs on the driver's own connection beneath SQLAlchemy: outside any
    transaction, committing by itself (:meth:`fetch_autocommit`), or in the one open
    (:meth:`fetch`).

    The claim runs once per batch, and at the few events per batch of a steady trickle,
    SQLAlchemy's execution machinery around it cost more client CPU than the statement's round
    trip: about 0.45 ms of about 0.6 ms (asyncpg, measured on the claim of an empty queue).
    Written with ``:name`` parameters, like the other statements.
    """

    def __init__(self, sql: str) -> None:
        self.sql = sql
        order: list[str] = []

        def numbered(match: re.Match[str]) -> str:
            if match.group(1) not in order:
                order.append(match.group(1))
            return f"${order.index(match.group(1)) + 1}"

        self._asyncpg_sql = _BIND.sub(numbered, sql)
        self._names = tuple(order)
        self._psycopg_sql = _BIND.sub(r"%(\1)s", sql.replace("%", "%%"))

    async def fetch_autocommit(
        self, conn: AsyncConnection, params: Mapping[str, Any]
    ) -> Sequence[Sequence[Any]]:
        """Run on ``conn``, which must not be in a transaction, and return the rows."""
        raw = await conn.get_raw_connection()
        driver: Any = raw.driver_connection
        if conn.dialect.driver == "asyncpg":
            # asyncpg outside a transaction block: the statement is its own transaction.
            return await self._fetch(conn, driver, params)
        await driver.set_autocommit(True)
        try:
            return await self._fetch(conn, driver, params)
        finally:
            await driver.set_autocommit(False)

    async def fetch(
        self, conn: AsyncConnection, params: Mapping[str, Any]
    ) -> Sequence[Sequence[Any]]:
        """Run on ``conn`` inside the transaction it is in, and return the rows. (On asyncpg,
        SQLAlchemy sends BEGIN with its own first statement: before one, this statement is a
        transaction of its own.)"""
        raw = await conn.get_raw_connection()
        return await self._fetch(conn, raw.driver_connection, params)

    async def _fetch(
        self, conn: AsyncConnection, driver: Any, params: Mapping[str, Any]
    ) -> Sequence[Sequence[Any]]:
        if conn.dialect.driver == "asyncpg":
            return cast(
                Sequence[Sequence[Any]],
                await driver.fetch(self._asyncpg_sql, *(params[n] for n in self._names)),
            )
        cursor = await driver.execute(self._psycopg_sql, params)
        return cast(Sequence[Sequence[Any]], await cursor.fetchall())


class Store:
    """SQL over pgreact's queue, for one schema and one owning process."""

    def __init__(
        self,
        schema: str,
        *,
        owner: int = 0,
        presence_key: int = 0,
        max_attempts: int = 10,
        retry_base: float = 1.0,
        retry_max: float = 300.0,
        lease_seconds: float = 3600.0,
    ) -> None:
        q = f"{quote_ident(schema)}.queue"
        self.schema = schema
        self.owner = owner
        self.presence_key = presence_key
        self.max_attempts = max_attempts
        self.retry_base = retry_base
        self.retry_max = retry_max
        self.lease_seconds = lease_seconds
        # Lets a statement that commits by itself skip waiting for the WAL flush (see ``claim``).
        no_flush = "AND (SELECT set_config('synchronous_commit', 'off', true)) IS NOT NULL"
        # Head of line: a delivery is claimable only when no earlier live delivery of the same
        # key exists for the handler — leased elsewhere, waiting for a retry, or not yet run.
        # Crash suspects come at most one per claim, and the dispatcher keeps at most one in
        # flight per process: if a suspect kills the process, no other suspect is charged for
        # it (see the reaper).
        ready = f"""
                q.handler = :handler AND q.dead_at IS NULL AND q.lease_until IS NULL
                AND q.run_at <= now()
                AND (q.order_key IS NULL OR NOT EXISTS (
                      SELECT 1 FROM {q} p
                      WHERE p.handler = q.handler AND p.order_key = q.order_key
                        AND p.id < q.id AND p.dead_at IS NULL))"""
        self._claim = DriverStatement(f"""
            WITH fresh AS (
                SELECT q.id FROM {q} q
                WHERE {ready} AND NOT q.crashed
                ORDER BY q.id LIMIT :limit
                FOR UPDATE SKIP LOCKED
            ), suspect AS (
                SELECT q.id FROM {q} q
                WHERE {ready} AND q.crashed
                ORDER BY q.id LIMIT :suspects
                FOR UPDATE SKIP LOCKED
            )
            UPDATE {q} q
            SET attempts = q.attempts + 1, owner = :owner, claim_token = :token,
                lease_until = now() + make_interval(secs => CAST(:lease AS float8))
            -- an array, not a join: the ids are computed once and the update probes the
            -- primary key (a join sometimes got a plan that scanned the whole queue)
            WHERE q.id = ANY(ARRAY(SELECT id FROM fresh UNION ALL SELECT id FROM suspect))
              -- commit without waiting for the WAL flush (see ``claim``)
              {no_flush}
            RETURNING q.id, q.change_id, q.table_name, q.op, q.row_key,
                      q.new_row::text, q.old_row::text, q.created_at, q.attempts,
                      q.last_error IS NOT NULL, q.crashed
        """)
        backoff = (
            "now() + make_interval(secs => least(CAST(:rmax AS float8), "
            "CAST(:rbase AS float8) * power(2, greatest(attempts - 1, 0))) "
            "* (0.5 + random() / 2))"
        )
        failed = f"""
            SET owner = NULL, claim_token = NULL, lease_until = NULL,
                last_error = {{error}}, failed_at = now(),
                dead_at = CASE WHEN attempts >= :max THEN now() END,
                run_at = CASE WHEN attempts >= :max THEN run_at ELSE {backoff} END"""
        # The end of a group's transaction in one round trip: its events acked, its failures
        # recorded (on the driver's connection: through SQLAlchemy, this statement cost more
        # client CPU than its round trip). Always one row: the ack count, then per failure
        # its id, whether it is dead, and the seconds until its retry.
        self._settle = DriverStatement(f"""
            WITH failed AS (
                UPDATE {q} q {failed.format(error="f.error")}
                FROM unnest(CAST(:failed AS bigint[]), CAST(:errors AS text[])) AS f(id, error)
                WHERE q.id = f.id AND q.claim_token = :token
                RETURNING q.id, q.dead_at IS NOT NULL AS dead,
                          extract(epoch FROM q.run_at - now()) AS retry_in
            ), acked AS (
                DELETE FROM {q}
                WHERE id = ANY(CAST(:acked AS bigint[])) AND claim_token = :token
                RETURNING 1
            )
            SELECT (SELECT count(*) FROM acked), failed.id, failed.dead, failed.retry_in
            FROM (VALUES (1)) AS one (x) LEFT JOIN failed ON true
        """)
        # On its own, with no handler writes to commit, a failure need not wait for the WAL
        # flush either: lost in a server crash, the claim is reaped instead.
        self._fail_alone = DriverStatement(f"""
            UPDATE {q} {failed.format(error=":error")}
            WHERE id = :id AND claim_token = :token {no_flush}
            RETURNING dead_at IS NOT NULL, extract(epoch FROM run_at - now())
        """)

        # A transient failure (connection lost, serialization failure, …) is not the event's
        # fault: the attempt is given back, the retry comes soon, and last_error is left alone
        # (the failure is logged and counted instead).
        self._fail_transient = text(f"""
            UPDATE {q}
            SET owner = NULL, claim_token = NULL, lease_until = NULL,
                attempts = greatest(attempts - 1, 0),
                run_at = now() + make_interval(secs => CAST(:rbase AS float8) * random())
            WHERE id = ANY(CAST(:ids AS bigint[])) AND claim_token = :token
        """)
        self._release = text(f"""
            UPDATE {q}
            SET owner = NULL, claim_token = NULL, lease_until = NULL,
                attempts = greatest(attempts - 1, 0)
            WHERE id = ANY(CAST(:ids AS bigint[])) AND claim_token = :token
        """)
        # Claims whose owner is gone (no presence lock), whose lease ran out, or that this
        # process itself no longer works on (e.g. lost with a connection) go back to the queue.
        # Who pays for a crash: a process that dies had a whole batch in flight, and only one
        # event (if any) killed it. A delivery that was not yet a crash suspect is refunded and
        # becomes one, so its next run is isolated (one suspect in flight per process); a crash
        # suspect whose process died again is charged the attempt — so a crash loop still ends
        # in the dead-letter state, one crash later than a plain failure would.
        self._reap = text(f"""
            UPDATE {q} q
            SET owner = NULL, claim_token = NULL, lease_until = NULL,
                attempts = q.attempts - CASE
                    WHEN q.owner <> :me AND q.crashed THEN 0 ELSE 1 END,
                crashed = q.crashed OR q.owner <> :me,
                last_error = CASE WHEN q.owner = :me THEN q.last_error
                    ELSE 'claim abandoned: the process handling attempt ' || q.attempts
                         || ' stopped without finishing it' END,
                failed_at = CASE WHEN q.owner = :me THEN q.failed_at ELSE now() END,
                dead_at = CASE WHEN q.owner <> :me AND q.crashed
                                    AND q.attempts >= :max THEN now() END
            WHERE q.lease_until IS NOT NULL AND q.dead_at IS NULL
              AND (q.lease_until < now()
                   OR (q.owner = :me AND q.claim_token <= :watermark
                       AND NOT (q.claim_token = ANY(CAST(:inflight AS bigint[]))))
                   OR (q.owner <> :me AND NOT EXISTS (
                        SELECT 1 FROM pg_locks l
                        WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2
                          AND l.classid = CAST(:ns AS bigint)::oid
                          AND l.objid = CAST(q.owner AS bigint)::oid)))
            RETURNING q.handler, q.dead_at IS NOT NULL
        """)
        self._stats = text(f"""
            SELECT handler,
                   count(*) FILTER (WHERE dead_at IS NULL),
                   count(*) FILTER (WHERE dead_at IS NULL AND run_at > now()),
                   count(*) FILTER (WHERE dead_at IS NOT NULL),
                   extract(epoch FROM now() - min(created_at) FILTER (WHERE dead_at IS NULL))
            FROM {q} GROUP BY handler
        """)
        # Committed without waiting for the WAL flush, like a claim: a re-arm lost in a server
        # crash only means the next change waits for a sweep or the reconnect's catch-up.
        self._arm = text(
            f"UPDATE {quote_ident(schema)}.doorbell SET armed = true WHERE NOT armed "
            f"{no_flush} RETURNING 1"
        )
        self._q = q

    # -- the hot path ---------------------------------------------------------------------

    async def claim(
        self, conn: AsyncConnection, handler: str, limit: int, token: int, suspects: int = 1
    ) -> list[Claimed]:
        """Lease up to ``limit`` deliveries and up to ``suspects`` crash suspects, and commit, so
        the attempt is on record.

        One statement in autocommit mode (no BEGIN/COMMIT round trips), committed
        asynchronously: if the server crashed before that commit reached the disk, the claim
        would be lost with it and the events simply claimed again, and the handler's own commit,
        which does wait, flushes the claim's WAL before its own. A *process* crash cannot lose
        it. ``conn`` must not be in a transaction. Errors are the driver's own (asyncpg or
        psycopg exceptions), not SQLAlchemy's.
        """
        rows = await self._claim.fetch_autocommit(
            conn,
            {
                "handler": handler,
                "limit": limit,
                "suspects": suspects,
                "owner": self.owner,
                "token": token,
                "lease": self.lease_seconds,
            },
        )
        claimed = []
        for r in rows:
            created_at = r[7].astimezone(UTC)  # psycopg answers in the session's time zone
            new, old = decode_row(r[5]), decode_row(r[6])
            event = Event(r[1], r[2], r[3], r[4], new, old, created_at, r[8])
            claimed.append(Claimed(r[0], event, bool(r[9]), bool(r[10]), created_at.timestamp()))
        claimed.sort(key=lambda c: c.delivery_id)
        return claimed

    async def settle(
        self,
        conn: AsyncConnection,
        acked: Sequence[int],
        failed: Sequence[tuple[int, str]],
        token: int,
    ) -> tuple[int, dict[int, tuple[bool, float]]]:
        """Inside the caller's transaction, delete the ``acked`` deliveries and record the
        ``failed`` attempts (delivery id, error). Returns how many acks were ours, and per
        failure still ours (dead-lettered?, seconds until the retry). Errors are the driver's
        own, as with :meth:`claim`."""
        rows = await self._settle.fetch(
            conn,
            {
                "acked": list(acked),
                "failed": [delivery_id for delivery_id, _ in failed],
                "errors": [storable_text(error[:MAX_ERROR_LENGTH]) for _, error in failed],
                "token": token,
                **self._backoff_params(),
            },
        )
        recorded = {
            int(r[1]): (bool(r[2]), max(0.0, float(r[3] or 0))) for r in rows if r[1] is not None
        }
        return int(rows[0][0]), recorded

    async def record_failure_alone(
        self, conn: AsyncConnection, delivery_id: int, token: int, error: str
    ) -> tuple[bool, float] | None:
        """Record a failed attempt as a statement of its own, committed by itself without
        waiting for the WAL flush: (dead-lettered?, seconds until the retry), or None when the
        delivery is no longer ours. ``conn`` must not be in a transaction. Errors are the
        driver's own, as with :meth:`claim`."""
        params = {
            "id": delivery_id,
            "token": token,
            "error": storable_text(error[:MAX_ERROR_LENGTH]),
            **self._backoff_params(),
        }
        rows = await self._fail_alone.fetch_autocommit(conn, params)
        return (bool(rows[0][0]), max(0.0, float(rows[0][1] or 0))) if rows else None

    def _backoff_params(self) -> dict[str, Any]:
        return {"max": self.max_attempts, "rmax": self.retry_max, "rbase": self.retry_base}

    async def fail_transient(self, conn: AsyncConnection, ids: Sequence[int], token: int) -> None:
        """Give claims back after a transient failure: attempt refunded, retried soon."""
        await conn.execute(
            self._fail_transient, {"ids": list(ids), "token": token, "rbase": self.retry_base}
        )
        await conn.commit()

    async def release(self, conn: AsyncConnection, ids: Sequence[int], token: int) -> None:
        """Give claims back untouched (shutdown): the attempt is refunded."""
        await conn.execute(self._release, {"ids": list(ids), "token": token})
        await conn.commit()

    async def arm_doorbell(self, conn: AsyncConnection) -> bool:
        """Re-arm the writers' doorbell; True if it had been rung (then sweep once more)."""
        result = await conn.execute(self._arm)
        rang = result.first() is not None
        await conn.commit()
        return rang

    # -- housekeeping ---------------------------------------------------------------------

    async def reap(
        self, conn: AsyncConnection, inflight: Sequence[int], watermark: int
    ) -> list[Reaped]:
        """Take back abandoned claims; ours only if issued at or below ``watermark`` and no
        longer in ``inflight``."""
        result = await conn.execute(
            self._reap,
            {
                "me": self.owner,
                "inflight": list(inflight),
                "watermark": watermark,
                "ns": self.presence_key,
                "max": self.max_attempts,
            },
        )
        rows = [Reaped(r[0], bool(r[1])) for r in result]
        await conn.commit()
        return rows

    async def stats(self, conn: AsyncConnection) -> list[HandlerStats]:
        result = await conn.execute(self._stats)
        rows = [
            HandlerStats(
                handler=r[0],
                pending=int(r[1]),
                waiting_retry=int(r[2]),
                dead=int(r[3]),
                oldest_pending_age=None if r[4] is None else float(r[4]),
            )
            for r in result
        ]
        await conn.commit()
        return rows

    # -- dead letters ---------------------------------------------------------------------

    async def dead_list(
        self, conn: AsyncConnection, handler: str | None = None, limit: int = 1000
    ) -> list[DeadLetter]:
        result = await conn.execute(
            text(f"""
                SELECT id, handler, change_id, table_name, op, row_key, attempts, last_error,
                       created_at, dead_at
                FROM {self._q}
                WHERE dead_at IS NOT NULL
                  AND (CAST(:handler AS text) IS NULL OR handler = :handler)
                ORDER BY id LIMIT :limit
            """),
            {"handler": handler, "limit": limit},
        )
        rows = [DeadLetter(*r) for r in result]
        await conn.commit()
        return rows

    async def dead_show(self, conn: AsyncConnection, ids: Sequence[int]) -> list[dict[str, Any]]:
        """Everything stored about the given dead letters (row images, the full error), by id;
        ids that are not dead letters are left out."""
        result = await conn.execute(
            text(f"""
                SELECT id, handler, change_id, table_name, op, row_key, attempts, last_error,
                       new_row, old_row, created_at, failed_at, dead_at
                FROM {self._q}
                WHERE dead_at IS NOT NULL AND id = ANY(CAST(:ids AS bigint[]))
                ORDER BY id
            """),
            {"ids": list(ids)},
        )
        rows = [dict(r) for r in result.mappings()]
        await conn.commit()
        return rows

    async def dead_retry(self, conn: AsyncConnection, ids: Sequence[int] | None) -> int:
        """Make dead letters live again with a fresh attempt budget; commits."""
        result = await conn.execute(
            text(f"""
                UPDATE {self._q}
                SET dead_at = NULL, attempts = 0, run_at = now(), crashed = false
                WHERE dead_at IS NOT NULL
                  AND (CAST(:all AS boolean) OR id = ANY(CAST(:ids AS bigint[])))
            """),
            {"all": ids is None, "ids": list(ids or [])},
        )
        await conn.commit()
        return int(result.rowcount or 0)

    async def dead_purge(self, conn: AsyncConnection, ids: Sequence[int] | None) -> int:
        result = await conn.execute(
            text(f"""
                DELETE FROM {self._q}
                WHERE dead_at IS NOT NULL
                  AND (CAST(:all AS boolean) OR id = ANY(CAST(:ids AS bigint[])))
            """),
            {"all": ids is None, "ids": list(ids or [])},
        )
        await conn.commit()
        return int(result.rowcount or 0)
