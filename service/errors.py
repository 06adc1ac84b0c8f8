"""pgreact's error hierarchy.

Every error pgreact raises on purpose derives from :class:`PgreactError` and carries a message a
user can act on. Driver errors are translated at the boundary with ``raise ... from exc``::

    PgreactError
    ├── ConfigError            bad or missing setting: names the setting and the fix (exit 2)
    ├── HandlerLoadError       a handler module fails to import or defines no ``router`` (exit 2)
    ├── RouterError            invalid handler registration (duplicate name, bad table, bad ops)
    ├── SchemaError            pgreact's schema is missing, too old, or a table cannot be captured
    ├── HandlerMisuse          a handler did what only pgreact may (commit, roll back, close)
    ├── DatabaseUnavailable    the database cannot be reached now (transient; retried)
    ├── HttpBindError          the metrics/probe port cannot be opened (in use, bad host) (exit 1)
    └── LeaseLost              an event's claim was taken over; the transaction is rolled back
"""

from __future__ import annotations

from collections.abc import Iterator


class PgreactError(Exception):
    """Base of every error pgreact raises on purpose."""

    exit_code = 1


class ConfigError(PgreactError):
    """A setting is missing or invalid; the message names it and says how to fix it."""

    exit_code = 2


class HandlerLoadError(PgreactError):
    """A module named in ``PGREACT_HANDLERS`` cannot be loaded."""

    exit_code = 2


class RouterError(PgreactError):
    """A handler registration is invalid."""

    exit_code = 2


class SchemaError(PgreactError):
    """pgreact's schema or a captured table is not in the state the daemon needs."""


class HandlerMisuse(PgreactError):
    """A handler committed, rolled back or closed pgreact's session or transaction; the event
    fails."""


class DatabaseUnavailable(PgreactError):
    """The database did not answer; the operation may succeed later."""


class HttpBindError(PgreactError):
    """The metrics and probe endpoints cannot listen on PGREACT_HTTP_HOST:PGREACT_HTTP_PORT."""


class LeaseLost(PgreactError):
    """Another process took over an event this process had claimed (its claim expired or its
    presence lock was lost). The handler's transaction is rolled back, so nothing is done twice."""


def leaf_errors(exc: BaseException) -> Iterator[BaseException]:
    """The exceptions a task group wrapped, however deeply (``exc`` itself if it is no group)."""
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            yield from leaf_errors(inner)
    else:
        yield exc
