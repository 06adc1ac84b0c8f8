"""The pooled write engine, and how pgreact tells a transient database error from a real one."""

from __future__ import annotations

import sqlalchemy.exc
from sqlalchemy import event
from sqlalchemy.engine import ExceptionContext
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from service.settings import Settings

# SQLSTATE classes and codes that say "try again", not "this event is bad":
# 08 connection exception, 53 insufficient resources (disk full, out of memory, too many
# connections), 57P01-57P03 admin/crash shutdown and "cannot connect now", 40001 serialization
# failure, 40P01 deadlock, 55006 object in use (e.g. a concurrent DROP DATABASE).
TRANSIENT_CLASSES = ("08", "53")
TRANSIENT_CODES = frozenset({"40001", "40P01", "57P01", "57P02", "57P03", "55006"})


# Client-side driver states after a connection broke mid-operation (asyncpg reports a query on a
# connection whose previous operation was cut off as "another operation is in progress").
CLIENT_CONNECTION_ERRORS = frozenset(
    {"InternalClientError", "InterfaceError", "ConnectionDoesNotExistError", "ConnectionResetError"}
)


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


def is_transient(exc: BaseException) -> bool:
    """True when retrying later is the right answer and the attempt should not count."""
    if isinstance(exc, TimeoutError):  # a handler timeout (an OSError subclass!) counts
        return False
    if isinstance(exc, sqlalchemy.exc.DBAPIError) and exc.connection_invalidated:
        return True
    if isinstance(exc, sqlalchemy.exc.TimeoutError):  # waiting for a pooled connection
        return True
    if any(type(e).__name__ in CLIENT_CONNECTION_ERRORS for e in _chain(exc)):
        return True
    code = sqlstate_of(exc)
    if code is not None:
        return code[:2] in TRANSIENT_CLASSES or code in TRANSIENT_CODES
    if isinstance(exc, sqlalchemy.exc.InterfaceError | sqlalchemy.exc.OperationalError):
        return True
    return isinstance(exc, ConnectionError | OSError)


def connection_is_suspect(exc: BaseException) -> bool:
    """After these, the connection's state is unknown: throw it away rather than reuse it."""
    if isinstance(exc, TimeoutError):  # a cancelled query may still be running server-side
        return True
    if isinstance(exc, sqlalchemy.exc.DBAPIError) and sqlstate_of(exc) is None:
        return True  # the driver itself is unhappy, not the server: don't reuse it
    return is_transient(exc)


def create_write_engine(settings: Settings, *, application_name: str | None = None) -> AsyncEngine:
    """The pooled SQLAlchemy engine handlers write through.

    Server-side timeouts back up the client-side handler timeout: a statement cannot outlive it
    and a transaction cannot sit idle much longer, so a hung handler never pins a connection.
    Behind a transaction-mode pooler, startup options are not allowed, so they are left out.
    """
    app = application_name or settings.application_name
    statement_ms = int((settings.handler_timeout + 1) * 1000)
    idle_ms = int((settings.handler_timeout + 5) * 1000)
    url = settings.require_database_url()
    connect_args: dict[str, object]
    if settings.write_driver == "asyncpg":
        server_settings = {"application_name": app}
        if settings.pooler == "none":
            server_settings |= {
                "statement_timeout": str(statement_ms),
                "idle_in_transaction_session_timeout": str(idle_ms),
            }
        connect_args = {"server_settings": server_settings, "timeout": settings.connect_timeout}
        if settings.pooler != "none":
            connect_args["statement_cache_size"] = 0
            connect_args["prepared_statement_cache_size"] = 0
    else:
        connect_args = {
            "application_name": app,
            "connect_timeout": max(1, int(settings.connect_timeout)),
        }
        if settings.pooler == "none":
            connect_args["options"] = (
                f"-c statement_timeout={statement_ms} "
                f"-c idle_in_transaction_session_timeout={idle_ms}"
            )
        else:
            connect_args["prepare_threshold"] = None
    engine = create_async_engine(
        url,
        pool_size=settings.pool_size,
        max_overflow=settings.max_overflow,
        pool_timeout=settings.pool_timeout,
        pool_recycle=settings.pool_recycle,
        pool_pre_ping=settings.pool_pre_ping,
        connect_args=connect_args,
    )
    event.listen(engine.sync_engine, "handle_error", _recognise_disconnects)
    return engine


def _recognise_disconnects(context: ExceptionContext) -> None:
    """Tell SQLAlchemy that a connection cut off mid-operation is gone. It then invalidates it
    and every pooled connection opened before it (a server restart or a mass termination kills
    them all), instead of handing out one broken connection after another."""
    original = context.original_exception
    if original is not None and any(
        type(e).__name__ in CLIENT_CONNECTION_ERRORS for e in _chain(original)
    ):
        context.is_disconnect = True
