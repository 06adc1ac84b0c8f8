"""``pgreact install``: create or upgrade pgreact's schema and the capture triggers.

The plan is computed from the catalog and the loaded routers, then either printed
(``--print-sql``, as one reviewable transaction) or applied in one transaction under an
advisory lock, so two replicas starting at once cannot interleave DDL. Running it again
changes nothing and takes no lock on any application table: installed triggers and
subscriptions are compared with what is wanted first, and only differences become DDL. DDL
that must wait for a lock waits at most ``lock_timeout`` (an application transaction holding
the table must not queue every other writer behind the install), says who holds the lock, and
is retried.
"""

from __future__ import annotations

import zlib
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import anyio
import structlog
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from pgreact.db import sqlstate_of
from pgreact.errors import SchemaError
from pgreact.events import Op
from pgreact.router import DurableHandler, Router, TableName
from pgreact.sql import (
    migration_files,
    qualified,
    quote_ident,
    quote_literal,
    render,
    split_statements,
)

log = structlog.get_logger("pgreact.installer")

CAPTURE_FUNCTIONS = (
    "capture_insert",
    "capture_update",
    "capture_delete",
    "capture_row",
    "capture_truncate",
)
# pg_trigger.tgtype bits (PostgreSQL's trigger.h); an AFTER trigger has no timing bit.
TG_ROW = 1
TG_OP_BITS: dict[Op, int] = {"INSERT": 4, "DELETE": 8, "UPDATE": 16, "TRUNCATE": 32}
NEW_ROWS = "pgreact_new_rows"
OLD_ROWS = "pgreact_old_rows"
LOCK_NOT_AVAILABLE = "55P03"
LOCK_TIMEOUT = 2.0
"""Seconds a DDL statement of ``install`` waits for a table lock before giving up (and retrying):
a waiting ALTER/CREATE TRIGGER queues every later writer of the table behind it."""
LOCK_ATTEMPTS = 5


def wake_channel(schema: str) -> str:
    """The NOTIFY channel the capture triggers ring; payload is the ``schema.table``."""
    return f"{schema}_events"


def trigger_name(schema: str, op: Op) -> str:
    return f"{schema}_capture_{op.lower()}"


def lock_key(schema: str) -> int:
    """A stable 31-bit number for ``schema``: the advisory-lock namespace of this install."""
    return zlib.crc32(f"pgreact:{schema}".encode()) & 0x7FFFFFFF


@dataclass
class InstallPlan:
    schema: str = "pgreact"
    statements: list[str] = field(default_factory=list)
    # Per statement: the application table whose lock it takes (None: pgreact's own objects).
    targets: list[str | None] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    from_version: int = 0
    to_version: int = 0
    # The watched tables, and whether their casts to json were checked (see unsafe_casts): by
    # the plan when the schema already had the check, else by install once the migrations ran
    # (statements[:migrations_end]).
    tables: list[Relation] = field(default_factory=list)
    casts_checked: bool = False
    migrations_end: int = 0

    def add(self, statement: str, target: str | None = None) -> None:
        self.statements.append(statement)
        self.targets.append(target)

    @property
    def sql(self) -> str:
        """The plan as one transaction a reviewer can read and run (``psql -f``)."""
        if not self.statements:
            return (
                f"-- pgreact: schema {quote_ident(self.schema)} is up to date "
                f"(version {self.to_version}): nothing to do\n"
            )
        head = [
            "BEGIN",
            # Wait for another install as long as it takes (nothing is locked yet), but for
            # a table lock only briefly: a waiting DDL statement queues every writer behind it.
            f"SELECT pg_advisory_xact_lock({lock_key(self.schema)}, 0)",
            f"SET LOCAL lock_timeout = '{round(LOCK_TIMEOUT * 1000)}ms'",
        ]
        return "".join(f"{s};\n\n" for s in [*head, *self.statements, "COMMIT"])


# -- the catalog ------------------------------------------------------------------------------


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


@dataclass(frozen=True, slots=True)
class Relation:
    oid: int
    schema: str
    name: str

    @property
    def quoted(self) -> str:
        return qualified(self.schema, self.name)

    @property
    def display(self) -> str:
        return f"{self.schema}.{self.name}"


@dataclass(frozen=True, slots=True)
class Trigger:
    """A capture trigger, wanted or installed; ``signature`` is what install compares."""

    relation: Relation
    name: str
    function: str
    tgtype: int
    args: tuple[str, ...] = ()
    old_table: str | None = None
    new_table: str | None = None
    enabled: bool = True  # fires in an ordinary session (not disabled, not replica-only)

    @property
    def signature(self) -> tuple[object, ...]:
        return (self.function, self.tgtype, self.args, self.old_table, self.new_table)

    @property
    def ops(self) -> set[Op]:
        return {op for op, bit in TG_OP_BITS.items() if self.tgtype & bit}

    def create_sql(self, schema: str) -> str:
        (op,) = self.ops
        referencing = ""
        if self.new_table:
            referencing = f"REFERENCING NEW TABLE AS {self.new_table} "
        elif self.old_table:
            referencing = f"REFERENCING OLD TABLE AS {self.old_table} "
        level = "ROW" if self.tgtype & TG_ROW else "STATEMENT"
        args = ", ".join(quote_literal(a) for a in self.args)
        return (
            f"CREATE TRIGGER {quote_ident(self.name)} AFTER {op} ON {self.relation.quoted} "
            f"{referencing}FOR EACH {level} "
            f"EXECUTE FUNCTION {quote_ident(schema)}.{self.function}({args})"
        )

    def drop_sql(self) -> str:
        return f"DROP TRIGGER IF EXISTS {quote_ident(self.name)} ON {self.relation.quoted}"


async def capture_triggers(conn: AsyncConnection, schema: str) -> list[Trigger]:
    """Every capture trigger of ``schema`` (clones on partitions excluded: they follow their
    parent's)."""
    rows = await conn.execute(
        text(
            """
            SELECT t.tgrelid::bigint, n.nspname, c.relname, t.tgname, p.proname,
                   t.tgtype::int, encode(t.tgargs, 'hex'), t.tgoldtable, t.tgnewtable,
                   t.tgenabled::text IN ('O', 'A')
            FROM pg_trigger t
            JOIN pg_class c ON c.oid = t.tgrelid
            JOIN pg_namespace n ON n.oid = c.relnamespace
            JOIN pg_proc p ON p.oid = t.tgfoid
            JOIN pg_namespace pn ON pn.oid = p.pronamespace
            WHERE pn.nspname = :schema AND NOT t.tgisinternal AND t.tgparentid = 0
              AND p.proname = ANY (CAST(:functions AS text[]))
            ORDER BY 1, 4
            """
        ),
        {"schema": schema, "functions": list(CAPTURE_FUNCTIONS)},
    )
    return [
        Trigger(
            Relation(int(r[0]), r[1], r[2]),
            r[3],
            r[4],
            int(r[5]),
            _decode_args(r[6]),
            r[7],
            r[8],
            bool(r[9]),
        )
        for r in rows
    ]


async def disabled_clones(conn: AsyncConnection, schema: str) -> set[tuple[int, str]]:
    """(partition oid, trigger name) of every capture trigger cloned onto a partition that does
    not fire: ``ALTER TABLE partition DISABLE TRIGGER …`` (or ``… USER``) on a partition
    silences its parent's trigger there, and that partition's changes go uncaptured."""
    rows = await conn.execute(
        text(
            """
            SELECT t.tgrelid::bigint, t.tgname
            FROM pg_trigger t
            JOIN pg_proc p ON p.oid = t.tgfoid
            JOIN pg_namespace pn ON pn.oid = p.pronamespace
            WHERE pn.nspname = :schema AND t.tgparentid <> 0
              AND p.proname = ANY (CAST(:functions AS text[]))
              AND t.tgenabled::text NOT IN ('O', 'A')
            """
        ),
        {"schema": schema, "functions": list(CAPTURE_FUNCTIONS)},
    )
    return {(int(r[0]), str(r[1])) for r in rows}


def _decode_args(hex_args: str) -> tuple[str, ...]:
    raw = bytes.fromhex(hex_args or "")
    return tuple(part.decode() for part in raw.split(b"\x00")[:-1])


async def _relation(conn: AsyncConnection, table: TableName) -> tuple[Relation, str] | None:
    row = (
        await conn.execute(
            text("SELECT oid::bigint, relkind::text FROM pg_class WHERE oid = to_regclass(:t)"),
            {"t": qualified(table.schema, table.name)},
        )
    ).first()
    if row is None:
        return None
    return Relation(int(row[0]), table.schema, table.name), str(row[1])


async def _partitions(conn: AsyncConnection, parent: Relation) -> list[Relation]:
    rows = await conn.execute(
        text(
            """
            SELECT pt.relid::bigint, n.nspname, c.relname
            FROM pg_partition_tree(CAST(:oid AS oid)) pt
            JOIN pg_class c ON c.oid = pt.relid
            JOIN pg_namespace n ON n.oid = c.relnamespace
            WHERE pt.relid <> CAST(:oid AS oid)
            ORDER BY 2, 3
            """
        ),
        {"oid": parent.oid},
    )
    return [Relation(int(r[0]), r[1], r[2]) for r in rows]


def wanted_triggers(
    schema: str,
    relation: Relation,
    partitioned: bool,
    partitions: Sequence[Relation],
    ops: set[Op],
    pk: tuple[str, ...],
    version: int,
) -> list[Trigger]:
    """The capture triggers a table needs.

    A plain table: statement-level INSERT and DELETE through transition tables (one statement
    per statement, whatever its row count), a row-level UPDATE (transition tables do not pair
    old and new rows). A partitioned table: row-level triggers, which PostgreSQL clones onto
    every partition, present or attached later, and which fire for changes made through a
    partition too. Always a TRUNCATE trigger (on every partition as well: TRUNCATE of a
    partition does not fire its parent's): it captures TRUNCATE for handlers that subscribe to
    it, and warns the truncating session about those that do not. (Before schema version 4,
    which upgrade tests install, only the plain table's three.)
    """
    modern = version >= 4
    out: list[Trigger] = []
    for op in ("INSERT", "UPDATE", "DELETE"):
        if op not in ops:
            continue
        name = trigger_name(schema, op)
        if partitioned and modern:
            out.append(Trigger(relation, name, "capture_row", TG_ROW | TG_OP_BITS[op], pk))
        elif op == "INSERT":
            out.append(Trigger(relation, name, "capture_insert", 4, pk, new_table=NEW_ROWS))
        elif op == "DELETE":
            out.append(Trigger(relation, name, "capture_delete", 8, pk, old_table=OLD_ROWS))
        else:
            out.append(Trigger(relation, name, "capture_update", TG_ROW | 16, pk))
    truncate = trigger_name(schema, "TRUNCATE")
    for rel in (relation, *partitions) if modern else ():
        out.append(Trigger(rel, truncate, "capture_truncate", TG_OP_BITS["TRUNCATE"]))
    return out


# -- the plan ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Subscription:
    table_schema: str
    table_name: str
    ops: tuple[str, ...]
    ordered: bool
    key_columns: tuple[str, ...] | None
    table_oid: int | None


async def _subscriptions(conn: AsyncConnection, schema: str) -> dict[str, _Subscription]:
    rows = await conn.execute(
        text(
            "SELECT handler, table_schema, table_name, ops, ordered, key_columns, "
            f"table_oid::bigint FROM {quote_ident(schema)}.subscriptions"
        )
    )
    return {
        r[0]: _Subscription(
            r[1],
            r[2],
            tuple(sorted(r[3])),
            bool(r[4]),
            None if r[5] is None else tuple(r[5]),
            None if r[6] is None else int(r[6]),
        )
        for r in rows
    }


async def plan(
    conn: AsyncConnection, router: Router, schema: str, *, prune: bool = False
) -> InstallPlan:
    """Compute the DDL that brings the database in line with ``router``; nothing when it is."""
    result = InstallPlan(schema=schema)
    s = quote_ident(schema)
    current = await schema_version(conn, schema)
    result.from_version = current
    result.to_version = max(current, latest_version())
    if current == 0:
        result.add(f"CREATE SCHEMA IF NOT EXISTS {s}")
        result.add(
            f"CREATE TABLE IF NOT EXISTS {s}.schema_version ("
            "version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
        )
    for version, raw in migration_files():
        if version > current:
            for statement in split_statements(render(raw, schema, wake_channel(schema))):
                result.add(statement)
            result.add(f"INSERT INTO {s}.schema_version (version) VALUES ({version})")
    result.migrations_end = len(result.statements)

    handlers_by_table: dict[TableName, list[DurableHandler]] = defaultdict(list)
    for handler in router.durable:
        handlers_by_table[handler.table].append(handler)

    # Subscriptions of a schema older than version 4 lack table_oid: rewrite them all.
    subscribed = await _subscriptions(conn, schema) if current >= 4 else {}
    installed = await capture_triggers(conn, schema) if current else []
    by_key = {(t.relation.oid, t.name): t for t in installed}
    silenced = await disabled_clones(conn, schema) if current >= 4 else set()
    wanted_relations: set[int] = set()
    planned: set[tuple[int, str]] = set()
    for table, handlers in sorted(handlers_by_table.items(), key=lambda kv: kv[0].qualified):
        relation, partitions, wanted = await _table_plan(
            conn, schema, table, handlers, subscribed, result
        )
        result.tables.append(relation)
        for trigger in wanted:
            wanted_relations.add(trigger.relation.oid)
            if (trigger.relation.oid, trigger.name) in planned:
                continue  # a partition's TRUNCATE trigger, wanted by it and by its parent
            planned.add((trigger.relation.oid, trigger.name))
            have = by_key.get((trigger.relation.oid, trigger.name))
            target = trigger.relation.display
            if have is None:
                result.add(trigger.create_sql(schema), target)
            elif have.signature != trigger.signature or not have.enabled:
                result.add(have.drop_sql(), target)  # its clones go with it, and come back
                result.add(trigger.create_sql(schema), target)
            elif trigger.tgtype & TG_ROW:  # kept: its clones on partitions must fire too
                for part in partitions:
                    if (part.oid, trigger.name) in silenced:
                        result.add(
                            f"ALTER TABLE {part.quoted} ENABLE TRIGGER {quote_ident(trigger.name)}",
                            part.display,
                        )
        names = {(t.relation.oid, t.name) for t in wanted}
        relations = {t.relation.oid for t in wanted}
        for have in installed:  # ops no handler of this table wants any more
            if have.relation.oid in relations and (have.relation.oid, have.name) not in names:
                result.add(have.drop_sql(), have.relation.display)

    if current:
        wanted_names = {h.name for h in router.durable}
        stale_subs = sorted(
            r[0]
            for r in await conn.execute(text(f"SELECT handler FROM {s}.subscriptions"))
            if r[0] not in wanted_names
        )
        stale = [t for t in installed if t.relation.oid not in wanted_relations]
        stale_tables = sorted({t.relation.display for t in stale})
        if prune:
            for name in stale_subs:
                # Its queued events (dead letters included) have no consumer any more.
                result.add(f"DELETE FROM {s}.queue WHERE handler = {quote_literal(name)}")
                result.add(f"DELETE FROM {s}.subscriptions WHERE handler = {quote_literal(name)}")
            for trigger in sorted(stale, key=lambda t: (t.relation.display, t.name)):
                result.add(trigger.drop_sql(), trigger.relation.display)
        else:
            for name in stale_subs:
                result.notes.append(
                    f"handler {name!r} is subscribed but not loaded: its events accumulate; "
                    "run `pgreact install --prune` to remove it and its queued events"
                )
            for display in stale_tables:
                result.notes.append(
                    f"table {display} still has capture triggers but no loaded handler; "
                    "run `pgreact install --prune` to remove them"
                )
    if current >= 4:
        await refuse_unsafe_casts(conn, schema, result.tables)
    # Otherwise install checks once the migrations made the check (none before version 4,
    # where upgrade tests stop).
    result.casts_checked = current >= 4 or result.to_version < 4
    return result


async def _table_plan(
    conn: AsyncConnection,
    schema: str,
    table: TableName,
    handlers: list[DurableHandler],
    subscribed: dict[str, _Subscription],
    result: InstallPlan,
) -> tuple[Relation, list[Relation], list[Trigger]]:
    """Add the subscription changes of ``table``'s handlers to ``result``; return the table, its
    partitions and the triggers it needs."""
    s = quote_ident(schema)
    columns = await table_columns(conn, table)
    found = await _relation(conn, table)
    if columns is None or found is None:
        names = ", ".join(h.name for h in handlers)
        raise SchemaError(
            f"table {table} (handled by {names}) does not exist: create it first, or fix the "
            "table name in the handler (names are schema-qualified; 'orders' means public.orders)"
        )
    relation, relkind = found
    pk = await primary_key(conn, table)
    if not pk and any(h.ordered and h.key is None for h in handlers):
        result.notes.append(
            f"table {table} has no primary key: its events are delivered without per-row "
            "ordering (give it a primary key, or pass key='column' to the handler)"
        )
    for h in handlers:
        missing = [c for c in (h.key or ()) if c not in columns]
        if missing:
            raise SchemaError(
                f"handler {h.name!r}: key column(s) {', '.join(missing)} not found in {table}"
            )
        ops = tuple(sorted(h.ops))
        wanted = _Subscription(table.schema, table.name, ops, h.ordered, h.key, relation.oid)
        if subscribed.get(h.name) == wanted:
            continue
        columns_values = {
            "table_schema": quote_literal(table.schema),
            "table_name": quote_literal(table.name),
            "ops": _text_array(ops),
            "ordered": "true" if h.ordered else "false",
            "key_columns": "NULL" if h.key is None else _text_array(h.key),
        }
        if result.to_version >= 4:  # older versions (upgrade tests stop there) have no oid
            columns_values["table_oid"] = f"CAST({quote_literal(relation.quoted)} AS regclass)"
        names = ", ".join(columns_values)
        values = ", ".join(columns_values.values())
        result.add(
            f"INSERT INTO {s}.subscriptions AS x (handler, {names}) "
            f"VALUES ({quote_literal(h.name)}, {values}) ON CONFLICT (handler) DO UPDATE SET "
            + ", ".join(f"{c} = EXCLUDED.{c}" for c in columns_values)
            + f", updated_at = now() WHERE ({', '.join(f'x.{c}' for c in columns_values)}) "
            f"IS DISTINCT FROM ({', '.join(f'EXCLUDED.{c}' for c in columns_values)})"
        )
    partitioned = relkind == "p"
    partitions = await _partitions(conn, relation) if partitioned else []
    row_ops: set[Op] = set().union(*(h.ops for h in handlers)) - {"TRUNCATE"}
    triggers = wanted_triggers(
        schema, relation, partitioned, partitions, row_ops, pk, result.to_version
    )
    return relation, partitions, triggers


def _text_array(values: Sequence[str]) -> str:
    return "ARRAY[" + ", ".join(quote_literal(v) for v in values) + "]::text[]"


async def refuse_unsafe_casts(
    conn: AsyncConnection, schema: str, tables: Sequence[Relation]
) -> None:
    """Raise a SchemaError when capturing ``tables`` would run a cast to json that someone
    other than the schema's owner (or a superuser) controls: to_jsonb() calls such a cast, and
    capture runs as the schema's owner (see ``unsafe_casts`` in the schema)."""
    if not tables:
        return
    s = quote_ident(schema)
    rows = (
        await conn.execute(
            text(
                "SELECT t.i, u.column_name, u.type_name, u.target, u.function_name, u.owner "
                f"FROM unnest(CAST(:oids AS oid[])) WITH ORDINALITY t (rel, i), "
                f"{s}.unsafe_casts(t.rel) u ORDER BY 1, 2, 3"
            ),
            {"oids": [t.oid for t in tables]},
        )
    ).all()
    if not rows:
        return
    owner = await conn.scalar(
        text(
            "SELECT r.rolname FROM pg_namespace n JOIN pg_roles r ON r.oid = n.nspowner "
            "WHERE n.nspname = :schema"
        ),
        {"schema": schema},
    )
    found = "; ".join(
        f"{tables[int(i) - 1].display} column {column} (type {type_name}) has a cast to {target} "
        f"through function {function}, owned by {function_owner}"
        for i, column, type_name, target, function, function_owner in rows
    )
    fixes = " and ".join(sorted({f"DROP CAST ({r[2]} AS {r[3]})" for r in rows}))
    raise SchemaError(
        f"{found}: capture runs as pgreact's schema owner ({owner}), and to_jsonb() would call "
        "that function as it, so its owner could run any SQL with the owner's rights (forge "
        f"events, for one). Install refused: {fixes}, or, if you trust the function, make "
        f"{owner} or a superuser own it (ALTER FUNCTION … OWNER TO …); then run "
        "`pgreact install` again"
    )


# -- applying it ------------------------------------------------------------------------------


async def install(
    engine: AsyncEngine,
    router: Router,
    schema: str,
    *,
    prune: bool = False,
    lock_timeout: float = LOCK_TIMEOUT,
    attempts: int = LOCK_ATTEMPTS,
    on_wait: Callable[[str], None] | None = None,
) -> InstallPlan:
    """Apply the plan in one transaction, serialised against concurrent installs.

    A statement that cannot get its lock within ``lock_timeout`` rolls the whole transaction
    back; ``on_wait`` (default: a log line) hears which table and which sessions hold it, and
    the install is retried, ``attempts`` times in all, before it fails with a SchemaError.
    """
    say = on_wait or (lambda message: log.warning("install_lock_wait", detail=message))
    attempt = 0
    while True:
        attempt += 1
        the_plan: InstallPlan | None = None
        position = -1
        try:
            async with engine.begin() as conn:
                await conn.execute(
                    text("SELECT pg_advisory_xact_lock(:k, 0)"), {"k": lock_key(schema)}
                )
                await conn.execute(
                    text("SELECT set_config('lock_timeout', :t, true)"),
                    {"t": f"{max(1, round(lock_timeout * 1000))}ms"},
                )
                the_plan = await plan(conn, router, schema, prune=prune)
                for index, statement in enumerate(the_plan.statements):
                    if index == the_plan.migrations_end and not the_plan.casts_checked:
                        # The check came with these migrations: before any table is touched.
                        await refuse_unsafe_casts(conn, schema, the_plan.tables)
                        the_plan.casts_checked = True
                    position = index
                    await conn.exec_driver_sql(statement)
                if not the_plan.casts_checked and the_plan.tables:
                    await refuse_unsafe_casts(conn, schema, the_plan.tables)
            return the_plan
        except DBAPIError as exc:
            if sqlstate_of(exc) != LOCK_NOT_AVAILABLE:
                raise
            if the_plan is None:  # planning reads pgreact's tables and the watched tables'
                # partitions (pg_partition_tree locks them): only an exclusive lock blocks that
                watched = sorted({h.table.qualified for h in router.durable})
                holders = await _lock_holders(engine, schema, watched, own=True, exclusive=True)
                what = "pgreact's own tables or a watched table's partitions, while planning"
            elif (target := the_plan.targets[position] if position >= 0 else None) is None:
                holders = await _lock_holders(engine, schema, [], own=True)
                what = "one of pgreact's own tables"
            else:
                holders = await _lock_holders(engine, schema, [target])
                what = f"table {target}"
            message = (
                f"install waited {lock_timeout:g} s for a lock on {what} and gave up; held by "
                + (", ".join(holders) or "a session that has ended since")
            )
            if attempt >= attempts:
                raise SchemaError(
                    f"{message}; no lock after {attempts} attempts: end or wait for those "
                    "transactions (a long transaction that wrote the table holds it to its "
                    "end), then run `pgreact install` again"
                ) from exc
            say(f"{message}; retrying ({attempt}/{attempts})")
            await anyio.sleep(min(0.5 * attempt, 3.0))


async def _lock_holders(
    engine: AsyncEngine,
    schema: str,
    tables: Sequence[str],
    *,
    own: bool = False,
    exclusive: bool = False,
) -> list[str]:
    """The sessions holding a lock on one of ``tables`` (``schema.name``) or their partitions,
    or, with ``own``, on pgreact's own tables; with ``exclusive``, only the ACCESS EXCLUSIVE
    locks, which are all that block reading. (The partitions come from pg_inherits, which
    takes no lock: pg_partition_tree() would wait for the very holder being looked for.)"""
    async with engine.connect() as conn:
        rows = await conn.execute(
            text(
                """
                WITH RECURSIVE tree (relid) AS (
                    SELECT to_regclass(u)::oid FROM unnest(CAST(:tables AS text[])) u
                    UNION
                    SELECT i.inhrelid FROM pg_inherits i JOIN tree ON i.inhparent = tree.relid
                )
                SELECT a.pid, a.state, a.application_name,
                       extract(epoch FROM now() - a.xact_start)::int,
                       string_agg(DISTINCT l.mode || ' on ' || n.nspname || '.' || c.relname,
                                  ', ')
                FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
                JOIN pg_class c ON c.oid = l.relation
                JOIN pg_namespace n ON n.oid = c.relnamespace
                WHERE l.granted AND l.pid <> pg_backend_pid() AND l.locktype = 'relation'
                  AND l.database = (SELECT oid FROM pg_database
                                    WHERE datname = current_database())
                  AND (l.relation IN (SELECT relid FROM tree)
                       OR CAST(:own AS boolean) AND c.relnamespace = to_regnamespace(:schema))
                  AND (NOT CAST(:exclusive AS boolean) OR l.mode = 'AccessExclusiveLock')
                GROUP BY 1, 2, 3, 4
                ORDER BY 1
                """
            ),
            {
                "tables": [_quoted(t) for t in tables],
                "own": own,
                "exclusive": exclusive,
                "schema": quote_ident(schema),
            },
        )
        return [
            f"pid {r[0]} ({r[4]}, {r[1]}, transaction open {r[3]} s"
            + (f", application_name {r[2]!r}" if r[2] else "")
            + ")"
            for r in rows
        ]


def _quoted(display: str) -> str:
    schema, _, name = display.partition(".")
    return qualified(schema, name)


# -- the daemon role --------------------------------------------------------------------------


def grants_sql(schema: str, role: str) -> str:
    """The least privileges ``role`` needs to run the daemon (and ``status``, ``check``,
    ``dead``): no DDL, nothing that lets it capture or forge changes."""
    s, r = quote_ident(schema), quote_ident(role)
    return "\n".join(
        [
            f"-- pgreact: what role {r} needs to run `pgreact run` (no DDL: `pgreact install`",
            "-- runs as the schema's owner). It also needs CONNECT on the database (PUBLIC has",
            "-- it by default); what the handlers read and write is theirs to grant.",
            f"GRANT USAGE ON SCHEMA {s} TO {r};",
            f"GRANT SELECT ON {s}.schema_version, {s}.subscriptions TO {r};",
            "-- claim (UPDATE, FOR UPDATE SKIP LOCKED), retries and dead letters, ack (DELETE)",
            f"GRANT SELECT, UPDATE, DELETE ON {s}.queue TO {r};",
            "-- re-arm the writers' doorbell, and tell its signed rings from anybody's NOTIFY",
            f"GRANT SELECT, UPDATE ON {s}.doorbell TO {r};",
            f"GRANT SELECT ON {s}.mark_key TO {r};",
            "-- health of the capture triggers; release of key-change fences",
            f"GRANT EXECUTE ON FUNCTION {s}.capture_state(), {s}.unsafe_casts(oid), "
            f"{s}.release_fences() TO {r};",
            "",
        ]
    )


# -- is capture still in place? ---------------------------------------------------------------


async def capture_problems(
    conn: AsyncConnection, schema: str, handlers: Sequence[DurableHandler]
) -> dict[str, str]:
    """Per handler whose changes are not all captured: what is wrong and how to fix it.

    A renamed table is still captured (subscriptions follow the table's oid) and its events keep
    the name the handler was installed with, but the handler's configuration no longer names
    it: reported too, since the next ``install`` would not find the table. So is a cast to json
    that capture would run as the schema's owner (:func:`refuse_unsafe_casts`).
    """
    rows = (
        await conn.execute(
            text(
                "SELECT handler, installed_as, current_name, missing, unsafe "
                f"FROM {quote_ident(schema)}.capture_state()"
            )
        )
    ).all()
    state = {r[0]: (str(r[1]), r[2], list(r[3] or [])) for r in rows}
    unsafe = {r[0]: list(r[4] or []) for r in rows}
    problems: dict[str, str] = {}
    for h in handlers:
        if h.name not in state:
            problems[h.name] = (
                f"handler {h.name} is not installed, so nothing of {h.table} is captured for "
                "it: run `pgreact install` with the same PGREACT_HANDLERS"
            )
            continue
        installed_as, current, missing = state[h.name]
        if current is None:
            problems[h.name] = (
                f"table {installed_as} (handler {h.name}) was dropped: nothing is captured for "
                "it. Recreate it and run `pgreact install`, or remove the handler and run "
                "`pgreact install --prune`"
            )
        elif current != installed_as:
            problems[h.name] = (
                f"table {installed_as} (handler {h.name}) was renamed to {current}: its changes "
                f"are still captured, as {installed_as}. Point the handler at {current!r} and "
                "run `pgreact install` (or rename the table back)"
            )
        elif installed_as != h.table.qualified:
            problems[h.name] = (
                f"handler {h.name} names {h.table} but was installed for {installed_as}: run "
                "`pgreact install`"
            )
        elif missing:
            problems[h.name] = (
                f"{installed_as} lacks capture of {', '.join(missing)} (handler {h.name}; a "
                "trigger was dropped or disabled, or a partition was attached since the last "
                "install): run `pgreact install`"
            )
        if unsafe.get(h.name):
            danger = (
                f"{installed_as} (handler {h.name}): {'; '.join(unsafe[h.name])}: capture runs "
                "as pgreact's schema owner and to_jsonb() calls that function as it, so its "
                "owner can run any SQL with the owner's rights. Drop the cast, or have the "
                "schema's owner or a superuser own the function"
            )
            problems[h.name] = f"{danger}; {problems[h.name]}" if h.name in problems else danger
    return problems


def truncate_deaf(handlers: Sequence[DurableHandler]) -> list[str]:
    """Handlers that do not subscribe to TRUNCATE: a TRUNCATE of their table reaches them not at
    all (the truncating session gets a WARNING naming them)."""
    return sorted(h.name for h in handlers if "TRUNCATE" not in h.ops)
