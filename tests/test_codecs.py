"""Row images decode the same way whichever driver runs the daemon (see docs/types.md).

Two daemons, one per driver, run side by side on one database; each has one handler subscribed
to the same table, so both see every change. The events they hand their handlers must be equal,
field by field, and the row images must be exactly what docs/types.md promises.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from conftest import DRIVERS, to_sa_url
from sqlalchemy.ext.asyncio import AsyncSession

from pgreact import Event, Router
from pgreact.db import create_write_engine
from pgreact.store import Store, decode_row
from tests.support import install, make_settings, queue_state, running, sql, wait_until

pytestmark = pytest.mark.anyio

TABLE_SQL = """
CREATE TABLE typed (
    id bigint PRIMARY KEY,
    amount numeric(12, 2), exact numeric, huge numeric, ratio double precision, small real,
    i integer, big bigint, flag boolean,
    at timestamptz, local_at timestamp, day date, span interval,
    uid uuid, doc json, docb jsonb,
    ints integer[], texts text[], grid integer[],
    raw bytea, label text, nothing text
);
"""
# The database's time zone is not UTC, so a driver that decodes timestamptz in the session's
# zone would show here.
ROW_SQL = """
INSERT INTO typed VALUES (
    1, 12.50, 0.1, 123456789012345678901234567890.123456789, 0.1, 1.5,
    -2147483648, 9223372036854775807, true,
    '2024-02-29 23:59:59.123456+00', '2024-02-29 12:00:00', '2024-02-29', '1 day 02:03:04',
    'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '{"b": 1, "a": [1, 2.5, null]}',
    '{"b": 1, "a": [1, 2.5, null], "s": "\u00e9"}',
    '{1, NULL, 3}', '{"x", "", NULL, "quote\\"d"}', '{{1, 2}, {3, 4}}',
    '\\x00ff10', 'caf\u00e9 \u2603 "quoted"', NULL
)
"""

# What handlers get for ROW_SQL (both drivers): docs/types.md, as a test.
EXPECTED_IMAGE: dict[str, Any] = {
    "id": 1,
    "amount": 12.5,  # numeric: a JSON number; non-integers are floats (scale is not kept)
    "exact": 0.1,
    "huge": 1.2345678901234568e29,  # beyond a float's 15-17 digits: precision is lost
    "ratio": 0.1,
    "small": 1.5,
    "i": -2147483648,
    "big": 9223372036854775807,  # integers stay exact ints up to 64 bits
    "flag": True,
    "at": "2024-03-01T00:59:59.123456+01:00",  # ISO 8601 text in the *writer's* TimeZone
    "local_at": "2024-02-29T12:00:00",
    "day": "2024-02-29",
    "span": "1 day 02:03:04",  # interval: text in the writer's IntervalStyle
    "uid": "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",  # uuid: text
    "doc": {"b": 1, "a": [1, 2.5, None]},  # json and jsonb: nested values, not text
    "docb": {"a": [1, 2.5, None], "b": 1, "s": "\u00e9"},
    "ints": [1, None, 3],
    "texts": ["x", "", None, 'quote"d'],
    "grid": [[1, 2], [3, 4]],
    "raw": "\\x00ff10",  # bytea: text in the writer's bytea_output (hex by default)
    "label": 'caf\u00e9 \u2603 "quoted"',
    "nothing": None,  # NULL: the key is there, with None
}


def collecting_router(names: list[str], seen: dict[str, list[Event]]) -> Router:
    router = Router()
    for name in names:

        async def collect(event: Event, session: AsyncSession, _name: str = name) -> None:
            seen[_name].append(event)

        router.on("public.typed", name=name)(collect)
    return router


async def test_both_drivers_hand_handlers_identical_events(pg_dsn: str) -> None:
    database = pg_dsn.rsplit("/", 1)[1]
    sql(pg_dsn, f"ALTER DATABASE {database} SET timezone = 'Europe/Paris'")
    sql(pg_dsn, TABLE_SQL)
    seen: dict[str, list[Event]] = {d: [] for d in DRIVERS}
    await install(to_sa_url(pg_dsn, "psycopg"), collecting_router(list(DRIVERS), seen))
    sql(pg_dsn, ROW_SQL)
    sql(pg_dsn, "INSERT INTO typed (id) VALUES (2)")  # every other column NULL
    sql(pg_dsn, "UPDATE typed SET amount = amount + 0.01, texts = '{}' WHERE id = 1")
    sql(pg_dsn, "DELETE FROM typed WHERE id = 2")

    settings = {d: make_settings(to_sa_url(pg_dsn, d), listener=d) for d in DRIVERS}
    async with (
        running(settings["asyncpg"], collecting_router(["asyncpg"], seen)),
        running(settings["psycopg"], collecting_router(["psycopg"], seen)),
    ):
        await wait_until(lambda: all(len(s) == 4 for s in seen.values()), message="4 events x 2")
        await wait_until(lambda: queue_state(pg_dsn)["live"] == 0, message="acked")

    by_asyncpg, by_psycopg = seen["asyncpg"], seen["psycopg"]
    assert by_asyncpg == by_psycopg  # every field, row images included (created_at: the instant)

    insert, nulls, update, delete = by_asyncpg
    assert insert.new == EXPECTED_IMAGE and insert.old is None
    # jsonb orders keys by length, then bytewise: not the table's column order.
    assert list(insert.new) == sorted(EXPECTED_IMAGE, key=lambda k: (len(k), k.encode()))
    assert nulls.new == {key: (2 if key == "id" else None) for key in EXPECTED_IMAGE}
    assert update.old == EXPECTED_IMAGE
    assert update.new == {**EXPECTED_IMAGE, "amount": 12.51, "texts": []}
    assert delete.old == nulls.new and delete.new is None
    assert (insert.key, update.key, delete.key) == ("1", "1", "2")
    assert abs(insert.created_at - datetime.now(UTC)).total_seconds() < 120


async def test_created_at_is_utc_for_both_drivers(pg_dsn: str) -> None:
    """Equal instants are not enough: asyncpg returns timestamptz in UTC, psycopg in the
    session's TimeZone, so ``event.created_at.hour`` would depend on the driver."""
    database = pg_dsn.rsplit("/", 1)[1]
    sql(pg_dsn, f"ALTER DATABASE {database} SET timezone = 'Asia/Kolkata'")
    sql(pg_dsn, "CREATE TABLE typed (id bigint PRIMARY KEY)")
    names = [f"tz_{d}" for d in DRIVERS]
    await install(to_sa_url(pg_dsn, "psycopg"), collecting_router(names, {}))
    sql(pg_dsn, "INSERT INTO typed VALUES (1)")
    offsets = {}
    for name, driver in zip(names, DRIVERS, strict=True):
        engine = create_write_engine(make_settings(to_sa_url(pg_dsn, driver)))
        try:
            async with engine.connect() as conn:
                (claimed,) = await Store("pgreact").claim(conn, name, 10, token=1)
        finally:
            await engine.dispose()
        offsets[driver] = claimed.event.created_at.utcoffset()
    assert offsets == {d: timedelta(0) for d in DRIVERS}, f"created_at is not UTC: {offsets}"


def test_timestamptz_text_follows_the_writer_and_parses_back() -> None:
    image = decode_row('{"at": "2024-03-01T00:59:59.123456+01:00"}')
    assert image is not None
    assert datetime.fromisoformat(image["at"]) == datetime(2024, 2, 29, 23, 59, 59, 123456, UTC)


def test_a_numeric_beyond_float_range_still_decodes() -> None:
    """numeric allows 1e131071; orjson refuses anything beyond a float's range, and a row image
    that cannot be decoded fails every claim that includes it (the whole batch stalls)."""
    image = decode_row('{"id": 1, "n": 1e400, "x": 0.1}')
    assert image == {"id": 1, "n": Decimal("1e400"), "x": Decimal("0.1")}
