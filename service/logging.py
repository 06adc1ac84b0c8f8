"""structlog configuration: one call, JSON lines by default, console for humans.

``merge_contextvars`` comes first so fields bound with ``bind_contextvars`` appear on every line;
:func:`handling` does the same for the event being handled (handler, table, event id, op,
attempt) with one context variable, cheap enough to set around every handler call.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from collections.abc import Hashable, Mapping
from contextvars import ContextVar, Token
from typing import Any, Literal

import orjson
import structlog

_handling: ContextVar[Mapping[str, object] | None] = ContextVar("pgreact_handling", default=None)


def handling(fields: Mapping[str, object] | None) -> Token[Mapping[str, object] | None]:
    """Put ``fields`` on every line logged in this context until :func:`reset_handling`."""
    return _handling.set(fields)


def reset_handling(token: Token[Mapping[str, object] | None]) -> None:
    _handling.reset(token)


def merge_handling(_logger: Any, _method: str, event_dict: Any) -> Any:
    fields = _handling.get()
    if fields:
        for key, value in fields.items():
            event_dict.setdefault(key, value)
    return event_dict


class Throttle:
    """Says yes at most once per ``interval`` seconds for each key: for log lines that would
    otherwise repeat by the thousand (a database that is down, the traceback of the same
    failure over and over)."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._last: dict[Hashable, float] = {}

    def ready(self, key: Hashable) -> bool:
        now = time.monotonic()
        if now - self._last.get(key, -math.inf) < self.interval:
            return False
        self._last[key] = now
        return True


def _dumps(obj: object, default: object = None) -> str:
    try:
        return orjson.dumps(obj, default=str).decode()
    except orjson.JSONEncodeError:  # e.g. a lone surrogate in a message: escape, don't fail
        return json.dumps(obj, default=str)


def configure_logging(
    fmt: Literal["json", "console"] = "json", level: str = "INFO", *, cache: bool = True
) -> None:
    """Configure structlog and the standard logging module. ``cache=False`` keeps loggers
    re-configurable (tests capture logs with ``structlog.testing``)."""
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        numeric = logging.INFO
    renderer: structlog.typing.Processor
    if fmt == "console":
        renderer = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    else:
        renderer = structlog.processors.JSONRenderer(serializer=_dumps)
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        merge_handling,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[
            *shared,
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=cache,
    )
    # Libraries that log through the standard module (psycopg, hypercorn, asyncio) are rendered
    # by the same processors, so every line on stderr is one JSON object in production.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(max(numeric, logging.WARNING))
