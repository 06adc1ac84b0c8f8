"""The pooled write engine, and how pgreact tells a transient database error from a real one."""

from __future__ import annotations

import contextlib
import math
import re
import socket
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psycopg
import sqlalchemy.exc
from sqlalchemy import event, text
from sqlalchemy.engine import Connection, ExceptionContext, make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from pgreact.settings import Settings

# SQLSTATE classes and codes that say "try again", not "this event is bad":
# 08 connection exception, 53 insufficient resources (disk full, out of memory, too many
# connections), 57P01-57P03 admin/crash shutdown and "cannot connect now", 40001 serialization
# failure, 40P01 deadlock, 55006 object in use (e.g. a concurrent DROP DATABASE).
TRANSIENT_CLASSES = ("08", "53")
TRANSIENT_CODES = frozenset({"40001", "40P01", "57P01", "57P02", "57P03", "55006"})


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and all(current is not s for s in seen):
        seen.append(current)
        orig = getattr(current, "orig", None)
        current = orig if isinstance(orig, BaseException) else current.__cause__
    return seen


def sqlstate_of(exc: BaseException) -> str | None:
    """The SQLSTATE carried by ``exc`` or anything it wraps (SQLAlchemy, asyncpg, psycopg)."""
    for current in _chain(exc):
        for attr in ("sqlstate", "pgcode"):
            code = getattr(current, attr, None)
            if isinstance(code, str) and len(code) == 5:
                return code
    return None


def transient_sqlstate(code: str | None) -> bool:
    """Whether the server's SQLSTATE says "try again" (see :data:`TRANSIENT_CODES`)."""
    return code is not None and (code[:2] in TRANSIENT_CLASSES or code in TRANSIENT_CODES)


def is_transient(exc: BaseException) -> bool:
    """True when retrying later is the right answer and the attempt should not count.

    A lost connection is known by its state, not by the error's class: SQLAlchemy marks the
    error ``connection_invalidated`` when the driver's connection was closed by then (the
    dialects' own check, and ``_recognise_disconnects``). A driver error without SQLSTATE on a
    connection still open is the client refusing a statement (asyncpg raises ``InterfaceError``
    for more than 32767 bind parameters, psycopg ``OperationalError`` beyond 65535): the same
    statement fails the same way every time, so it is not transient.
    """
    if isinstance(exc, TimeoutError):  # a handler timeout (an OSError subclass!) counts
        return False
    if isinstance(exc, sqlalchemy.exc.DBAPIError) and exc.connection_invalidated:
        return True
    if isinstance(exc, sqlalchemy.exc.TimeoutError):  # waiting for a pooled connection
        return True
    code = sqlstate_of(exc)
    if code is not None:
        return transient_sqlstate(code)
    if isinstance(exc, sqlalchemy.exc.DBAPIError):
        # No statement: connecting failed (the server is down, restarting, unreachable).
        return exc.statement is None
    return isinstance(exc, ConnectionError | OSError)


def handler_failure_is_transient(exc: BaseException, info: dict[Any, Any], *, alive: bool) -> bool:
    """Whether a failed handler call is database trouble rather than the event's fault.

    Everything a handler raises is an attempt, with two exceptions: the connection of its session
    died under it (``alive`` False: whatever the handler made of that), or a statement it sent
    through its session failed with a transient error (a serialization failure, a deadlock). The
    second is known by identity: the error SQLAlchemy saw on this connection (``info``, see
    ``_recognise_disconnects``) is the one raised, or what it was raised from; and, the
    connection being alive, by the server's SQLSTATE alone. A driver error without one (a
    statement the driver refuses to send) fails the same way on every retry. An ``OSError`` of
    the handler's own (an HTTP client refused, another database down) is not ours to retry.
    """
    if isinstance(exc, TimeoutError):  # the handler ran out of time: its own doing
        return False
    if not alive:
        return True
    ref = info.get(_LAST_ERROR)
    seen = ref() if ref is not None else None
    if seen is None or all(e is not seen for e in _chain(exc)):
        return False
    return transient_sqlstate(sqlstate_of(seen))


def connection_is_suspect(exc: BaseException) -> bool:
    """After these, the connection's state is unknown: throw it away rather than reuse it."""
    if isinstance(exc, TimeoutError):  # a cancelled query may still be running server-side
        return True
    if isinstance(exc, sqlalchemy.exc.DBAPIError) and sqlstate_of(exc) is None:
        return True  # the driver itself is unhappy, not the server: don't reuse it
    return is_transient(exc)


def driver_disconnect(exc: BaseException, *, alive: bool) -> bool:
    """A raw driver error (not wrapped by SQLAlchemy) that says the connection, and likely the
    server's other connections too, is gone: class 08, an admin/crash shutdown, or an error
    without SQLSTATE that left the driver's connection closed (``alive``: whether it is open)
    or came from the socket. One the driver raised on an open connection (a statement it
    refuses to send) says nothing about the server."""
    code = sqlstate_of(exc)
    if code is not None:
        return code.startswith("08") or code in {"57P01", "57P02", "57P03"}
    return not alive or isinstance(exc, OSError)


async def discard_after_driver_error(conn: AsyncConnection, exc: Exception) -> bool:
    """A statement ran on the driver beneath SQLAlchemy (see ``store.DriverStatement``), so
    SQLAlchemy did not see its error. Never hand the connection back; and if the server went
    away, let SQLAlchemy see that too, so that it retires the pool's other connections (as dead
    as this one) instead of handing them out one failed statement at a time. Returns whether
    the error was a disconnect (:func:`driver_disconnect`)."""
    lost = driver_disconnect(exc, alive=await connection_alive(conn))
    with contextlib.suppress(Exception):
        if lost:
            await conn.execute(text("SELECT 1"))
    with contextlib.suppress(Exception):
        await conn.invalidate()
    return lost


# TCP keepalives on every write connection: a cloud load balancer or NAT between the pod and
# the database (or PgBouncer) silently forgets idle flows (AWS NLB after 350 s, Azure after 4
# min by default). Probing after 60 s of silence keeps the flow alive, and a peer that vanished
# is noticed after 60 + 5 x 10 s instead of the kernel's default two hours.
KEEPALIVE_IDLE = 60
KEEPALIVE_INTERVAL = 10
KEEPALIVE_COUNT = 5


def keepalive_idle(settings: Settings) -> int:
    """Seconds of silence before the first keepalive probe; 0 turns keepalives off."""
    value = settings.tcp_keepalives_idle
    return value if isinstance(value, int) and value >= 0 else KEEPALIVE_IDLE


@dataclass(frozen=True, slots=True)
class WriteTimeouts:
    """The time limits of the write engine, all derived from the handler timeout.

    ``statement`` and ``idle_in_transaction`` are server-side (milliseconds) and back up the
    client-side handler timeout: a statement cannot outlive it and a transaction cannot sit idle
    much longer, so a hung handler never pins a connection. ``command`` (asyncpg only, seconds)
    is the same limit on the client: it also ends a query whose server went silent (a half-open
    connection), where no server-side timeout can fire. It is a little longer than the
    server's, so the server's clearer error normally wins.
    """

    statement_ms: int
    idle_in_transaction_ms: int
    command: float
    connect: float

    @classmethod
    def of(cls, settings: Settings) -> WriteTimeouts:
        override = settings.command_timeout
        command = (
            float(override)
            if isinstance(override, int | float) and override > 0
            else settings.handler_timeout + 2
        )
        return cls(
            statement_ms=int((settings.handler_timeout + 1) * 1000),
            idle_in_transaction_ms=int((settings.handler_timeout + 5) * 1000),
            command=command,
            connect=settings.connect_timeout,
        )


# Prepared statements (asyncpg caches every statement it runs; psycopg prepares those it runs
# five times) are planned afresh on every execution. After five runs the server may otherwise
# cache a *generic* plan, costed against the table as it was then: the claim, prepared while the
# queue was empty, kept a sequential scan with a nested sequential NOT EXISTS after a bulk load,
# quadratic in the backlog (14.7 s per claim at 10k rows). Planning the claim costs well under a
# millisecond. Without server-side prepared statements (``PGREACT_POOLER``), every statement is
# unnamed and planned with its parameters anyway.
PLAN_CACHE_MODE = "force_custom_plan"


def write_connect_args(
    settings: Settings, *, application_name: str | None = None
) -> dict[str, Any]:
    """The DBAPI arguments of the write engine, per driver and pooler mode.

    Parameters given in the URL's query string win (``?command_timeout=60``,
    ``?keepalives_idle=30``): the URL is passed through verbatim and only what it leaves unset is
    filled in here.

    ``PGREACT_POOLER=pgbouncer-transaction`` (PgBouncer in transaction mode hands each
    *transaction* to any of its server connections, so nothing may outlive one):

    - no server-side prepared statements. asyncpg: ``statement_cache_size=0`` makes asyncpg
      prepare every statement *unnamed* (it is parsed and run inside the same transaction, so on
      the same server connection), and SQLAlchemy's own cache of prepared statement objects,
      ``prepared_statement_cache_size`` (a DBAPI argument of its asyncpg adapter, read from
      ``connect_args`` or the URL), is off too. With both at 0 no name is ever generated, so a
      ``prepared_statement_name_func`` is not needed. psycopg: ``prepare_threshold=None``.
    - no startup parameters besides ``application_name``: PgBouncer refuses ``options`` and
      unknown parameters such as ``statement_timeout``. Server-side timeouts then come from the
      role (``ALTER ROLE … SET statement_timeout``; ``pgreact check`` says when they are missing)
      or PgBouncer's ``query_timeout``/``idle_transaction_timeout``; see docs/pgbouncer.md.
    """
    app = application_name or settings.application_name
    pooled = settings.pooler != "none"
    limits = WriteTimeouts.of(settings)
    url = make_url(settings.require_database_url())
    given = set(url.query)
    args: dict[str, Any]
    if settings.write_driver == "asyncpg":
        server_settings = {"application_name": app}
        if not pooled:
            server_settings |= {
                "statement_timeout": str(limits.statement_ms),
                "idle_in_transaction_session_timeout": str(limits.idle_in_transaction_ms),
                # Through ``options``, like psycopg: a pooler configured to ignore ``options``
                # and the timeouts (a common PgBouncer set-up) then also ignores this one.
                "options": f"-c plan_cache_mode={PLAN_CACHE_MODE}",
            }
        args = {
            "server_settings": server_settings,
            "timeout": limits.connect,
            "command_timeout": limits.command,
        }
        if pooled:
            args |= {"statement_cache_size": 0, "prepared_statement_cache_size": 0}
    else:
        idle = keepalive_idle(settings)
        args = {
            "application_name": app,
            "connect_timeout": max(1, math.ceil(limits.connect)),
            "keepalives": 1 if idle else 0,
        }
        if idle:
            args |= {
                "keepalives_idle": idle,
                "keepalives_interval": KEEPALIVE_INTERVAL,
                "keepalives_count": KEEPALIVE_COUNT,
            }
        if pooled:
            args["prepare_threshold"] = None
        else:
            args["options"] = (
                f"-c statement_timeout={limits.statement_ms} "
                f"-c idle_in_transaction_session_timeout={limits.idle_in_transaction_ms} "
                f"-c plan_cache_mode={PLAN_CACHE_MODE}"
            )
    return {k: v for k, v in args.items() if k not in given}


def create_write_engine(settings: Settings, *, application_name: str | None = None) -> AsyncEngine:
    """The pooled SQLAlchemy engine handlers write through (see :func:`write_connect_args`)."""
    engine = create_async_engine(
        settings.require_database_url(),
        pool_size=settings.pool_size,
        max_overflow=settings.max_overflow,
        pool_timeout=settings.pool_timeout,
        pool_recycle=settings.pool_recycle,
        pool_pre_ping=False,  # see _ping_when_idle
        connect_args=write_connect_args(settings, application_name=application_name),
    )
    event.listen(engine.sync_engine, "handle_error", _recognise_disconnects)
    if settings.pool_pre_ping:
        _ping_when_idle(engine)
    idle = keepalive_idle(settings)
    if settings.write_driver == "asyncpg" and idle:
        # asyncpg has no keepalive parameters (libpq's are psycopg's): set them on the socket.
        def keepalives(dbapi_connection: Any, _record: object) -> None:
            _asyncpg_keepalives(dbapi_connection, idle)

        event.listen(engine.sync_engine, "connect", keepalives)
    return engine


# Statements sent on a connection, counted in its ``info``: a failing handler call that sent none
# left its transaction as it found it, so the calls before it need not run again (see the
# executor). Counted where SQLAlchemy sends them, and by ``copy_rows`` for its COPY.
_STATEMENTS_SENT = "pgreact_statements_sent"


def count_statements(engine: AsyncEngine) -> None:
    """Count the statements sent on each of ``engine``'s connections, and note a transaction
    ended through SQLAlchemy (see :func:`transaction_ended`) (idempotent)."""
    sync = engine.sync_engine
    if not event.contains(sync, "before_cursor_execute", _count_statement):
        event.listen(sync, "before_cursor_execute", _count_statement)
        event.listen(sync, "commit", _note_commit)
        event.listen(sync, "rollback", _note_rollback)


# A statement that ends the transaction it runs in: COMMIT, END, COMMIT AND CHAIN, ROLLBACK,
# ABORT, PREPARE TRANSACTION; not ROLLBACK TO (a savepoint) nor COMMIT/ROLLBACK PREPARED (they
# cannot run inside a transaction block). Only its start is looked at: a statement sent through
# SQLAlchemy is a single command.
_ENDS_TRANSACTION = re.compile(
    r"\s*(?:(COMMIT|END)|(ROLLBACK|ABORT)|PREPARE\s+TRANSACTION)\b"
    r"(?!\s+(?:(?:WORK|TRANSACTION)\s+)?(?:TO|PREPARED)\b)",
    re.IGNORECASE,
)
_TRANSACTION_END = "pgreact_transaction_end"


def _count_statement(
    conn: Connection,
    _cursor: object,
    statement: str,
    _parameters: object,
    _context: object,
    _executemany: bool,
) -> None:
    info = conn.info
    _bump(info, _STATEMENTS_SENT)
    ended = _ENDS_TRANSACTION.match(statement)
    if ended is not None:
        how = "COMMIT" if ended.group(1) else "ROLLBACK" if ended.group(2) else "?"
        info[_TRANSACTION_END] = how


def _note_commit(conn: Connection) -> None:
    conn.info[_TRANSACTION_END] = "COMMIT"


def _note_rollback(conn: Connection) -> None:
    conn.info[_TRANSACTION_END] = "ROLLBACK"


def forget_transaction_end(info: dict[Any, Any]) -> None:
    """A new transaction begins on the connection of ``info``: what ended the last is history."""
    info.pop(_TRANSACTION_END, None)


def transaction_ended(info: dict[Any, Any]) -> str | None:
    """How a statement sent through SQLAlchemy, or SQLAlchemy itself, ended the transaction on
    the connection of ``info`` since :func:`forget_transaction_end`: ``"COMMIT"`` (its writes
    are on the server for good), ``"ROLLBACK"``, ``"?"`` (PREPARE TRANSACTION), or None."""
    return info.get(_TRANSACTION_END)


def note_statement_sent(conn: AsyncConnection) -> None:
    """Count a statement sent on the driver's own connection, beneath SQLAlchemy."""
    _bump(conn.info, _STATEMENTS_SENT)


def _bump(info: dict[Any, Any], counter: str) -> None:
    info[counter] = info.get(counter, 0) + 1


def statements_sent(info: dict[Any, Any]) -> int | None:
    """How many statements were sent on the connection whose ``info`` this is; None before the
    first one counted (or if its engine does not count), when nothing can be concluded."""
    return info.get(_STATEMENTS_SENT)


# How often a handler was handed its session's connection: with it, it may write beneath
# SQLAlchemy, uncounted.
_CONNECTION_TAKEN = "pgreact_connection_taken"


def note_connection_taken(conn: AsyncConnection) -> None:
    _bump(conn.info, _CONNECTION_TAKEN)


def activity(info: dict[Any, Any]) -> tuple[int | None, int]:
    """(statements sent, times the connection was taken) on the connection of ``info``: a call
    that leaves both as they were, with the first known, wrote nothing."""
    return info.get(_STATEMENTS_SENT), info.get(_CONNECTION_TAKEN, 0)


async def connection_alive(conn: AsyncConnection) -> bool:
    """Whether the driver's connection beneath ``conn`` is still open (no round trip)."""
    try:
        if conn.closed or conn.invalidated:
            return False
        raw = await conn.get_raw_connection()
        return not _driver_closed(conn.dialect.driver, raw.driver_connection)
    except Exception:
        return False


def _driver_closed(driver_name: str, driver: Any) -> bool:
    """What the driver itself knows: asyncpg's ``is_closed()``, psycopg's ``closed`` or
    ``broken`` (set once libpq saw the socket fail)."""
    if driver_name == "asyncpg":
        return bool(driver.is_closed())
    return bool(driver.closed or driver.broken)


def _in_transaction_check(driver_name: str, driver: Any) -> Callable[[], bool]:
    """What the driver itself knows of its transaction block: asyncpg's
    ``is_in_transaction()``, libpq's transaction status."""
    if driver_name == "asyncpg":
        return lambda: bool(driver.is_in_transaction())
    idle = psycopg.pq.TransactionStatus.IDLE
    pgconn = driver.pgconn  # not ``driver.info``: that builds an object per call
    return lambda: bool(pgconn.transaction_status != idle)


def transaction_probe(conn: AsyncConnection) -> Callable[[], bool]:
    """A synchronous check of whether the driver's connection beneath ``conn`` is still inside a
    transaction block: asked after every handler call that took the connection."""
    sync = conn.sync_connection
    driver: Any = None if sync is None else sync.connection.driver_connection
    if driver is None:
        return lambda: True
    return _in_transaction_check(conn.dialect.driver, driver)


async def driver_in_transaction(conn: AsyncConnection) -> bool:
    """Whether the driver's connection beneath ``conn`` is inside a transaction block."""
    raw = await conn.get_raw_connection()
    return _in_transaction_check(conn.dialect.driver, raw.driver_connection)()


# A pooled connection that was in use this recently is known to work. SQLAlchemy's own pre-ping
# pings at every checkout: a round trip per batch (three on asyncpg: BEGIN, ping, ROLLBACK) on a
# connection that had just committed. A dead connection that slips through is recognised on first
# use (``_recognise_disconnects``) and its batch retried without spending an attempt.
PING_AFTER_IDLE = 1.0
_LAST_CHECKIN = "pgreact_last_checkin"


def _ping_when_idle(engine: AsyncEngine) -> None:
    """``PGREACT_POOL_PRE_PING``: ping a pooled connection at checkout when it has been idle for
    more than :data:`PING_AFTER_IDLE` seconds; a failed ping makes the pool replace it."""
    dialect = engine.sync_engine.dialect

    def checkin(_dbapi_connection: Any, record: Any) -> None:
        if record is not None:
            record.info[_LAST_CHECKIN] = time.monotonic()

    def checkout(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        last = record.info.get(_LAST_CHECKIN)
        if last is None or time.monotonic() - last < PING_AFTER_IDLE:
            return  # new (just connected) or in use a moment ago
        try:
            dialect.do_ping(dbapi_connection)
        except Exception as exc:
            message = f"pooled connection failed its ping: {exc}"
            raise sqlalchemy.exc.DisconnectionError(message) from exc

    event.listen(engine.sync_engine, "checkin", checkin)
    event.listen(engine.sync_engine, "checkout", checkout)


def _asyncpg_keepalives(dbapi_connection: Any, idle: int) -> None:
    transport = getattr(getattr(dbapi_connection, "driver_connection", None), "_transport", None)
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return  # a Unix socket (or an asyncpg without ``_transport``): nothing to keep alive
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in (
        ("TCP_KEEPIDLE", idle),
        ("TCP_KEEPINTVL", KEEPALIVE_INTERVAL),
        ("TCP_KEEPCNT", KEEPALIVE_COUNT),
    ):
        option = getattr(socket, name, None)
        if option is not None:  # Linux and most BSDs; macOS lacks TCP_KEEPIDLE
            sock.setsockopt(socket.IPPROTO_TCP, option, value)


def _recognise_disconnects(context: ExceptionContext) -> None:
    """Tell SQLAlchemy that a connection cut off mid-operation is gone. It then invalidates it
    and every pooled connection opened before it (a server restart or a mass termination kills
    them all), instead of handing out one broken connection after another.

    The dialects ask the driver only about its own error classes; this asks for any error (a
    raw ``OSError`` too). Judged by the driver's state, never by the error's class: asyncpg
    raises ``InterfaceError`` for a statement it refuses to send (too many bind parameters) on
    a healthy connection, and taking that for a disconnect refunded a poison event's attempt
    forever, invalidating the pool at each retry."""
    if not context.is_disconnect and _lost(context.connection):
        context.is_disconnect = True
    # Which error a statement of this connection raised: a handler's failure is database trouble
    # only if it is (or was raised from) this one (see ``handler_failure_is_transient``).
    # A weak reference: the error's traceback holds the handler's frames.
    seen = context.sqlalchemy_exception
    if context.connection is not None and seen is not None:
        with contextlib.suppress(Exception):  # an invalidated connection may refuse
            context.connection.info[_LAST_ERROR] = weakref.ref(seen)


def _lost(connection: Connection | None) -> bool:
    """Whether the driver's connection beneath ``connection`` is closed (False when there is
    none, or SQLAlchemy already let go of it)."""
    if connection is None or connection.closed or connection.invalidated:
        return False
    try:
        driver = connection.connection.driver_connection
        return driver is not None and _driver_closed(connection.dialect.driver, driver)
    except Exception:
        return False


_LAST_ERROR = "pgreact_last_error"
