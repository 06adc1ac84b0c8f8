"""``pgreact install``: idempotent, printable, injection-proof, prunable; clear errors for tables
and key columns that do not exist. Against a real server, for both drivers."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import anyio
import psycopg
import pytest
from psycopg import sql as psql
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

from pgreact import Event, Router, installer
from pgreact.errors import SchemaError
from tests.handlers.effects import router as effects_router
from tests.support import (
    create_tables,
    install,
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
    """A handler that does nothing (installation tests never run it)."""


async def noop_batch(events: Sequence[Event], session: AsyncSession) -> None:
    """A batch handler that does nothing."""


def catalog(dsn: str, schema: str = "pgreact") -> dict[str, Any]:
    """Everything install creates or touches, with OIDs so that a drop-and-recreate shows."""
    return {
        "schema": sql(dsn, "SELECT oid FROM pg_namespace WHERE nspname = %s", [schema]),
        "relations": sql(
            dsn,
            "SELECT c.oid, c.relname, c.relkind, c.reloptions FROM pg_class c "
            "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = %s ORDER BY 2",
            [schema],
        ),
        "columns": sql(
            dsn,
            "SELECT c.relname, a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull "
            "FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid "
            "JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = %s AND a.attnum > 0 AND NOT a.attisdropped ORDER BY 1, 2",
            [schema],
        ),
        "indexes": sql(
            dsn,
            "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = %s ORDER BY 1",
            [schema],
        ),
        "functions": sql(
            dsn,
            "SELECT p.oid, p.proname, md5(p.prosrc) FROM pg_proc p "
            "JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname = %s ORDER BY 2",
            [schema],
        ),
        "triggers": triggers(dsn),
        "subscriptions": (
            sql(
                dsn,
                f"SELECT handler, table_schema, table_name, ops, ordered, key_columns, updated_at "
                f'FROM "{schema}".subscriptions ORDER BY 1',
            )
            if installed(dsn, schema)
            else None
        ),
        "versions": (
            sql(dsn, f'SELECT version, applied_at FROM "{schema}".schema_version ORDER BY 1')
            if installed(dsn, schema)
            else None
        ),
    }


def triggers(dsn: str) -> list[tuple[Any, ...]]:
    """Every user trigger in the database: (table, name, definition, enabled)."""
    return sql(
        dsn,
        "SELECT t.tgrelid::regclass::text, t.tgname, pg_get_triggerdef(t.oid), t.tgenabled "
        "FROM pg_trigger t WHERE NOT t.tgisinternal ORDER BY 1, 2",
    )


def trigger_ops(dsn: str, table: str) -> set[str]:
    """Which row ops of ``table`` (a regclass text) pgreact captures (every captured table also
    has a TRUNCATE trigger: see ``has_truncate_trigger``)."""
    return {
        name.removeprefix("pgreact_capture_").upper()
        for rel, name, _, _ in triggers(dsn)
        if rel == table and name.startswith("pgreact_capture_")
    } - {"TRUNCATE"}


def has_truncate_trigger(dsn: str, table: str) -> bool:
    return any(
        rel == table and name == "pgreact_capture_truncate" for rel, name, _, _ in triggers(dsn)
    )


def installed(dsn: str, schema: str = "pgreact") -> bool:
    return bool(sql(dsn, "SELECT to_regclass(%s) IS NOT NULL", [f'"{schema}".subscriptions'])[0][0])


def subscriptions(dsn: str) -> list[str]:
    return [r[0] for r in sql(dsn, "SELECT handler FROM pgreact.subscriptions ORDER BY 1")]


def cli_env(sa_url: str, **extra: str) -> dict[str, str]:
    return {
        "PGREACT_DATABASE_URL": sa_url,
        "PGREACT_HANDLERS": "handlers.effects",
        "PGREACT_SCHEMA": "pgreact",
        "PGREACT_HTTP_PORT": "0",
        **extra,
    }


# -- idempotence ------------------------------------------------------------------------------


def two_tables_router() -> Router:
    router = Router()
    router.include(effects_router)
    router.on("public.other", name="other-keyed", key=("grp", "id"), ops=("INSERT", "UPDATE"))(noop)
    return router


async def test_install_twice_changes_nothing(pg_dsn: str, sa_url: str) -> None:
    create_tables(pg_dsn)
    sql(pg_dsn, "CREATE TABLE other (id int PRIMARY KEY, grp text)")
    router = two_tables_router()
    first = await install(sa_url, router)
    assert (first.from_version, first.to_version) == (0, installer.latest_version())
    before = catalog(pg_dsn)
    assert trigger_ops(pg_dsn, "source") == {"INSERT", "UPDATE", "DELETE"}
    assert trigger_ops(pg_dsn, "other") == {"INSERT", "UPDATE"}
    assert subscriptions(pg_dsn) == ["batch", "other-keyed", "single"]

    second = await install(sa_url, router)
    assert second.from_version == second.to_version == installer.latest_version()
    assert second.notes == []
    assert catalog(pg_dsn) == before

    # Still exactly one capture per change and handler (no doubled triggers).
    sql(pg_dsn, "INSERT INTO source VALUES (1, 1)")
    sql(pg_dsn, "INSERT INTO other VALUES (1, 'g')")
    rows = sql(pg_dsn, "SELECT handler, row_key FROM pgreact.queue ORDER BY handler")
    assert rows == [("batch", "1"), ("other-keyed", "1"), ("single", "1")]


async def test_upgrade_from_version_2_keeps_the_queue_and_marks_crash_suspects(
    pg_dsn: str, sa_url: str
) -> None:
    create_tables(pg_dsn)
    assert (await install(sa_url, effects_router, up_to=2)).to_version == 2
    sql(pg_dsn, "INSERT INTO source SELECT g, g FROM generate_series(1, 3) g")
    # Version 2 marked both kinds of retry by last_error alone.
    sql(pg_dsn, "UPDATE pgreact.queue SET last_error = 'ValueError: bad' WHERE row_key = '1'")
    sql(
        pg_dsn,
        "UPDATE pgreact.queue SET last_error = 'claim abandoned: the process handling attempt 1 "
        "stopped without finishing it' WHERE row_key = '2'",
    )

    upgrade = await install(sa_url, effects_router)
    assert (upgrade.from_version, upgrade.to_version) == (2, installer.latest_version())
    rows = sql(pg_dsn, "SELECT row_key, crashed FROM pgreact.queue ORDER BY handler, row_key")
    assert rows == [("1", False), ("2", True), ("3", False)] * 2  # per handler
    indexes = sql(pg_dsn, "SELECT indexname FROM pg_indexes WHERE schemaname = 'pgreact'")
    # Additive: version-2 daemons still running during the rollout keep their index.
    assert {"queue_crashed", "queue_suspect"} <= {r[0] for r in indexes}


async def test_concurrent_installs_serialise(pg_dsn: str, sa_url: str) -> None:
    create_tables(pg_dsn)
    results: list[installer.InstallPlan] = []

    async def one() -> None:
        results.append(await install(sa_url, effects_router))

    async with anyio.create_task_group() as tg:
        tg.start_soon(one)
        tg.start_soon(one)
    assert sorted(r.from_version for r in results) == [0, installer.latest_version()]
    versions = sql(pg_dsn, "SELECT count(*) FROM pgreact.schema_version")[0][0]
    assert versions == installer.latest_version()  # each migration applied once
    assert trigger_ops(pg_dsn, "source") == {"INSERT", "UPDATE", "DELETE"}


def test_print_sql_prints_the_ddl_and_changes_nothing(pg_dsn: str, sa_url: str) -> None:
    create_tables(pg_dsn)
    before = catalog(pg_dsn)
    result = pgreact_cli("install", "--print-sql", env=cli_env(sa_url))
    assert result.returncode == 0, result.stderr
    ddl = result.stdout
    for fragment in (
        'CREATE SCHEMA IF NOT EXISTS "pgreact"',
        'CREATE TABLE "pgreact".queue',
        "CREATE FUNCTION",
        'INSERT INTO "pgreact".subscriptions',
        'CREATE TRIGGER "pgreact_capture_insert" AFTER INSERT ON "public"."source"',
        'CREATE TRIGGER "pgreact_capture_truncate" AFTER TRUNCATE ON "public"."source"',
    ):
        assert fragment in ddl
    # A transaction a reviewer can run as is: short lock waits, serialised with other installs.
    statements = [s.strip() for s in ddl.split(";\n") if s.strip()]
    assert statements[0] == "BEGIN"
    assert statements[1].startswith("SELECT pg_advisory_xact_lock(")
    assert statements[2].endswith("SET LOCAL lock_timeout = '2000ms'")
    assert statements[-1] == "COMMIT;" or statements[-1] == "COMMIT"
    assert catalog(pg_dsn) == before, "--print-sql changed the database"
    assert not installed(pg_dsn)

    # What it prints is the whole install: applied by hand, a real install finds nothing to do.
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(ddl.encode())
    applied = catalog(pg_dsn)
    assert trigger_ops(pg_dsn, "source") == {"INSERT", "UPDATE", "DELETE"}
    anyio.run(install, sa_url, effects_router)
    assert catalog(pg_dsn) == applied

    again = pgreact_cli("install", "--print-sql", env=cli_env(sa_url))
    assert again.returncode == 0, again.stderr
    assert again.stdout.startswith('-- pgreact: schema "pgreact" is up to date')
    assert "BEGIN" not in again.stdout


# -- names that would break naive SQL ---------------------------------------------------------

WEIRD_SCHEMA = "My Schema"
WEIRD_TABLE = "Order; drop table x"
WEIRD_COLUMN = "Amount; --"


async def test_quoted_names_are_captured_without_injection(pg_dsn: str, sa_url: str) -> None:
    create_tables(pg_dsn)
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE x (id int); INSERT INTO x VALUES (1), (2)")
        conn.execute(psql.SQL("CREATE SCHEMA {}").format(psql.Identifier(WEIRD_SCHEMA)))
        conn.execute(psql.SQL("CREATE TABLE {}.x (id int)").format(psql.Identifier(WEIRD_SCHEMA)))
        conn.execute(
            psql.SQL("CREATE TABLE {}.{} (id int PRIMARY KEY, {} int)").format(
                psql.Identifier(WEIRD_SCHEMA),
                psql.Identifier(WEIRD_TABLE),
                psql.Identifier(WEIRD_COLUMN),
            )
        )
    seen: list[Event] = []
    router = Router()
    target = f'"{WEIRD_SCHEMA}"."{WEIRD_TABLE}"'

    @router.on(target, name="weird")
    async def weird(event: Event, session: AsyncSession) -> None:
        seen.append(event)
        image = event.new or event.old or {}
        await session.execute(
            EFFECT,
            {
                "h": "weird",
                "e": event.id,
                "k": event.key,
                "op": event.op,
                "v": image.get(WEIRD_COLUMN),
                "a": event.attempt,
            },
        )

    @router.on_batch(target, name="weird-keyed", key=WEIRD_COLUMN)
    async def weird_keyed(events: Sequence[Event], session: AsyncSession) -> None:
        await session.execute(
            EFFECT,
            [
                {"h": "weird-keyed", "e": e.id, "k": e.key, "op": e.op, "v": None, "a": 1}
                for e in events
            ],
        )

    await install(sa_url, router)
    await install(sa_url, router)  # and again: the idempotent path quotes just as well
    assert trigger_ops(pg_dsn, '"My Schema"."Order; drop table x"') == {
        "INSERT",
        "UPDATE",
        "DELETE",
    }
    assert sql(pg_dsn, "SELECT count(*) FROM x")[0][0] == 2
    assert sql(pg_dsn, 'SELECT count(*) FROM "My Schema".x')[0][0] == 0

    table = psql.SQL("{}.{}").format(psql.Identifier(WEIRD_SCHEMA), psql.Identifier(WEIRD_TABLE))
    column = psql.Identifier(WEIRD_COLUMN)
    async with running(make_settings(sa_url), router):
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            conn.execute(
                psql.SQL("INSERT INTO {} (id, {}) VALUES (1, 10), (2, 20), (3, 30)").format(
                    table, column
                )
            )
            conn.execute(psql.SQL("UPDATE {} SET {} = 11 WHERE id = 1").format(table, column))
            conn.execute(psql.SQL("DELETE FROM {} WHERE id = 3").format(table))
        await wait_until(
            lambda: sql(pg_dsn, "SELECT count(*) FROM effects")[0][0] >= 10,
            message="5 changes for 2 handlers",
        )
        # The UPDATE changed weird-keyed's key: its fence goes once the UPDATE was handled.
        await wait_until(
            lambda: sql(pg_dsn, "SELECT count(*) FROM pgreact.queue")[0][0] == 0,
            message="an empty queue",
        )
    effects = sql(pg_dsn, "SELECT op, k, v FROM effects WHERE handler = 'weird' ORDER BY event_id")
    assert effects == [
        ("INSERT", "1", 10),
        ("INSERT", "2", 20),
        ("INSERT", "3", 30),
        ("UPDATE", "1", 11),
        ("DELETE", "3", 30),
    ]
    assert {e.table for e in seen} == {f"{WEIRD_SCHEMA}.{WEIRD_TABLE}"}
    keyed = sql(pg_dsn, "SELECT count(*) FROM effects WHERE handler = 'weird-keyed'")[0][0]
    assert keyed == 5
    assert sql(pg_dsn, "SELECT count(*) FROM x")[0][0] == 2
    assert sql(pg_dsn, "SELECT count(*) FROM pgreact.queue")[0][0] == 0


# -- errors -----------------------------------------------------------------------------------


async def test_missing_table_is_a_schema_error_and_installs_nothing(
    pg_dsn: str, sa_url: str
) -> None:
    create_tables(pg_dsn)
    router = Router()
    router.on("source", name="fine")(noop)
    router.on("sales.nowhere", name="lost")(noop)
    with pytest.raises(SchemaError) as info:
        await install(sa_url, router)
    message = str(info.value)
    assert "sales.nowhere" in message
    assert "lost" in message
    assert "does not exist" in message
    assert not installed(pg_dsn), "a failed install must leave nothing behind"
    assert triggers(pg_dsn) == []


def test_cli_install_with_a_missing_table_exits_1_naming_it(pg_dsn: str, sa_url: str) -> None:
    # handlers.effects handles public.source, which this database lacks.
    result = pgreact_cli("install", env=cli_env(sa_url))
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "public.source" in result.stderr
    assert "does not exist" in result.stderr
    assert "Traceback" not in result.stderr
    assert not installed(pg_dsn)


@pytest.mark.parametrize("key", ["nope", ("id", "missing_too")])
async def test_key_naming_a_missing_column_is_an_error(
    pg_dsn: str, sa_url: str, key: str | tuple[str, ...]
) -> None:
    create_tables(pg_dsn)
    router = Router()
    router.on("source", name="keyed", key=key)(noop)
    with pytest.raises(SchemaError) as info:
        await install(sa_url, router)
    message = str(info.value)
    assert "keyed" in message
    missing = key if isinstance(key, str) else key[1]
    assert missing in message
    assert "public.source" in message
    assert not installed(pg_dsn)


async def test_table_without_primary_key_gets_a_note(pg_dsn: str, sa_url: str) -> None:
    sql(pg_dsn, "CREATE TABLE nokey (a int, b int)")
    router = Router()
    router.on("nokey", name="needs-order")(noop)
    router.on("nokey", name="keyed", key="a")(noop)
    plan = await install(sa_url, router)
    notes = [n for n in plan.notes if "public.nokey" in n]
    assert len(notes) == 1
    assert "primary key" in notes[0]
    sql(pg_dsn, "INSERT INTO nokey VALUES (7, 8)")
    rows = sql(pg_dsn, "SELECT handler, row_key, order_key FROM pgreact.queue ORDER BY 1")
    assert rows == [("keyed", None, "7"), ("needs-order", None, None)]


# -- prune ------------------------------------------------------------------------------------


async def install_pruning(sa_url: str, router: Router) -> installer.InstallPlan:
    engine = create_async_engine(sa_url)
    try:
        return await installer.install(engine, router, "pgreact", prune=True)
    finally:
        await engine.dispose()


def pruning_routers() -> tuple[Router, Router]:
    before = Router()
    before.on("t1", name="a")(noop)
    before.on_batch("t2", name="b")(noop_batch)
    before.on("t1", name="c")(noop)
    after = Router()
    after.on("t1", name="a", ops=("INSERT",))(noop)
    return before, after


async def test_prune_removes_triggers_and_subscriptions_no_longer_handled(
    pg_dsn: str, sa_url: str
) -> None:
    sql(pg_dsn, "CREATE TABLE t1 (id int PRIMARY KEY); CREATE TABLE t2 (id int PRIMARY KEY)")
    sql(pg_dsn, "CREATE TABLE bystander (id int)")
    sql(
        pg_dsn,
        "CREATE FUNCTION noop_trigger() RETURNS trigger LANGUAGE plpgsql AS "
        "'BEGIN RETURN NULL; END'; "
        "CREATE TRIGGER users_own AFTER INSERT ON t2 FOR EACH ROW EXECUTE FUNCTION noop_trigger()",
    )
    before, after = pruning_routers()
    await install(sa_url, before)
    assert trigger_ops(pg_dsn, "t1") == trigger_ops(pg_dsn, "t2") == {"INSERT", "UPDATE", "DELETE"}

    # Without --prune: narrowed ops are applied, stale things only reported.
    plan = await install(sa_url, after)
    assert trigger_ops(pg_dsn, "t1") == {"INSERT"}
    assert trigger_ops(pg_dsn, "t2") == {"INSERT", "UPDATE", "DELETE"}
    assert subscriptions(pg_dsn) == ["a", "b", "c"]
    notes = " | ".join(plan.notes)
    assert "'b'" in notes and "'c'" in notes and "public.t2" in notes
    assert "--prune" in notes

    plan = await install_pruning(sa_url, after)
    assert plan.notes == []
    assert trigger_ops(pg_dsn, "t1") == {"INSERT"}
    assert trigger_ops(pg_dsn, "t2") == set()
    assert subscriptions(pg_dsn) == ["a"]
    # Triggers that are not pgreact's stay.
    assert [r[1] for r in triggers(pg_dsn) if r[0] == "t2"] == ["users_own"]

    sql(pg_dsn, "INSERT INTO t1 VALUES (1); INSERT INTO t2 VALUES (1)")
    sql(pg_dsn, "UPDATE t1 SET id = 2")
    assert sql(pg_dsn, "SELECT handler, op FROM pgreact.queue") == [("a", "INSERT")]

    # Pruning again has nothing left to do.
    snapshot = catalog(pg_dsn)
    await install_pruning(sa_url, after)
    assert catalog(pg_dsn) == snapshot


async def test_prune_drops_the_backlog_of_removed_handlers(pg_dsn: str, sa_url: str) -> None:
    sql(pg_dsn, "CREATE TABLE t1 (id int PRIMARY KEY); CREATE TABLE t2 (id int PRIMARY KEY)")
    before, after = pruning_routers()
    await install(sa_url, before)
    sql(pg_dsn, "INSERT INTO t1 VALUES (1); INSERT INTO t2 VALUES (1)")
    await install_pruning(sa_url, after)
    handlers = sql(pg_dsn, "SELECT DISTINCT handler FROM pgreact.queue ORDER BY 1")
    assert handlers == [("a",)]


def test_cli_install_prune(pg_dsn: str, sa_url: str) -> None:
    """`install --prune` through the CLI (the notes without it are covered above)."""
    create_tables(pg_dsn)
    sql(pg_dsn, "CREATE TABLE t2 (id int PRIMARY KEY)")
    router = Router()
    router.include(effects_router)
    router.on("t2", name="gone")(noop)
    anyio.run(install, sa_url, router)
    assert trigger_ops(pg_dsn, "t2") == {"INSERT", "UPDATE", "DELETE"}

    pruned = pgreact_cli("install", "--prune", env=cli_env(sa_url))
    assert pruned.returncode == 0, pruned.stderr
    assert "note:" not in pruned.stderr
    assert trigger_ops(pg_dsn, "t2") == set()
    assert trigger_ops(pg_dsn, "source") == {"INSERT", "UPDATE", "DELETE"}
    assert subscriptions(pg_dsn) == ["batch", "single"]


# -- locks: an install never blocks the application -------------------------------------------


async def test_noop_install_takes_no_lock_and_ddl_gives_up_within_lock_timeout(
    pg_dsn: str, sa_url: str
) -> None:
    create_tables(pg_dsn)
    sql(pg_dsn, "CREATE TABLE other (id int PRIMARY KEY)")
    await install(sa_url, effects_router)
    needs_ddl = Router()
    needs_ddl.include(effects_router)
    needs_ddl.on("other", name="other")(noop)
    engine = create_async_engine(sa_url)
    waits: list[str] = []
    try:
        # An application transaction that wrote both tables and stays open: it holds
        # RowExclusiveLock on them, which CREATE/DROP TRIGGER must wait for.
        # (The doorbell disarmed, as while a daemon is busy: an open transaction that rang it
        # holds its row, and other writers' capture would wait for that, install or not.)
        sql(pg_dsn, "UPDATE pgreact.doorbell SET armed = false")
        with psycopg.connect(pg_dsn) as app:
            app.execute("INSERT INTO source VALUES (1, 1); INSERT INTO other VALUES (1)")
            with anyio.fail_after(60):  # a hang guard: the old install queued here for good
                again = await installer.install(engine, effects_router, "pgreact")
            assert again.statements == []
            # Nobody queued behind an install: another writer goes straight through.
            sql(pg_dsn, "INSERT INTO source VALUES (2, 2)")

            with pytest.raises(SchemaError) as info:
                await installer.install(
                    engine,
                    needs_ddl,
                    "pgreact",
                    lock_timeout=0.2,
                    attempts=2,
                    on_wait=waits.append,
                )
            blocker = f"pid {app.info.backend_pid}"
            assert len(waits) == 1 and "retrying (1/2)" in waits[0]
            for message in (waits[0], str(info.value)):
                assert "table public.other" in message and blocker in message
            sql(pg_dsn, "INSERT INTO other VALUES (2)")  # the install let go of its lock
        # The application committed: now it goes through.
        applied = await installer.install(engine, needs_ddl, "pgreact")
    finally:
        await engine.dispose()
    assert trigger_ops(pg_dsn, "other") == {"INSERT", "UPDATE", "DELETE"}
    assert has_truncate_trigger(pg_dsn, "other")
    assert any("other" in s for s in applied.statements)
    assert sql(pg_dsn, "SELECT count(*) FROM source")[0][0] == 2


async def test_upgrade_from_version_3_keeps_the_queue_and_the_row_triggers(
    pg_dsn: str, sa_url: str
) -> None:
    create_tables(pg_dsn)
    assert (await install(sa_url, effects_router, up_to=3)).to_version == 3
    sql(pg_dsn, "INSERT INTO source SELECT g, g FROM generate_series(1, 3) g")
    sql(pg_dsn, "UPDATE pgreact.queue SET dead_at = now() WHERE row_key = '3'")
    before = sql(pg_dsn, "SELECT id, handler, row_key, dead_at FROM pgreact.queue ORDER BY id")
    row_triggers = [t for t in triggers(pg_dsn) if t[0] == "source"]

    upgrade = await install(sa_url, effects_router)
    assert (upgrade.from_version, upgrade.to_version) == (3, installer.latest_version())
    # Only the TRUNCATE trigger is new: the row triggers (and their tables' locks) are left be.
    assert [s for s in upgrade.statements if "TRIGGER" in s] == [
        'CREATE TRIGGER "pgreact_capture_truncate" AFTER TRUNCATE ON "public"."source" '
        'FOR EACH STATEMENT EXECUTE FUNCTION "pgreact".capture_truncate()'
    ]
    assert [t for t in triggers(pg_dsn) if t[0] == "source" and "truncate" not in t[1]] == (
        row_triggers
    )
    assert sql(pg_dsn, "SELECT id, handler, row_key, dead_at FROM pgreact.queue ORDER BY id") == (
        before
    )
    oids = sql(pg_dsn, "SELECT DISTINCT table_oid = 'source'::regclass FROM pgreact.subscriptions")
    assert oids == [(True,)]
    sql(pg_dsn, "INSERT INTO source VALUES (4, 4)")  # captured by the upgraded functions
    assert sql(pg_dsn, "SELECT count(*) FROM pgreact.queue WHERE row_key = '4'") == [(2,)]
    assert (await install(sa_url, effects_router)).statements == []


async def test_a_lock_wait_names_the_holders_of_partitions_and_of_planning(
    pg_dsn: str, sa_url: str
) -> None:
    """CREATE TRIGGER on a partitioned table locks its partitions too, and planning reads the
    partition tree: the message names whoever holds what the install waited for."""
    sql(
        pg_dsn,
        "CREATE TABLE p (k text, id int, PRIMARY KEY (k, id)) PARTITION BY LIST (k); "
        "CREATE TABLE p1 PARTITION OF p FOR VALUES IN ('a')",
    )
    router = Router()
    router.on("p", name="p")(noop)
    engine = create_async_engine(sa_url)
    waits: list[str] = []

    async def refused() -> str:
        with pytest.raises(SchemaError) as info:
            await installer.install(
                engine, router, "pgreact", lock_timeout=0.2, attempts=2, on_wait=waits.append
            )
        return str(info.value)

    try:
        with psycopg.connect(pg_dsn) as app:  # writes the partition only: no lock on p
            app.execute("INSERT INTO p1 VALUES ('a', 1)")
            message = await refused()
            assert "table public.p and gave up" in message, message
            # (its ACCESS SHARE lock on p does not block CREATE TRIGGER; the one on p1 does)
            assert f"pid {app.info.backend_pid} (" in message
            assert "RowExclusiveLock on public.p1" in message
        with psycopg.connect(pg_dsn) as app:
            app.execute("LOCK TABLE p1 IN ACCESS EXCLUSIVE MODE")
            message = await refused()
            assert "while planning" in message and "one of pgreact's own" not in message
            assert f"pid {app.info.backend_pid} (AccessExclusiveLock on public.p1" in message
        await installer.install(engine, router, "pgreact")
    finally:
        await engine.dispose()
    assert len(waits) == 2
