"""The handler API: ``Router`` collects handler registrations from user modules.

A router only records *what* should run; the dispatcher decides *when*. Registrations are
validated eagerly so a typo fails at start-up with a clear message, not at the first event.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from sqlalchemy.ext.asyncio import AsyncSession

from pgreact.errors import HandlerLoadError, RouterError
from pgreact.events import ALL_OPS, OPS, Event, Notification, Op

EventHandler = Callable[[Event, AsyncSession], Awaitable[None]]
BatchHandler = Callable[[Sequence[Event], AsyncSession], Awaitable[None]]
NotifyHandlerFunc = Callable[[Notification], Awaitable[None]]
F = TypeVar("F", bound=Callable[..., Awaitable[None]])

DEFAULT_BATCH_MAX_SIZE = 100
_NAME_RE = re.compile(r"[A-Za-z0-9_.:\-]{1,200}")


@dataclass(frozen=True, slots=True)
class TableName:
    """A schema-qualified table name, stored unquoted as PostgreSQL's catalogs spell it."""

    schema: str
    name: str

    @classmethod
    def parse(cls, text: str) -> TableName:
        """Parse ``orders``, ``public.orders`` or ``"My Schema"."Odd.Name"``.

        Unquoted parts fold to lower case, as PostgreSQL folds them.
        """
        parts = _split_identifier(text)
        if len(parts) == 1:
            return cls("public", parts[0])
        if len(parts) == 2:
            return cls(parts[0], parts[1])
        raise RouterError(
            f"table {text!r} is not a valid table name: use 'table' or 'schema.table' "
            '(quote parts with double quotes, e.g. \'"My Schema"."Orders"\')'
        )

    @property
    def qualified(self) -> str:
        """The form events carry in ``Event.table``: ``schema.table``."""
        return f"{self.schema}.{self.name}"

    def __str__(self) -> str:
        return self.qualified


_IDENT = r'(?:"(?:[^"]|"")+"|[^".\s]+)'
_TABLE_RE = re.compile(rf"^\s*({_IDENT})(?:\.({_IDENT}))?\s*$")


def _split_identifier(text: str) -> list[str]:
    match = _TABLE_RE.match(text)
    if match is None:
        raise RouterError(f"table {text!r} is not a valid table name")
    return [_unquote(part) for part in match.groups() if part is not None]


def _unquote(part: str) -> str:
    if part.startswith('"'):
        return part[1:-1].replace('""', '"')
    return part.lower()


@dataclass(frozen=True, slots=True)
class DurableHandler:
    """A handler fed from the event table: exactly-once effects through ``session``."""

    name: str
    table: TableName
    ops: frozenset[Op]
    func: Callable[..., Awaitable[None]]
    batch: bool
    max_size: int
    ordered: bool
    key: tuple[str, ...] | None  # ``None``: order by the table's primary key


@dataclass(frozen=True, slots=True)
class NotifyHandler:
    """A handler for a raw NOTIFY channel: at-most-once, no table, no transaction."""

    name: str
    channel: str
    func: NotifyHandlerFunc


@dataclass
class Router:
    """Collects handlers. Each handler module defines ``router = Router()``."""

    durable: list[DurableHandler] = field(default_factory=list)
    notify: list[NotifyHandler] = field(default_factory=list)

    def on(
        self,
        table: str,
        *,
        ops: Iterable[Op] = OPS,
        name: str | None = None,
        ordered: bool = True,
        key: str | Sequence[str] | None = None,
    ) -> Callable[[F], F]:
        """Register ``async def f(event, session)``: one event per call."""
        return self._durable(table, ops, name, ordered, key, batch=False, max_size=1)

    def on_batch(
        self,
        table: str,
        *,
        max_size: int = DEFAULT_BATCH_MAX_SIZE,
        ops: Iterable[Op] = OPS,
        name: str | None = None,
        ordered: bool = True,
        key: str | Sequence[str] | None = None,
    ) -> Callable[[F], F]:
        """Register ``async def f(events, session)``: up to ``max_size`` events per call, one
        transaction."""
        if not isinstance(max_size, int) or max_size < 1:
            raise RouterError(f"on_batch({table!r}): max_size must be a positive integer")
        return self._durable(table, ops, name, ordered, key, batch=True, max_size=max_size)

    def on_notify(self, channel: str, *, name: str | None = None) -> Callable[[F], F]:
        """Register ``async def f(note)`` for a raw NOTIFY channel (at-most-once)."""
        if not channel or len(channel.encode()) > 63:
            raise RouterError(f"on_notify({channel!r}): a channel name must be 1 to 63 bytes long")

        def register(func: F) -> F:
            handler_name = _handler_name(func, name)
            self.notify.append(NotifyHandler(handler_name, channel, func))
            return func

        return register

    def include(self, other: Router) -> None:
        """Add every handler of ``other`` to this router."""
        self.durable.extend(other.durable)
        self.notify.extend(other.notify)

    def _durable(
        self,
        table: str,
        ops: Iterable[Op],
        name: str | None,
        ordered: bool,
        key: str | Sequence[str] | None,
        *,
        batch: bool,
        max_size: int,
    ) -> Callable[[F], F]:
        parsed = TableName.parse(table)
        op_set = frozenset(o.upper() for o in ops)
        if not op_set or not op_set <= set(ALL_OPS):
            raise RouterError(
                f"handler for {table!r}: ops must be a non-empty subset of {', '.join(ALL_OPS)}"
            )
        key_cols: tuple[str, ...] | None
        if key is None:
            key_cols = None
        elif isinstance(key, str):
            key_cols = (key,)
        else:
            key_cols = tuple(key)
            if not key_cols:
                raise RouterError(f"handler for {table!r}: key= needs at least one column")

        def register(func: F) -> F:
            handler_name = _handler_name(func, name)
            self.durable.append(
                DurableHandler(
                    name=handler_name,
                    table=parsed,
                    ops=op_set,  # type: ignore[arg-type]
                    func=func,
                    batch=batch,
                    max_size=max_size,
                    ordered=ordered,
                    key=key_cols,
                )
            )
            return func

        return register


def _handler_name(func: Callable[..., Any], name: str | None) -> str:
    result = name or f"{func.__module__}.{func.__qualname__}"
    if not _NAME_RE.fullmatch(result):
        raise RouterError(
            f"handler name {result!r} is not allowed: use 1-200 letters, digits and _.:-"
        )
    return result


def load_routers(modules: Sequence[str]) -> Router:
    """Import each module, take its ``router`` and merge them; names must be unique."""
    merged = Router()
    for module_name in modules:
        try:
            module = importlib.import_module(module_name)
        except (Exception, SystemExit) as exc:  # sys.exit(0) at import must not end pgreact
            raise HandlerLoadError(
                f"PGREACT_HANDLERS: cannot import handler module {module_name!r}: "
                f"{type(exc).__name__}: {exc}. Check the module name and that it is on "
                "PYTHONPATH."
            ) from exc
        router = getattr(module, "router", None)
        if not isinstance(router, Router):
            raise HandlerLoadError(
                f"PGREACT_HANDLERS: module {module_name!r} defines no `router = Router()`"
            )
        merged.include(router)
    seen: set[str] = set()
    for name in [h.name for h in merged.durable] + [h.name for h in merged.notify]:
        if name in seen:
            raise RouterError(f"two handlers are named {name!r}: give one of them name='...'")
        seen.add(name)
    return merged
