"""Capture that loses nothing and corrupts nothing (issue 12, items 1-5): columns named like
the capture SQL's aliases, partitioned tables, renamed and dropped tables, TRUNCATE, and
UPDATEs that change the key. For both drivers, against a real server."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import httpx
import psycopg
import pytest
import structlog
from psycopg import sql as psql
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

from pgreact import Event, Router, installer
from pgreact.events import ALL_OPS
from tests.handlers.effects import router as effects_router
from tests.support import (
    ROOT,
    create_tables,
    install,
    libpq,
    make_settings,
    pgreact_cli,
    running,
    sql,
    wait_until,
)

pytestmark = pytest.mark.anyio

EFFECT = text(
    "INSERT INTO effects (handler, event_id, k, op, v, attempt) VALUES (:h, :e, :k, :op, :v, :a)"
)


async def noop(event: Event, session: AsyncSession) -> None:
    """Capture tests read the queue; no daemon runs this."""


def queued(dsn: str, handler: str) -> list[tuple[Any, ...]]:
    """(table, op, key, new, old) of ``handler``'s deliveries, fences left out, in order."""
    return sql(
        dsn,
        "SELECT table_name, op, row_key, new_row, old_row FROM pgreact.queue "
        "WHERE handler = %s AND op <> 'FENCE' ORDER BY id",
        [handler],
    )


async def problems(sa_url: str, router: Router) -> dict[str, str]:
    engine = create_async_engine(sa_url)
    try:
        async with engine.connect() as conn:
            return await installer.capture_problems(conn, "pgreact", router.durable)
    finally:
        await engine.dispose()


# -- 1. columns named like the capture SQL's aliases ------------------------------------------


def capture_words() -> list[str]:
    """Every word of the capture SQL (function bodies of the latest migration): as columns, each
    would shadow an alias or a PL/pgSQL variable of that name if the SQL were not immune."""
    latest = max((ROOT / "service" / "schema").glob("0*.sql"))
    bodies = re.findall(r"\$\$(.*?)\$\$", latest.read_text(), re.S)
    words = set(re.findall(r"\b[a-z_][a-z0-9_]*\b", " ".join(bodies).lower()))
    return sorted(words - {"id"})


def create_wide(dsn: str, table: str, columns: Sequence[str], partitioned: bool) -> None:
    cols = psql.SQL(", ").join(
        psql.SQL("{} int").format(psql.Identifier(c)) for c in ["id", *columns]
    )
    tail = psql.SQL(" PARTITION BY RANGE (id)" if partitioned else "")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            psql.SQL("CREATE TABLE {} ({}, PRIMARY KEY (id)){}").format(
                psql.Identifier(table), cols, tail
            )
        )
        if partitioned:
            conn.execute(
                psql.SQL("CREATE TABLE {} PARTITION OF {} FOR VALUES FROM (0) TO (100)").format(
                    psql.Identifier(f"{table}_low"), psql.Identifier(table)
                )
            )


@pytest.mark.parametrize("partitioned", [False, True], ids=["plain", "partitioned"])
async def test_columns_named_like_capture_aliases_keep_row_images_whole(
    pg_dsn: str, sa_url: str, partitioned: bool
) -> None:
    columns = capture_words()
    assert {"r", "i", "c", "s", "n", "img", "pgreact_new_rows", "tg_argv"} <= set(columns)
    create_wide(pg_dsn, "color", columns, partitioned)
    router = Router()
    router.on("color", name="colors", ops=ALL_OPS)(noop)
    await install(sa_url, router)

    first = {"id": 1, **{c: i for i, c in enumerate(columns)}}
    second = {k: (v if k == "id" else v + 1) for k, v in first.items()}
    names = psql.SQL(", ").join(psql.Identifier(c) for c in first)
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(
            psql.SQL("INSERT INTO color ({}) VALUES ({})").format(
                names, psql.SQL(", ").join(psql.Literal(v) for v in first.values())
            )
        )
        conn.execute(
            psql.SQL("UPDATE color SET {}").format(
                psql.SQL(", ").join(
                    psql.SQL("{0} = {0} + 1").format(psql.Identifier(c)) for c in columns
                )
            )
        )
        conn.execute("DELETE FROM color")
    assert queued(pg_dsn, "colors") == [
        ("public.color", "INSERT", "1", first, None),
        ("public.color", "UPDATE", "1", second, first),
        ("public.color", "DELETE", "1", None, second),
    ]


# -- 2. partitioned tables --------------------------------------------------------------------

PARTITIONED = """
CREATE TABLE measures (region text, id int, v int, PRIMARY KEY (region, id))
    PARTITION BY LIST (region);
CREATE TABLE measures_eu PARTITION OF measures FOR VALUES IN ('eu');
CREATE TABLE measures_us PARTITION OF measures FOR VALUES IN ('us');
"""


def key(region: str, id_: int) -> str:
    return f'["{region}", {id_}]'


async def test_every_change_of_a_partitioned_table_is_captured_as_the_parent(
    pg_dsn: str, sa_url: str
) -> None:
    sql(pg_dsn, PARTITIONED)
    router = Router()
    router.on("measures", name="m", ops=ALL_OPS)(noop)
    await install(sa_url, router)
    sql(pg_dsn, "INSERT INTO measures VALUES ('eu', 1, 1)")  # through the parent
    sql(pg_dsn, "INSERT INTO measures_us VALUES ('us', 2, 1)")  # straight into a partition
    sql(pg_dsn, "UPDATE measures SET v = 2 WHERE id = 1")  # within a partition
    sql(pg_dsn, "UPDATE measures_us SET v = 3 WHERE id = 2")  # through the partition
    sql(pg_dsn, "UPDATE measures SET region = 'us' WHERE id = 1")  # moves to another partition
    # A partition attached later: its row changes are captured at once (cloned triggers) ...
    sql(
        pg_dsn,
        "CREATE TABLE measures_asia (LIKE measures INCLUDING ALL); "
        "ALTER TABLE measures ATTACH PARTITION measures_asia FOR VALUES IN ('asia')",
    )
    sql(pg_dsn, "INSERT INTO measures_asia VALUES ('asia', 3, 1)")
    sql(pg_dsn, "DELETE FROM measures WHERE id = 3")
    got = [(t, op, k) for t, op, k, _, _ in queued(pg_dsn, "m")]
    assert got == [
        ("public.measures", "INSERT", key("eu", 1)),
        ("public.measures", "INSERT", key("us", 2)),
        ("public.measures", "UPDATE", key("eu", 1)),
        ("public.measures", "UPDATE", key("us", 2)),
        # A move between partitions is a DELETE from one and an INSERT into the other.
        ("public.measures", "DELETE", key("eu", 1)),
        ("public.measures", "INSERT", key("us", 1)),
        ("public.measures", "INSERT", key("asia", 3)),
        ("public.measures", "DELETE", key("asia", 3)),
    ]

    # ... but not its TRUNCATE (statement triggers are not cloned): check says so, install fixes.
    found = await problems(sa_url, router)
    assert "TRUNCATE on public.measures_asia" in found["m"]
    assert "run `pgreact install`" in found["m"]
    fix = await install(sa_url, router)
    assert fix.statements == [
        'CREATE TRIGGER "pgreact_capture_truncate" AFTER TRUNCATE ON "public"."measures_asia" '
        'FOR EACH STATEMENT EXECUTE FUNCTION "pgreact".capture_truncate()'
    ]
    assert await problems(sa_url, router) == {}

    sql(pg_dsn, "DELETE FROM pgreact.queue")
    sql(pg_dsn, "TRUNCATE measures_eu")  # one partition: the key names it
    sql(pg_dsn, "TRUNCATE measures")  # the whole table: one event, not one per partition
    got = [(t, op, k) for t, op, k, _, _ in queued(pg_dsn, "m")]
    assert got == [
        ("public.measures", "TRUNCATE", "public.measures_eu"),
        ("public.measures", "TRUNCATE", None),
    ]


# -- 3. renamed and dropped tables ------------------------------------------------------------


def recording_router(name: str, table: str = "source", ops: Sequence[str] = ALL_OPS) -> Router:
    router = Router()

    @router.on(table, name=name, ops=ops)  # type: ignore[arg-type]
    async def record(event: Event, session: AsyncSession) -> None:
        image = event.new or event.old or {}
        await session.execute(
            EFFECT,
            {
                "h": name,
                "e": event.id,
                "k": event.key,
                "op": event.op,
                "v": image.get("v"),
                "a": event.attempt,
            },
        )

    return router


def effects(dsn: str, handler: str) -> list[tuple[Any, ...]]:
    return sql(dsn, "SELECT op, k, v FROM effects WHERE handler = %s ORDER BY seq", [handler])


async def test_renamed_table_is_still_captured_and_loudly_reported(
    pg_dsn: str, sa_url: str, driver: str
) -> None:
    create_tables(pg_dsn)
    router = recording_router("follow")
    await install(sa_url, router)
    sample_of = "pgreact_capture_broken"
    with structlog.testing.capture_logs() as logs:
        async with running(make_settings(sa_url), router) as daemon, httpx.AsyncClient() as http:
            sample = daemon.metrics.registry.get_sample_value
            assert sample(sample_of, {"handler": "follow"}) == 0
            sql(pg_dsn, "ALTER TABLE source RENAME TO source_v2")
            sql(pg_dsn, "INSERT INTO source_v2 VALUES (1, 7)")
            await wait_until(lambda: effects(pg_dsn, "follow") == [("INSERT", "1", 7)])
            await wait_until(
                lambda: sample(sample_of, {"handler": "follow"}) == 1, message="the gauge"
            )
            response = await http.get(f"http://127.0.0.1:{daemon.http_port}/readyz", timeout=10)
            assert response.status_code == 503
            detail = response.json()["down"]["capture:follow"]
            assert "renamed to public.source_v2" in detail and "pgreact install" in detail
    errors = [e for e in logs if e["event"] == "capture_broken"]
    assert errors and errors[0]["log_level"] == "error"
    assert "public.source_v2" in errors[0]["detail"]

    env = {
        "PGREACT_DATABASE_URL": sa_url,
        "PGREACT_HANDLERS": "handlers.effects",
        "PGREACT_HTTP_PORT": "0",
    }
    sql(pg_dsn, "ALTER TABLE source_v2 RENAME TO source")
    await install(sa_url, effects_router)  # what `check` loads (handlers.effects): on source
    sql(pg_dsn, "DROP TABLE source")
    check = pgreact_cli("check", env=env)
    assert check.returncode == 1, check.stdout
    failed = [line for line in check.stdout.splitlines() if line.startswith("[FAIL] triggers")]
    assert len(failed) == 1, check.stdout
    assert "public.source" in failed[0] and "was dropped" in failed[0]
    assert "pgreact install" in failed[0]


# -- 4. TRUNCATE ------------------------------------------------------------------------------


async def test_truncate_reaches_subscribers_and_warns_about_the_rest(
    pg_dsn: str, sa_url: str
) -> None:
    create_tables(pg_dsn)
    router = recording_router("resync")
    router.include(recording_router("rows-only", ops=("INSERT", "UPDATE", "DELETE")))
    await install(sa_url, router)
    notices: list[str] = []
    with psycopg.connect(libpq(pg_dsn), autocommit=True) as conn:
        conn.add_notice_handler(lambda d: notices.append(d.message_primary or ""))
        conn.execute("INSERT INTO source VALUES (1, 1)")
        conn.execute("TRUNCATE source")
    assert notices == [
        "pgreact: TRUNCATE of public.source is not delivered to handler(s) rows-only "
        "(their ops do not include TRUNCATE)"
    ]
    async with running(make_settings(sa_url), router):
        await wait_until(lambda: len(effects(pg_dsn, "resync")) == 2)
        await wait_until(lambda: len(effects(pg_dsn, "rows-only")) == 1)
    assert effects(pg_dsn, "resync") == [("INSERT", "1", 1), ("TRUNCATE", None, None)]
    assert effects(pg_dsn, "rows-only") == [("INSERT", "1", 1)]


async def test_a_truncate_is_deduplicated_only_within_its_own_statement(
    pg_dsn: str, sa_url: str
) -> None:
    """TRUNCATE of a partitioned table is one event for its handlers, but the mark that silences
    its partitions' calls counts in that statement only: not in a later statement of the same
    transaction, and not when a writer sets it (or copies a genuine one) itself."""
    sql(pg_dsn, PARTITIONED)
    router = Router()
    router.on("measures", name="all", ops=ALL_OPS)(noop)
    router.on("measures", name="rows-only", ops=("INSERT", "UPDATE", "DELETE"))(noop)
    await install(sa_url, router)
    schema_oid = sql(pg_dsn, "SELECT 'pgreact'::regnamespace::oid")[0][0]
    setting = f"pgreact.truncated_{schema_oid}"
    notices: list[str] = []
    with psycopg.connect(libpq(pg_dsn)) as conn:  # one transaction
        conn.add_notice_handler(lambda d: notices.append(d.message_primary or ""))
        conn.execute("TRUNCATE measures")
        genuine = conn.execute("SELECT current_setting(%s)", [setting]).fetchone()
        assert genuine is not None and genuine[0]
        conn.execute("SELECT set_config(%s, %s, true)", [setting, genuine[0]])  # carried over
        conn.execute("TRUNCATE measures_eu")
        for name in ("pgreact.truncated", setting):  # version 4's first mark, made up
            conn.execute(
                "SELECT set_config(%s, ',' || 'measures_us'::regclass::oid || ',', true)", [name]
            )
        conn.execute("TRUNCATE measures_us")
        # A mark made up for this very statement (a DO block), the MAC of a genuine one.
        _xid, _stamp, cid, rels, mac = str(genuine[0]).split("/")
        conn.execute(
            "DO $$ BEGIN PERFORM set_config("
            + psql.Literal(setting).as_string(conn)
            + ", pg_current_xact_id() || '/' || extract(epoch FROM statement_timestamp()) || "
            + psql.Literal(f"/{cid}/{rels}/{mac}").as_string(conn)
            + ", true); TRUNCATE measures_eu; END $$"
        )
        conn.execute("TRUNCATE measures_eu, measures")  # the partition's call comes first
        conn.execute("INSERT INTO measures VALUES ('eu', 1, 1)")
        conn.execute("TRUNCATE measures_eu")  # the mark of two statements ago leaked here
        conn.commit()
    assert [(op, k) for _, op, k, _, _ in queued(pg_dsn, "all")] == [
        ("TRUNCATE", None),
        ("TRUNCATE", "public.measures_eu"),
        ("TRUNCATE", "public.measures_us"),
        ("TRUNCATE", "public.measures_eu"),
        ("TRUNCATE", "public.measures_eu"),
        ("TRUNCATE", None),
        ("INSERT", key("eu", 1)),
        ("TRUNCATE", "public.measures_eu"),
    ]
    # Every call warns about the handler that does not hear it, de-duplicated or not.
    truncated = [
        re.sub(
            r"^pgreact: TRUNCATE of (\S+) is not delivered to handler\(s\) rows-only .*", r"\1", n
        )
        for n in notices
    ]
    assert truncated == [
        "public.measures",
        "public.measures_eu",
        "public.measures_us",
        "public.measures_eu",
        "public.measures_us",
        "public.measures_eu",
        "public.measures_eu",
        "public.measures",
        "public.measures_us",
        "public.measures_eu",
    ]


async def test_a_truncate_of_a_sub_partitioned_table_is_one_event_per_handler(
    pg_dsn: str, sa_url: str
) -> None:
    sql(
        pg_dsn,
        "CREATE TABLE world (region text, id int, PRIMARY KEY (region, id)) "
        "PARTITION BY LIST (region); "
        "CREATE TABLE world_eu PARTITION OF world FOR VALUES IN ('eu', 'uk') "
        "PARTITION BY LIST (region); "
        "CREATE TABLE world_eu_uk PARTITION OF world_eu FOR VALUES IN ('uk'); "
        "CREATE TABLE world_eu_rest PARTITION OF world_eu FOR VALUES IN ('eu'); "
        "CREATE TABLE world_us PARTITION OF world FOR VALUES IN ('us')",
    )
    router = Router()
    router.on("world", name="world", ops=ALL_OPS)(noop)
    # (Only TRUNCATE below the top: install cannot watch rows of a partition and its parent.)
    router.on("world_eu", name="eu", ops=("TRUNCATE",))(noop)
    router.on("world_eu_uk", name="uk", ops=("TRUNCATE",))(noop)
    await install(sa_url, router)
    sql(pg_dsn, "TRUNCATE world")
    sql(pg_dsn, "TRUNCATE world_eu")
    sql(pg_dsn, "TRUNCATE world_eu_uk")
    got = {h: [k for _, _, k, _, _ in queued(pg_dsn, h)] for h in ("world", "eu", "uk")}
    assert got == {
        "world": [None, "public.world_eu", "public.world_eu_uk"],
        "eu": [None, None, "public.world_eu_uk"],
        "uk": [None, None, None],
    }
    assert (await install(sa_url, router)).statements == []
    assert await problems(sa_url, router) == {}


# -- 5. an UPDATE that changes the key --------------------------------------------------------


async def test_key_change_is_ordered_under_the_old_and_the_new_key(
    pg_dsn: str, sa_url: str
) -> None:
    create_tables(pg_dsn)
    router = Router()
    failed_once: set[int] = set()

    @router.on("source", name="moves")
    async def moves(event: Event, session: AsyncSession) -> None:
        old_id = (event.old or {}).get("id")
        if event.op == "UPDATE" and old_id == 1 and event.id not in failed_once:
            failed_once.add(event.id)  # held in retry: nothing of key 1 or 2 may pass it
            raise RuntimeError("not yet")
        image = event.new or event.old or {}
        await session.execute(
            EFFECT,
            {
                "h": "moves",
                "e": event.id,
                "k": event.key,
                "op": event.op,
                "v": image.get("v"),
                "a": event.attempt,
            },
        )

    await install(sa_url, router)
    sql(pg_dsn, "INSERT INTO source VALUES (1, 1)")
    async with running(make_settings(sa_url, retry_base=0.5, retry_max=0.5), router):
        await wait_until(lambda: effects(pg_dsn, "moves") == [("INSERT", "1", 1)])
        sql(pg_dsn, "UPDATE source SET id = 2, v = 2 WHERE id = 1")  # key 1 -> 2
        sql(pg_dsn, "INSERT INTO source VALUES (1, 3)")  # a later event of the old key
        sql(pg_dsn, "UPDATE source SET v = 4 WHERE id = 2")  # a later event of the new key
        await wait_until(lambda: len(effects(pg_dsn, "moves")) == 4, message="4 effects")
        await wait_until(
            lambda: sql(pg_dsn, "SELECT count(*) FROM pgreact.queue")[0][0] == 0,
            message="the fence released",
        )
    assert effects(pg_dsn, "moves")[1] == ("UPDATE", "2", 2)
    assert sorted(effects(pg_dsn, "moves")[2:]) == [("INSERT", "1", 3), ("UPDATE", "2", 4)]


async def test_a_fence_holds_until_its_update_is_handled_or_dead(pg_dsn: str, sa_url: str) -> None:
    create_tables(pg_dsn)
    router = Router()
    router.on("source", name="plain")(noop)
    router.on("source", name="by-v", key="v")(noop)
    router.on("source", name="unordered", ordered=False)(noop)
    await install(sa_url, router)
    sql(pg_dsn, "INSERT INTO source VALUES (1, 1)")
    sql(pg_dsn, "DELETE FROM pgreact.queue")
    sql(pg_dsn, "UPDATE source SET payload = 'x'")  # neither key changes: no fence
    sql(pg_dsn, "UPDATE source SET v = 2")  # by-v's key changes
    sql(pg_dsn, "UPDATE source SET id = 2")  # the primary key changes
    rows = sql(
        pg_dsn,
        "SELECT handler, op, row_key, order_key, run_at = 'infinity' FROM pgreact.queue "
        "ORDER BY change_id, handler, id",
    )
    assert rows == [
        ("by-v", "UPDATE", "1", "1", False),
        ("plain", "UPDATE", "1", "1", False),
        ("unordered", "UPDATE", "1", None, False),
        ("by-v", "UPDATE", "1", "1", False),
        ("by-v", "FENCE", "1", "2", True),  # the new key's later events wait for it
        ("plain", "UPDATE", "1", "1", False),
        ("unordered", "UPDATE", "1", None, False),
        ("by-v", "UPDATE", "2", "2", False),
        ("plain", "UPDATE", "2", "1", False),  # ordered under the old key ...
        ("plain", "FENCE", "1", "2", True),  # ... and, through its fence, the new one
        ("unordered", "UPDATE", "2", None, False),
    ]

    def release() -> tuple[int, int]:
        released, remaining = sql(pg_dsn, "SELECT * FROM pgreact.release_fences()")[0]
        return int(released), int(remaining)

    assert release() == (0, 2)
    # by-v's key change handled (acked: deleted), plain's dead-lettered: both fences go.
    sql(pg_dsn, "DELETE FROM pgreact.queue WHERE handler = 'by-v' AND op = 'UPDATE'")
    sql(
        pg_dsn, "UPDATE pgreact.queue SET dead_at = now() WHERE handler = 'plain' AND op = 'UPDATE'"
    )
    assert release() == (2, 0)
    assert sql(pg_dsn, "SELECT count(*) FROM pgreact.queue WHERE op = 'FENCE'") == [(0,)]


async def test_disabled_or_dropped_capture_is_reported_and_reinstalled(
    pg_dsn: str, sa_url: str
) -> None:
    create_tables(pg_dsn)
    router = Router()
    router.on("source", name="h", ops=("INSERT", "UPDATE"))(noop)
    await install(sa_url, router)
    assert await problems(sa_url, router) == {}
    sql(pg_dsn, "ALTER TABLE source DISABLE TRIGGER pgreact_capture_insert")
    sql(pg_dsn, "DROP TRIGGER pgreact_capture_truncate ON source")
    found = (await problems(sa_url, router))["h"]
    assert "public.source lacks capture of INSERT, TRUNCATE" in found
    fix = await install(sa_url, router)
    assert [s.split(" ON ")[0] for s in fix.statements] == [
        'DROP TRIGGER IF EXISTS "pgreact_capture_insert"',
        'CREATE TRIGGER "pgreact_capture_insert" AFTER INSERT',
        'CREATE TRIGGER "pgreact_capture_truncate" AFTER TRUNCATE',
    ]
    assert await problems(sa_url, router) == {}


async def test_a_disabled_trigger_clone_on_a_partition_is_reported_and_re_enabled(
    pg_dsn: str, sa_url: str
) -> None:
    """The row triggers of a partitioned table fire on its partitions as clones, which can be
    disabled one partition at a time: that partition's changes were lost without a word."""
    sql(pg_dsn, PARTITIONED)
    router = Router()
    router.on("measures", name="m", ops=ALL_OPS)(noop)
    await install(sa_url, router)
    sql(pg_dsn, "ALTER TABLE measures_eu DISABLE TRIGGER pgreact_capture_insert")
    sql(pg_dsn, "ALTER TABLE measures_eu ENABLE REPLICA TRIGGER pgreact_capture_update")
    sql(pg_dsn, "ALTER TABLE measures_us DISABLE TRIGGER USER")
    found = (await problems(sa_url, router))["m"]
    assert (
        "public.measures lacks capture of INSERT on public.measures_eu, UPDATE on "
        "public.measures_eu, DELETE on public.measures_us, INSERT on public.measures_us, "
        "TRUNCATE on public.measures_us, UPDATE on public.measures_us"
    ) in found, found
    fix = await install(sa_url, router)
    assert sorted(fix.statements) == sorted(
        [
            'ALTER TABLE "public"."measures_eu" ENABLE TRIGGER "pgreact_capture_insert"',
            'ALTER TABLE "public"."measures_eu" ENABLE TRIGGER "pgreact_capture_update"',
            'ALTER TABLE "public"."measures_us" ENABLE TRIGGER "pgreact_capture_insert"',
            'ALTER TABLE "public"."measures_us" ENABLE TRIGGER "pgreact_capture_update"',
            'ALTER TABLE "public"."measures_us" ENABLE TRIGGER "pgreact_capture_delete"',
            'DROP TRIGGER IF EXISTS "pgreact_capture_truncate" ON "public"."measures_us"',
            'CREATE TRIGGER "pgreact_capture_truncate" AFTER TRUNCATE ON "public"."measures_us" '
            'FOR EACH STATEMENT EXECUTE FUNCTION "pgreact".capture_truncate()',
        ]
    )
    assert await problems(sa_url, router) == {}
    sql(pg_dsn, "INSERT INTO measures VALUES ('eu', 1, 1), ('us', 2, 1)")
    sql(pg_dsn, "UPDATE measures SET v = 2")
    got = sorted((op, k) for _, op, k, _, _ in queued(pg_dsn, "m"))
    assert got == [
        ("INSERT", key("eu", 1)),
        ("INSERT", key("us", 2)),
        ("UPDATE", key("eu", 1)),
        ("UPDATE", key("us", 2)),
    ]


async def test_partitioned_table_captured_by_version_3_is_upgraded_to_row_triggers(
    pg_dsn: str, sa_url: str
) -> None:
    sql(pg_dsn, PARTITIONED)
    router = Router()
    router.on("measures", name="m")(noop)
    await install(sa_url, router, up_to=3)
    sql(pg_dsn, "INSERT INTO measures_eu VALUES ('eu', 1, 1)")
    assert queued(pg_dsn, "m") == []  # what version 3 lost
    await install(sa_url, router)
    sql(pg_dsn, "INSERT INTO measures_eu VALUES ('eu', 2, 1)")
    assert [(t, op, k) for t, op, k, _, _ in queued(pg_dsn, "m")] == [
        ("public.measures", "INSERT", key("eu", 2))
    ]
    assert await problems(sa_url, router) == {}


# -- the doorbell under a long transaction ----------------------------------------------------


async def test_an_open_transaction_that_rang_never_blocks_other_writers(
    pg_dsn: str, sa_url: str
) -> None:
    """The first writer after the daemon went idle disarms the bell in its own transaction. While
    that transaction stays open, other writers must neither wait for it nor go unannounced: with
    the sweep an hour away, only their own wake-up gets their changes handled."""
    create_tables(pg_dsn)
    router = recording_router("bell")
    await install(sa_url, router)
    async with running(make_settings(sa_url, sweep_interval=3600), router):
        await wait_until(lambda: sql(pg_dsn, "SELECT armed FROM pgreact.doorbell") == [(True,)])
        with psycopg.connect(libpq(pg_dsn)) as holder:
            holder.execute("INSERT INTO source VALUES (1, 1)")  # rings; stays open
            with psycopg.connect(libpq(pg_dsn), autocommit=True) as writer:
                writer.execute("SET lock_timeout = '3s'")
                writer.execute("INSERT INTO source VALUES (2, 2)")  # v1: lock timeout
            await wait_until(lambda: effects(pg_dsn, "bell") == [("INSERT", "2", 2)], timeout=15)
            holder.commit()
        await wait_until(lambda: len(effects(pg_dsn, "bell")) == 2, timeout=15)
    assert sorted(effects(pg_dsn, "bell")) == [("INSERT", "1", 1), ("INSERT", "2", 2)]


async def test_repeatable_read_and_serializable_writers_never_fail_on_the_doorbell(
    pg_dsn: str, sa_url: str
) -> None:
    """A writer whose snapshot saw the bell armed, after another writer disarmed it and the
    daemon re-armed it, must neither fail ("could not serialize access") nor go unannounced:
    with the sweep an hour away, only the wake-ups get the changes handled."""
    create_tables(pg_dsn)
    router = recording_router("iso")
    await install(sa_url, router)

    def armed() -> bool:
        return sql(pg_dsn, "SELECT armed FROM pgreact.doorbell") == [(True,)]

    async with running(make_settings(sa_url, sweep_interval=3600), router):
        await wait_until(armed, message="the bell armed")
        with psycopg.connect(libpq(pg_dsn)) as rr, psycopg.connect(libpq(pg_dsn)) as ser:
            rr.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            ser.execute("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE")
            for conn in (rr, ser):
                conn.execute("SELECT count(*) FROM source")  # the snapshot: the bell armed
            sql(pg_dsn, "INSERT INTO source VALUES (1, 1)")  # another writer disarms it
            await wait_until(lambda: effects(pg_dsn, "iso") == [("INSERT", "1", 1)])
            await wait_until(armed, message="the bell re-armed")  # idle: the next write rings
            rr.execute("INSERT INTO source VALUES (2, 2)")
            sql(pg_dsn, "INSERT INTO source VALUES (3, 3)")  # a read-committed writer, meanwhile
            ser.execute("INSERT INTO source VALUES (4, 4)")
            rr.commit()
            ser.commit()
        await wait_until(lambda: len(effects(pg_dsn, "iso")) == 4, timeout=15)
    assert sorted(effects(pg_dsn, "iso")) == [("INSERT", str(i), i) for i in range(1, 5)]
