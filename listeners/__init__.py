"""LISTEN/NOTIFY for pgreact: one small backend protocol, three backends, one supervisor.

Only :func:`backend_for` names the concrete backends (imported lazily, so the asyncpg backend
never imports psycopg and vice versa). Everything else talks to :class:`ListenerBackend` /
:class:`ListenerConnection` and lets :class:`Listener` handle reconnects and heartbeats.
"""

from __future__ import annotations

from typing import Final

from pgreact.listeners.backoff import Backoff
from pgreact.listeners.dsn import libpq_dsn, mask_dsn
from pgreact.listeners.protocol import (
    ListenerBackend,
    ListenerConnectError,
    ListenerConnection,
    ListenerError,
    ListenerLost,
    Notification,
    NotificationCallback,
)
from pgreact.listeners.supervisor import Listener

__all__ = [
    "BACKEND_NAMES",
    "Backoff",
    "Listener",
    "ListenerBackend",
    "ListenerConnectError",
    "ListenerConnection",
    "ListenerError",
    "ListenerLost",
    "Notification",
    "NotificationCallback",
    "backend_for",
    "libpq_dsn",
    "mask_dsn",
]

BACKEND_NAMES: Final = ("asyncpg", "psycopg", "memory")


def backend_for(name: str) -> ListenerBackend:
    """Return a new backend by name: ``asyncpg``, ``psycopg`` or ``memory``.

    ``memory`` gets a fresh private :class:`~pgreact.listeners.memory.MemoryBroker` (reachable as
    ``backend.broker``); tests that need to share a broker build ``MemoryBackend(broker)``.
    """
    if name == "asyncpg":
        from pgreact.listeners.asyncpg_backend import AsyncpgBackend

        return AsyncpgBackend()
    if name == "psycopg":
        from pgreact.listeners.psycopg_backend import PsycopgBackend

        return PsycopgBackend()
    if name == "memory":
        from pgreact.listeners.memory import MemoryBackend

        return MemoryBackend()
    raise ValueError(
        f"unknown listener backend {name!r}: expected one of {', '.join(BACKEND_NAMES)}"
    )
