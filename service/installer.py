"""``pgreact install``: create or upgrade pgreact's schema and the capture triggers.

The plan is computed from the catalog and the loaded routers, then either printed
(``--print-sql``) or applied in one transaction under an advisory lock, so two replicas
starting at once cannot interleave DDL. Running it again changes nothing.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from pgreact.errors import SchemaError
from pgreact.events import OPS, Op
from pgreact.router import DurableHandler, Router, TableName
from pgreact.sql import (
    migration_files,
    qualified,
    quote_ident,
    quote_literal,
    render,
    split_statements,
)

CAPTURE_FUNCTIONS: dict[Op, str] = {
    "INSERT": "capture_insert",
    "UPDATE": "capture_update",
    "DELETE": "capture_delete",
}
TRANSITION: dict[Op, str] = {
    "INSERT": "REFERENCING NEW TABLE AS pgreact_new_rows FOR EACH STATEMENT",
    "UPDATE": "FOR EACH ROW",
    "DELETE": "REFERENCING OLD TABLE AS pgreact_old_rows FOR EACH STATEMENT",
}


def wake_channel(schema: str) -> str:
    """The NOTIFY channel the capture triggers ring; payload is the ``schema.table``."""
    return f"{schema}_events"


def trigger_name(schema: str, op: Op) -> str:
    return f"{schema}_capture_{op.lower()}"


def lock_key(schema: str) -> int:
    """A stable 31-bit number for ``schema``: the advisory-lock namespace of this install."""
    import zlib

    return zlib.crc32(f"pgreact:{schema}".encode()) & 0x7FFFFFFF


@dataclass
class InstallPlan:
    statements: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    from_version: int = 0
    to_version: int = 0

    @property
    def sql(self) -> str:
        return "".join(f"{s};\n\n" for s in self.statements)


async def schema_version(conn: AsyncConnection, schema: str) -> int:
    """The installed schema version, 0 when pgreact was never installed."""
    table = qualified(schema, "schema_version")
    exists = await conn.scalar(text("SELECT to_regclass(:t) IS NOT NULL"), {"t": table})
    if not exists:
        return 0
    version = await conn.scalar(text(f"SELECT coalesce(max(version), 0) FROM {table}"))
    return int(version or 0)


def latest_version() -> int:
    return max(v for v, _ in migration_files())


async def primary_key(conn: AsyncConnection, table: TableName) -> tuple[str, ...]:
    rows = await conn.execute(
        text(
            """
            SELECT a.attname
            FROM pg_index i
            JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey)
            WHERE i.indrelid = CAST(:t AS regclass) AND i.indisprimary
            ORDER BY array_position(i.indkey, a.attnum)
            """
        ),
        {"t": qualified(table.schema, table.name)},
    )
    return tuple(r[0] for r in rows)


async def table_columns(conn: AsyncConnection, table: TableName) -> set[str] | None:
    """Column names of ``table``, or ``None`` when it does not exist."""
    oid = await conn.scalar(
        text("SELECT to_regclass(:t)::oid"), {"t": qualified(table.schema, table.name)}
    )
    if oid is None:
        return None
    rows = await conn.execute(
        text(
            "SELECT attname FROM pg_attribute "
            "WHERE attrelid = :o AND attnum > 0 AND NOT attisdropped"
        ),
        {"o": oid},
    )
    return {r[0] for r in rows}


async def installed_triggers(conn: AsyncConnection, schema: str) -> dict[TableName, set[Op]]:
    """Which capture triggers exist, per table: found by the function they call."""
    rows = await conn.execute(
        text(
            """
            SELECT n.nspname, c.relname, p.proname
            FROM pg_trigger t
            JOIN pg_class c ON c.oid = t.tgrelid
            JOIN pg_namespace n ON n.oid = c.relnamespace
            JOIN pg_proc p ON p.oid = t.tgfoid
            JOIN pg_namespace pn ON pn.oid = p.pronamespace
            WHERE pn.nspname = :schema AND NOT t.tgisinternal
              AND p.proname IN ('capture_insert', 'capture_update', 'capture_delete')
            """
        ),
        {"schema": schema},
    )
    by_func = {v: k for k, v in CAPTURE_FUNCTIONS.items()}
    found: dict[TableName, set[Op]] = defaultdict(set)
    for nsp, rel, proname in rows:
        found[TableName(nsp, rel)].add(by_func[proname])
    return dict(found)


async def plan(
    conn: AsyncConnection, router: Router, schema: str, *, prune: bool = False
) -> InstallPlan:
    """Compute the DDL that brings the database in line with ``router``."""
    result = InstallPlan()
    s = quote_ident(schema)
    current = await schema_version(conn, schema)
    result.from_version = current
    result.to_version = max(current, latest_version())
    if current == 0:
        result.statements += [
            f"CREATE SCHEMA IF NOT EXISTS {s}",
            f"CREATE TABLE IF NOT EXISTS {s}.schema_version ("
            "version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())",
        ]
    for version, raw in migration_files():
        if version > current:
            result.statements += split_statements(render(raw, schema, wake_channel(schema)))
            result.statements.append(f"INSERT INTO {s}.schema_version (version) VALUES ({version})")

    handlers_by_table: dict[TableName, list[DurableHandler]] = defaultdict(list)
    for handler in router.durable:
        handlers_by_table[handler.table].append(handler)

    existing = await installed_triggers(conn, schema) if current else {}
    for table, handlers in sorted(handlers_by_table.items(), key=lambda kv: kv[0].qualified):
        result.statements += await _table_statements(
            conn, schema, table, handlers, existing, result
        )

    if current:
        wanted = {h.name for h in router.durable}
        stale_subs = [
            r[0]
            for r in await conn.execute(text(f"SELECT handler FROM {s}.subscriptions ORDER BY 1"))
            if r[0] not in wanted
        ]
        stale_tables = [t for t in existing if t not in handlers_by_table]
        if prune:
            for name in stale_subs:
                # Its queued events (dead letters included) have no consumer any more.
                result.statements.append(
                    f"DELETE FROM {s}.queue WHERE handler = {quote_literal(name)}"
                )
                result.statements.append(
                    f"DELETE FROM {s}.subscriptions WHERE handler = {quote_literal(name)}"
                )
            for table in sorted(stale_tables, key=lambda t: t.qualified):
                for op in sorted(existing[table]):
                    result.statements.append(
                        f"DROP TRIGGER IF EXISTS {quote_ident(trigger_name(schema, op))} "
                        f"ON {qualified(table.schema, table.name)}"
                    )
        else:
            for name in stale_subs:
                result.notes.append(
                    f"handler {name!r} is subscribed but not loaded: its events accumulate; "
                    "run `pgreact install --prune` to remove it and its queued events"
                )
            for table in stale_tables:
                result.notes.append(
                    f"table {table} still has capture triggers but no loaded handler; "
                    "run `pgreact install --prune` to remove them"
                )
    return result


async def _table_statements(
    conn: AsyncConnection,
    schema: str,
    table: TableName,
    handlers: list[DurableHandler],
    existing: dict[TableName, set[Op]],
    result: InstallPlan,
) -> list[str]:
    s = quote_ident(schema)
    columns = await table_columns(conn, table)
    if columns is None:
        names = ", ".join(h.name for h in handlers)
        raise SchemaError(
            f"table {table} (handled by {names}) does not exist: create it first, or fix the "
            "table name in the handler (names are schema-qualified; 'orders' means public.orders)"
        )
    pk = await primary_key(conn, table)
    if not pk and any(h.ordered and h.key is None for h in handlers):
        result.notes.append(
            f"table {table} has no primary key: its events are delivered without per-row "
            "ordering (give it a primary key, or pass key='column' to the handler)"
        )
    statements: list[str] = []
    for h in handlers:
        missing = [c for c in (h.key or ()) if c not in columns]
        if missing:
            raise SchemaError(
                f"handler {h.name!r}: key column(s) {', '.join(missing)} not found in {table}"
            )
        ops = "ARRAY[" + ", ".join(quote_literal(o) for o in sorted(h.ops)) + "]::text[]"
        key = (
            "NULL"
            if h.key is None
            else "ARRAY[" + ", ".join(quote_literal(c) for c in h.key) + "]::text[]"
        )
        values = ", ".join(
            [
                quote_literal(h.name),
                quote_literal(table.schema),
                quote_literal(table.name),
                ops,
                "true" if h.ordered else "false",
                key,
            ]
        )
        statements.append(
            f"INSERT INTO {s}.subscriptions AS x "
            "(handler, table_schema, table_name, ops, ordered, key_columns) "
            f"VALUES ({values}) ON CONFLICT (handler) DO UPDATE SET "
            "table_schema = EXCLUDED.table_schema, table_name = EXCLUDED.table_name, "
            "ops = EXCLUDED.ops, ordered = EXCLUDED.ordered, "
            "key_columns = EXCLUDED.key_columns, updated_at = now() "
            "WHERE (x.table_schema, x.table_name, x.ops, x.ordered, x.key_columns) IS DISTINCT "
            "FROM (EXCLUDED.table_schema, EXCLUDED.table_name, EXCLUDED.ops, EXCLUDED.ordered, "
            "EXCLUDED.key_columns)"
        )
    wanted_ops = set().union(*(h.ops for h in handlers))
    args = ", ".join(quote_literal(c) for c in pk)
    target = qualified(table.schema, table.name)
    for op in OPS:
        name = quote_ident(trigger_name(schema, op))
        if op in wanted_ops:
            statements.append(
                f"CREATE OR REPLACE TRIGGER {name} AFTER {op} ON {target} {TRANSITION[op]} "
                f"EXECUTE FUNCTION {s}.{CAPTURE_FUNCTIONS[op]}({args})"
            )
        elif op in existing.get(table, set()):
            statements.append(f"DROP TRIGGER IF EXISTS {name} ON {target}")
    return statements


async def install(
    engine: AsyncEngine, router: Router, schema: str, *, prune: bool = False
) -> InstallPlan:
    """Apply the plan in one transaction, serialised against concurrent installs."""
    async with engine.begin() as conn:
        await conn.execute(text("SELECT pg_advisory_xact_lock(:k, 0)"), {"k": lock_key(schema)})
        the_plan = await plan(conn, router, schema, prune=prune)
        for statement in the_plan.statements:
            await conn.exec_driver_sql(statement)
    return the_plan
