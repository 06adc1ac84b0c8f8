"""A loopback TCP proxy for fault tests.

``stall()`` stops forwarding in both directions while keeping every socket open — what a
silently dead network path (a half-open connection) looks like to both ends. ``cut()`` resets
every connection at once. New connections are accepted (and stalled) while stalled.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from dataclasses import dataclass, field


@dataclass
class TcpProxy:
    target_host: str
    target_port: int
    host: str = "127.0.0.1"
    port: int = 0
    _server: asyncio.base_events.Server | None = None
    _flowing: asyncio.Event = field(default_factory=asyncio.Event)
    _pairs: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = field(default_factory=set)
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    async def start(self) -> TcpProxy:
        self._flowing.set()
        self._server = await asyncio.start_server(self._accept, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def url(self, libpq_url: str) -> str:
        """``libpq_url`` with its host:port replaced by the proxy's."""
        target = f"{self.target_host}:{self.target_port}"
        assert target in libpq_url, (target, libpq_url)
        return libpq_url.replace(target, f"{self.host}:{self.port}")

    def stall(self) -> None:
        self._flowing.clear()

    def resume(self) -> None:
        self._flowing.set()

    def cut(self) -> None:
        for client, upstream in list(self._pairs):
            for writer in (client, upstream):
                with contextlib.suppress(Exception):
                    sock = writer.get_extra_info("socket")
                    if sock is not None:  # RST instead of FIN: an abrupt reset
                        sock.setsockopt(
                            socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
                        )
                    writer.transport.abort()
        self._pairs.clear()

    @property
    def connections(self) -> int:
        return len(self._pairs)

    async def close(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(self.target_host, self.target_port)
        except OSError:
            writer.transport.abort()
            return
        pair = (writer, up_writer)
        self._pairs.add(pair)
        a = asyncio.ensure_future(self._pump(reader, up_writer))
        b = asyncio.ensure_future(self._pump(up_reader, writer))
        self._tasks.update((a, b))
        try:
            await asyncio.wait([a, b], return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (a, b):
                task.cancel()
            self._pairs.discard(pair)
            for w in (writer, up_writer):
                w.transport.abort()
            self._tasks.difference_update((a, b))

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            data = await reader.read(65536)
            if not data:
                return
            await self._flowing.wait()  # stalled: hold the bytes, keep the socket open
            writer.write(data)
            await writer.drain()
