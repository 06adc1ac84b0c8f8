"""``pgreact check``: is this configuration and this database ready to run the daemon?

Each check yields ``ok``, ``warn`` or ``fail`` with a message that says what to do. Only ``fail``
makes the command exit non-zero.

Poolers. Both URLs are probed for what sits in front of PostgreSQL (:func:`probe_route`), by
behaviour rather than by port: a pooler answers the startup handshake with a process id of its
own, and in transaction mode it hands a client's server connection to another client as soon as
a transaction ends. That decides whether ``PGREACT_POOLER`` fits the write URL, and whether the
listen URL can deliver notifications at all. The listen URL is then proven by a NOTIFY round
trip *from a second session*: a session that notifies itself gets its notification back even
through a transaction-mode pooler (the server delivers it to whoever holds that server
connection at commit — the sender), so only a notification from another session proves delivery.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import anyio
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from pgreact import installer
from pgreact.db import WriteTimeouts, create_write_engine
from pgreact.errors import PgreactError
from pgreact.listeners import backend_for
from pgreact.listeners.protocol import Notification
from pgreact.router import Router, load_routers
from pgreact.settings import Driver, Settings, libpq_url, mask_url

Level = Literal["ok", "warn", "fail"]
RouteKind = Literal["direct", "session", "transaction", "statement", "unknown"]
BUDGET_WARN = 0.8
SELF_TEST_TIMEOUT = 5.0
PGBOUNCER_PORT = 6432
# Query parameters only SQLAlchemy's asyncpg adapter understands: the probes connect with the
# bare drivers, which would refuse (libpq) or send them to the server as settings (asyncpg).
_ADAPTER_PARAMS = frozenset({"prepared_statement_cache_size", "prepared_statement_name_func"})
_POOLER_FIX = "set PGREACT_POOLER=pgbouncer-transaction"
_LISTEN_FIX = (
    "set PGREACT_LISTEN_URL to a URL that reaches PostgreSQL directly or through a "
    "session-mode pool (e.g. postgresql://user:pass@db-host:5432/db)"
)


@dataclass
class CheckReport:
    results: list[tuple[Level, str, str]] = field(default_factory=list)

    def add(self, level: Level, name: str, message: str) -> None:
        self.results.append((level, name, message))

    @property
    def ok(self) -> bool:
        return all(level != "fail" for level, _, _ in self.results)

    def lines(self) -> list[str]:
        out = [f"[{level.upper():4}] {name}: {message}" for level, name, message in self.results]
        fails = sum(1 for lvl, _, _ in self.results if lvl == "fail")
        warns = sum(1 for lvl, _, _ in self.results if lvl == "warn")
        out.append(f"{'OK' if self.ok else 'FAILED'}: {fails} failure(s), {warns} warning(s)")
        return out


async def run_checks(settings: Settings) -> CheckReport:
    report = CheckReport()
    for note in settings.config_warnings():  # misspelt variables, a capped concurrency
        report.add("warn", "settings", note)
    router: Router | None = None
    try:
        router = load_routers(settings.require_handlers())
        report.add(
            "ok", "handlers", f"{len(router.durable)} durable, {len(router.notify)} on_notify"
        )
    except PgreactError as exc:
        report.add("fail", "handlers", str(exc))
    await _check_write_database(settings, router, report)
    await _check_listener(settings, report)
    return report


# -- what is in front of PostgreSQL -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Route:
    """How a URL reaches PostgreSQL, as observed by :func:`probe_route`."""

    kind: RouteKind
    evidence: str

    @property
    def pooled(self) -> bool:
        return self.kind in ("session", "transaction", "statement")


class _ProbeConnection:
    """A bare driver connection that works through any pooler: no named prepared statements,
    every statement either self-contained or inside a transaction (so it stays on one server
    connection even in transaction mode)."""

    def __init__(self, driver: Driver, conn: Any) -> None:
        self._driver = driver
        self._conn = conn

    @classmethod
    async def open(
        cls, driver: Driver, dsn: str, application_name: str, connect_timeout: float
    ) -> _ProbeConnection:
        if driver == "asyncpg":
            import asyncpg

            conn: Any = await asyncpg.connect(
                dsn,
                timeout=connect_timeout,
                statement_cache_size=0,
                server_settings={"application_name": application_name},
            )
        else:
            import psycopg

            conn = await psycopg.AsyncConnection.connect(
                dsn,
                autocommit=True,
                prepare_threshold=None,
                application_name=application_name,
                connect_timeout=max(1, int(connect_timeout)),
            )
        return cls(driver, conn)

    @property
    def reported_pid(self) -> int:
        """The process id the startup handshake announced (a pooler's own, behind one)."""
        if self._driver == "asyncpg":
            return int(self._conn.get_server_pid())
        return int(self._conn.info.backend_pid)

    async def simple(self, statement: str) -> None:
        """One statement in the simple protocol: one message, one round trip."""
        if self._driver == "asyncpg":
            await self._conn.execute(statement)
        else:
            await self._conn.execute(statement, prepare=False)

    async def backend_pid(self) -> int:
        """``pg_backend_pid()`` of the server connection serving this statement."""
        if self._driver == "asyncpg":
            if self._conn.is_in_transaction():
                return int(await self._conn.fetchval("SELECT pg_backend_pid()"))
            async with self._conn.transaction():  # parse and execute on one server connection
                return int(await self._conn.fetchval("SELECT pg_backend_pid()"))
        cursor = await self._conn.execute("SELECT pg_backend_pid()")
        row = await cursor.fetchone()
        return int(row[0])

    async def aclose(self) -> None:
        with anyio.move_on_after(2, shield=True):
            await self._conn.close()


def probe_dsn(url: str) -> str:
    """``url`` as a libpq URL the bare drivers accept."""
    parts = urlsplit(libpq_url(url))
    query = [(k, v) for k, v in parse_qsl(parts.query) if k not in _ADAPTER_PARAMS]
    return urlunsplit(parts._replace(query=urlencode(query)))


async def probe_route(
    driver: Driver, url: str, *, application_name: str, connect_timeout: float
) -> Route:
    """Tell a direct connection from a session-mode, transaction-mode or statement-mode pooler.

    Two connections, A and B: A reads ``pg_backend_pid()`` (transaction ended), then B opens a
    transaction and reads it, then A reads it again while B's transaction holds its server.

    - B got A's server, or A moved to another one: server connections change hands between
      transactions — transaction mode (PgBouncer reuses the server released last, so this
      shows at once);
    - otherwise, when the pid of A's startup handshake is not its server's pid, something
      answered the handshake for the server but keeps A on one server connection — session
      mode;
    - ``BEGIN`` refused: statement mode. Otherwise direct.

    Connection errors propagate.
    """
    dsn = probe_dsn(url)
    a = await _ProbeConnection.open(driver, dsn, application_name, connect_timeout)
    try:
        a1 = await a.backend_pid()
        b = await _ProbeConnection.open(driver, dsn, application_name, connect_timeout)
        try:
            try:
                await b.simple("BEGIN")
            except Exception as exc:
                if "statement pooling" in str(exc) or "transaction blocks" in str(exc):
                    return Route("statement", f"BEGIN was refused: {_first_line(exc)}")
                raise
            b1 = await b.backend_pid()
            a2 = await a.backend_pid()
            with anyio.CancelScope(shield=True):
                await b.simple("ROLLBACK")
        finally:
            await b.aclose()
        reported = a.reported_pid
    finally:
        await a.aclose()
    if b1 == a1:
        return Route(
            "transaction",
            f"server process {a1} served one client, then another once the first one's "
            "transaction ended",
        )
    if a2 != a1:
        return Route(
            "transaction", f"one client was served by server processes {a1} and {a2} in turn"
        )
    if reported != a1:
        return Route(
            "session",
            f"the handshake announced process {reported}, but server process {a1} answers",
        )
    return Route("direct", f"server process {a1} answers, as announced by the handshake")


def _first_line(exc: BaseException) -> str:
    return mask_url((str(exc).splitlines() or [type(exc).__name__])[0])


# -- the write URL ----------------------------------------------------------------------------


async def _check_write_database(
    settings: Settings, router: Router | None, report: CheckReport
) -> None:
    url = settings.require_database_url()
    route = await _check_write_route(settings, url, report)
    pooled = settings.pooler != "none"
    engine = create_write_engine(settings)
    try:
        with anyio.fail_after(settings.connect_timeout + 5):
            async with engine.connect() as conn:
                row = (
                    await conn.execute(
                        text(
                            "SELECT current_setting('server_version'), "
                            "current_setting('max_connections')::int, "
                            "current_setting('superuser_reserved_connections')::int, "
                            "coalesce(current_setting('reserved_connections', true), '0')::int, "
                            "pg_is_in_recovery(), current_user, "
                            "current_setting('statement_timeout'), "
                            "current_setting('idle_in_transaction_session_timeout')"
                        )
                    )
                ).one()
                version, max_conn, su_reserved, reserved, in_recovery, user = row[:6]
                report.add(
                    "ok", "database", f"connected to PostgreSQL {version} at {mask_url(url)}"
                )
                if in_recovery:
                    report.add(
                        "fail",
                        "database",
                        "the write URL reaches a server in recovery (a standby): point "
                        "PGREACT_DATABASE_URL at the primary",
                    )
                available = int(max_conn) - int(su_reserved) - int(reserved)
                _check_budget(settings, available, report, pooled_writes=pooled)
                if pooled:
                    _check_pooled_timeouts(settings, str(user), str(row[6]), str(row[7]), report)
                if router is not None:
                    await _check_install(conn, settings, router, report)
    except PgreactError:
        raise
    except Exception as exc:
        first = _first_line(exc)
        hint = ""
        if "prepared statement" in first and not pooled:
            hint = (
                f": this is what a transaction-mode pooler does to prepared statements; "
                f"{_POOLER_FIX}"
            )
        elif "unsupported startup parameter" in first and not pooled:
            hint = (
                ": PgBouncer refuses startup parameters (pgreact sends its timeouts as such) in "
                f"every pool mode; {_POOLER_FIX} (right for session mode too)"
            )
        elif route is not None and route.kind == "statement":
            hint = ": pgreact needs transactions; use a session- or transaction-mode pool"
        report.add(
            "fail",
            "database",
            f"cannot use PGREACT_DATABASE_URL ({mask_url(url)}): {type(exc).__name__}: "
            f"{first}{hint}",
        )
    finally:
        await engine.dispose()


async def _check_write_route(settings: Settings, url: str, report: CheckReport) -> Route | None:
    """Does ``PGREACT_POOLER`` fit what the write URL goes through?"""
    port = urlsplit(libpq_url(url)).port
    try:
        with anyio.fail_after(settings.connect_timeout + 5):
            route = await probe_route(
                settings.write_driver,
                url,
                application_name=f"{settings.application_name}-check",
                connect_timeout=settings.connect_timeout,
            )
    except Exception as exc:
        # The database check below reports the connection error itself; only the port is left.
        if port == PGBOUNCER_PORT and settings.pooler == "none":
            report.add(
                "warn",
                "pooler",
                f"PGREACT_DATABASE_URL uses port {PGBOUNCER_PORT}, PgBouncer's usual port, while "
                f"PGREACT_POOLER=none (could not probe it: {_first_line(exc)}): behind a "
                f"transaction-mode PgBouncer {_POOLER_FIX}",
            )
        return None
    where = f"PGREACT_DATABASE_URL ({mask_url(url)})"
    if route.kind == "transaction":
        if settings.pooler == "none":
            report.add(
                "fail",
                "pooler",
                f"{where} goes through a transaction-mode pooler ({route.evidence}) while "
                f"PGREACT_POOLER=none: {_POOLER_FIX}, or prepared statements fail with "
                "'prepared statement \"__asyncpg_stmt_N__\" does not exist' (asyncpg) or "
                "'\"_pg3_N\" already exists' (psycopg)",
            )
        else:
            report.add(
                "ok",
                "pooler",
                f"{where} goes through a transaction-mode pooler; PGREACT_POOLER="
                f"{settings.pooler}: no server-side prepared statements",
            )
    elif route.kind == "statement":
        report.add(
            "fail",
            "pooler",
            f"{where} goes through a statement-mode pooler ({route.evidence}): pgreact runs "
            "each batch in one transaction; use a transaction- or session-mode pool",
        )
    elif settings.pooler != "none":
        report.add(
            "warn",
            "pooler",
            f"PGREACT_POOLER={settings.pooler}, but {where} "
            + (
                "reaches PostgreSQL directly"
                if route.kind == "direct"
                else "goes through a session-mode pooler"
            )
            + f" ({route.evidence}): prepared statements and the server-side timeouts are off "
            "for nothing; set PGREACT_POOLER=none",
        )
    elif route.kind == "session":
        report.add(
            "ok",
            "pooler",
            f"{where} goes through a session-mode pooler ({route.evidence}); PGREACT_POOLER=none "
            f"fits it (in transaction mode, {_POOLER_FIX})",
        )
    else:
        report.add("ok", "pooler", f"{where} reaches PostgreSQL directly")
    return route


def _check_pooled_timeouts(
    settings: Settings, user: str, statement: str, idle: str, report: CheckReport
) -> None:
    """Behind a transaction-mode pooler the timeouts cannot be startup options: the role has
    to carry them (or PgBouncer's ``query_timeout`` / ``idle_transaction_timeout``)."""
    limits = WriteTimeouts.of(settings)
    missing = []
    if statement in ("0", "0ms"):
        missing.append(
            f"ALTER ROLE \"{user}\" SET statement_timeout = '{limits.statement_ms // 1000}s';"
        )
    if idle in ("0", "0ms"):
        missing.append(
            f'ALTER ROLE "{user}" SET idle_in_transaction_session_timeout = '
            f"'{limits.idle_in_transaction_ms // 1000}s';"
        )
    if missing:
        report.add(
            "warn",
            "timeouts",
            "through the pooler, the write connections run without "
            + " and ".join(
                name
                for name, value in (
                    ("statement_timeout", statement),
                    ("idle_in_transaction_session_timeout", idle),
                )
                if value in ("0", "0ms")
            )
            + " (PgBouncer refuses them as startup options), so a hung handler can pin a "
            "server connection: " + " ".join(missing) + " (or set query_timeout and "
            "idle_transaction_timeout in pgbouncer.ini)",
        )
    else:
        report.add(
            "ok",
            "timeouts",
            f"statement_timeout {statement}, idle_in_transaction_session_timeout {idle} "
            "(from the role or the server)",
        )


def _check_budget(
    settings: Settings, available: int, report: CheckReport, *, pooled_writes: bool = False
) -> None:
    if pooled_writes:
        # The write pools connect to the pooler, which opens at most its own pool size of server
        # connections: only the listeners (direct) count against max_connections here.
        needed = settings.replicas
        clients = (settings.pool_size + settings.max_overflow) * settings.replicas
        detail = (
            f"1 listener x {settings.replicas} replica(s) = {needed} direct connection(s) of "
            f"{available} available; the write pools open up to {clients} client connections "
            "to the pooler (its max_client_conn must allow them; its default_pool_size bounds "
            "the server connections they share)"
        )
    else:
        per_process = settings.pool_size + settings.max_overflow + 1
        needed = per_process * settings.replicas
        detail = (
            f"(PGREACT_POOL_SIZE {settings.pool_size} + PGREACT_MAX_OVERFLOW "
            f"{settings.max_overflow} + 1 listener) x {settings.replicas} replica(s) = {needed} "
            f"of {available} connections available"
        )
    if needed > available:
        report.add(
            "fail",
            "connections",
            f"{detail}: lower the pool size or replicas, put PgBouncer in front of the write "
            "URL, or raise max_connections",
        )
    elif needed > BUDGET_WARN * available:
        report.add(
            "warn", "connections", f"{detail}: above {BUDGET_WARN:.0%}; little room for others"
        )
    else:
        report.add("ok", "connections", detail)


async def _check_install(
    conn: AsyncConnection, settings: Settings, router: Router, report: CheckReport
) -> None:
    schema = settings.schema_name
    version = await installer.schema_version(conn, schema)
    latest = installer.latest_version()
    if version < latest:
        report.add(
            "fail",
            "schema",
            f"schema {schema!r} is at version {version}, this pgreact needs {latest}: "
            "run `pgreact install`",
        )
        return
    report.add("ok", "schema", f"schema {schema!r} at version {version}")
    problems = await installer.capture_problems(conn, schema, router.durable)
    if problems:
        report.add("fail", "triggers", "; ".join(problems[name] for name in sorted(problems)))
    else:
        report.add("ok", "triggers", f"capture in place for {len(router.durable)} handler(s)")
    await _check_privileges(conn, schema, report)
    deaf = installer.truncate_deaf(router.durable)
    if deaf:
        report.add(
            "warn",
            "truncate",
            f"TRUNCATE is not delivered to {', '.join(deaf)} (their ops do not include it; a "
            "TRUNCATE of their table warns the truncating session): what they derived from "
            "a truncated table goes stale unless they subscribe with ops=(..., 'TRUNCATE')",
        )


async def _check_privileges(conn: AsyncConnection, schema: str, report: CheckReport) -> None:
    """Capture runs as the schema's owner, and nobody else need (or should) be able to write
    events or subscriptions: grants that writers needed before version 4 are flagged."""
    owner, superuser = (
        await conn.execute(
            text(
                "SELECT r.rolname, r.rolsuper FROM pg_namespace n "
                "JOIN pg_roles r ON r.oid = n.nspowner WHERE n.nspname = :schema"
            ),
            {"schema": schema},
        )
    ).one()
    forgers = [
        f"{r[0] or 'PUBLIC'} may {r[1]} {r[2]}"
        for r in await conn.execute(
            text(
                """
                SELECT DISTINCT g.rolname, a.privilege_type, c.relname
                FROM pg_class c
                JOIN pg_namespace n ON n.oid = c.relnamespace
                CROSS JOIN LATERAL aclexplode(c.relacl) a
                LEFT JOIN pg_roles g ON g.oid = a.grantee
                WHERE n.nspname = :schema AND a.grantee <> c.relowner
                  AND (c.relname = 'queue' AND a.privilege_type = 'INSERT'
                       OR c.relname = 'subscriptions'
                          AND a.privilege_type IN ('INSERT', 'UPDATE', 'DELETE'))
                ORDER BY 1, 3, 2
                """
            ),
            {"schema": schema},
        )
    ]
    if forgers:
        report.add(
            "warn",
            "privileges",
            f"{'; '.join(forgers)} in schema {schema!r}: such a role can forge events or "
            "subscriptions. Capture needs no grant since schema version 4 (it runs as the "
            "schema's owner): revoke them (see `pgreact install --print-grants ROLE` for what "
            "the daemon's role needs)",
        )
    if superuser:
        report.add(
            "warn",
            "privileges",
            f"schema {schema!r} is owned by superuser {owner!r}, and capture runs as its owner: "
            "run `pgreact install` as a dedicated owner role (CREATE on the database, TRIGGER "
            "on the watched tables) instead",
        )
    elif not forgers:
        report.add("ok", "privileges", f"capture runs as {owner!r}; no other role can write events")


async def _check_listener(settings: Settings, report: CheckReport) -> None:
    """LISTEN on the listen URL and prove delivery with a NOTIFY from a second session."""
    url = settings.effective_listen_url
    where = f"PGREACT_LISTEN_URL ({mask_url(url)})"
    if settings.listen_url is None:
        where = (
            "the listen URL (PGREACT_LISTEN_URL is unset, so PGREACT_DATABASE_URL, "
            f"{mask_url(url)})"
        )
    app = f"{settings.application_name}-check"
    try:
        with anyio.fail_after(settings.connect_timeout + 5):
            route = await probe_route(
                settings.listener_driver,
                url,
                application_name=app,
                connect_timeout=settings.connect_timeout,
            )
    except Exception as exc:
        report.add("fail", "listener", f"cannot connect to {where}: {_first_line(exc)}")
        return
    if route.kind in ("transaction", "statement"):
        report.add(
            "fail",
            "listener",
            f"{where} goes through a {route.kind}-mode pooler ({route.evidence}): LISTEN "
            f"through it receives nothing; {_LISTEN_FIX}",
        )
        return
    await _round_trip(settings, url, where, route, report)


async def _round_trip(
    settings: Settings, url: str, where: str, route: Route, report: CheckReport
) -> None:
    received = anyio.Event()
    channel = f"pgreact_check_{secrets.token_hex(6)}"

    def on_notification(note: Notification) -> None:
        if note.channel == channel:
            received.set()

    backend = backend_for(settings.listener_driver)
    app = f"{settings.application_name}-check"
    try:
        conn = await backend.connect(
            settings.listen_dsn,
            application_name=app,
            on_notification=on_notification,
            connect_timeout=settings.connect_timeout,
        )
    except Exception as exc:
        report.add(
            "fail", "listener", f"cannot connect to {where} ({backend.name}): {_first_line(exc)}"
        )
        return
    try:
        await conn.listen([channel])
        sender = await _ProbeConnection.open(
            settings.listener_driver, probe_dsn(url), app, settings.connect_timeout
        )
        try:
            await sender.simple(f"NOTIFY {channel}, 'check'")  # a hex token: no quoting needed
        finally:
            await sender.aclose()
        with anyio.move_on_after(SELF_TEST_TIMEOUT):
            await received.wait()
        via = "" if route.kind == "direct" else " (a session-mode pooler)"
        if received.is_set():
            report.add("ok", "listener", f"LISTEN/NOTIFY round trip through {where}{via}")
        else:
            report.add(
                "fail",
                "listener",
                f"a NOTIFY sent to {where}{via} did not come back within "
                f"{SELF_TEST_TIMEOUT:g} s: it probably goes through a transaction-mode pooler; "
                f"{_LISTEN_FIX}",
            )
    except Exception as exc:
        report.add("fail", "listener", f"LISTEN failed on {where}: {_first_line(exc)}")
    finally:
        await conn.aclose()
