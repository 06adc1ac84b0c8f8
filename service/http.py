"""The HTTP surface: ``/metrics``, ``/livez``, ``/readyz`` — nothing else.

A plain ASGI callable served by Hypercorn inside the daemon's own event loop (no signal handlers
of its own: the daemon owns shutdown).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import orjson
from anyio.abc import TaskStatus
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

Readiness = Callable[[], Awaitable[dict[str, str]]]
"""Returns the components that are down (name → reason); empty means ready."""

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class HealthApp:
    def __init__(self, registry: CollectorRegistry, readiness: Readiness) -> None:
        self._registry = registry
        self._readiness = readiness

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        if scope["method"] not in ("GET", "HEAD"):
            await _respond(send, 405, b"method not allowed\n", "text/plain")
            return
        path = scope["path"]
        if path == "/metrics":
            body = await anyio.to_thread.run_sync(generate_latest, self._registry)
            await _respond(send, 200, body, CONTENT_TYPE_LATEST)
        elif path == "/livez":
            await _respond(send, 200, b"ok\n", "text/plain")
        elif path == "/readyz":
            down = await self._readiness()
            status = 503 if down else 200
            payload = {"status": "unready" if down else "ready", "down": down}
            await _respond(send, status, orjson.dumps(payload) + b"\n", "application/json")
        else:
            await _respond(send, 404, b"not found\n", "text/plain")


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


async def _respond(send: Send, status: int, body: bytes, content_type: str) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", content_type.encode()),
                (b"content-length", str(len(body)).encode()),
                (b"cache-control", b"no-store"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def serve_http(
    app: HealthApp,
    host: str,
    port: int,
    shutdown: anyio.Event,
    *,
    task_status: TaskStatus[int] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until ``shutdown`` is set, then close connections gracefully (cancelling Hypercorn
    with keep-alive connections open leaves its futures in a bad state). The socket is bound
    here so port 0 works and the real port is reported through ``task_status`` before the
    first request can arrive."""
    from hypercorn.asyncio import serve
    from hypercorn.config import Config

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(128)
        sock.set_inheritable(True)
        config = Config()
        # Hypercorn adopts (and later closes) the descriptor it is given: hand it a duplicate.
        config.bind = [f"fd://{os.dup(sock.fileno())}"]
        config.accesslog = None
        config.errorlog = None
        config.graceful_timeout = 1.0
        task_status.started(sock.getsockname()[1])
        await serve(app, config, shutdown_trigger=shutdown.wait)  # type: ignore[arg-type]
    finally:
        sock.close()
