"""The HTTP surface: ``/metrics``, ``/livez``, ``/readyz`` — nothing else.

A plain ASGI callable served by Hypercorn inside the daemon's own event loop (no signal handlers
of its own: the daemon owns shutdown). ``/metrics`` is prometheus-client's own ASGI app, so
content negotiation (OpenMetrics when the scraper asks for it), gzip and ``name[]`` filters
behave as in every other Python exporter.
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import orjson
from anyio.abc import TaskStatus
from prometheus_client import CollectorRegistry, make_asgi_app

from pgreact.errors import HttpBindError

Readiness = Callable[[], Awaitable[dict[str, str]]]
"""Returns the components that are down (name → reason); empty means ready."""

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class HealthApp:
    def __init__(self, registry: CollectorRegistry, readiness: Readiness) -> None:
        self._metrics: Callable[[Scope, Receive, Send], Awaitable[None]] = make_asgi_app(registry)
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
            await self._metrics(scope, receive, send)
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

    sock = _bind(host, port)
    try:
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


def _bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port``, or an error that names the settings to change
    (a port in use, a host name that does not resolve or is not an address of this machine)."""
    where = f"{host}:{port} (PGREACT_HTTP_HOST, PGREACT_HTTP_PORT)"
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as exc:
        raise HttpBindError(
            f"cannot listen on {where}: {host!r} does not resolve ({exc}); set "
            "PGREACT_HTTP_HOST to an address of this machine, e.g. 0.0.0.0"
        ) from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
        sock.set_inheritable(True)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            fix = "another process listens there: stop it or set PGREACT_HTTP_PORT to a free port"
        elif exc.errno == errno.EADDRNOTAVAIL:
            fix = "not an address of this machine: set PGREACT_HTTP_HOST, e.g. to 0.0.0.0"
        elif exc.errno == errno.EACCES:
            fix = "not allowed (ports below 1024 need privileges): set PGREACT_HTTP_PORT"
        else:
            fix = "check PGREACT_HTTP_HOST and PGREACT_HTTP_PORT"
        raise HttpBindError(f"cannot listen on {where}: {exc.strerror}; {fix}") from None
    return sock
