"""A TCP proxy on loopback that stands between the service and Redis and misbehaves on demand.

    proxy = await TcpProxy(redis_port).start()       # the service connects to proxy.url
    proxy.delay = 0.2      # every chunk, either way, arrives 0.2 s late (in order)
    proxy.stall()          # nothing passes on any connection; resume() lets it all through
    proxy.drop()           # the open connections go silent for good: bytes vanish, no FIN
    proxy.cut()            # every open connection is reset at once
    proxy.target = port    # new connections go elsewhere (a DNS or VIP switch)

``open`` counts the connections the service holds through it, so a test can check that the
service closed the ones it gave up on.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field


@dataclass(eq=False)
class _Pipe:
    """One proxied connection: the service's side and Redis's side."""

    client: asyncio.StreamWriter
    server: asyncio.StreamWriter
    dropped: bool = False
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


class TcpProxy:
    def __init__(self, target: int, host: str = "127.0.0.1") -> None:
        self.target = target
        self.host = host
        self.delay = 0.0
        self.port = 0
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._pipes: set[_Pipe] = set()
        self._server: asyncio.Server | None = None
        self.accepted = 0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def open(self) -> int:
        """Connections the service holds open through the proxy now."""
        return len(self._pipes)

    async def start(self) -> TcpProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def stall(self) -> None:
        self._flowing.clear()

    def resume(self) -> None:
        self._flowing.set()

    def drop(self) -> None:
        for pipe in self._pipes:
            pipe.dropped = True

    def cut(self) -> None:
        for pipe in list(self._pipes):
            self._close(pipe, reset=True)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        self.cut()
        if self._server is not None:
            await self._server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(self.host, self.target)
        except OSError:
            writer.transport.abort()
            return
        pipe = _Pipe(writer, upstream_writer)
        self._pipes.add(pipe)
        for source, sink in ((reader, upstream_writer), (upstream_reader, writer)):
            # A reader and a writer per direction, so a delay is latency, not a bandwidth cap.
            chunks: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
            pipe.tasks += [
                asyncio.create_task(self._read(pipe, source, chunks)),
                asyncio.create_task(self._write(pipe, chunks, sink)),
            ]

    async def _read(
        self, pipe: _Pipe, source: asyncio.StreamReader, chunks: asyncio.Queue[tuple[float, bytes]]
    ) -> None:
        loop = asyncio.get_running_loop()
        with contextlib.suppress(OSError, asyncio.CancelledError):
            while chunk := await source.read(65_536):
                chunks.put_nowait((loop.time() + self.delay, chunk))
        # One side closed (or failed): close the other, as a real hop would.
        self._close(pipe, reset=False)

    async def _write(
        self, pipe: _Pipe, chunks: asyncio.Queue[tuple[float, bytes]], sink: asyncio.StreamWriter
    ) -> None:
        loop = asyncio.get_running_loop()
        with contextlib.suppress(OSError, asyncio.CancelledError):
            while True:
                due, chunk = await chunks.get()
                await asyncio.sleep(max(0.0, due - loop.time()))
                await self._flowing.wait()
                if not pipe.dropped:
                    sink.write(chunk)

    def _close(self, pipe: _Pipe, *, reset: bool) -> None:
        if pipe not in self._pipes:
            return
        self._pipes.discard(pipe)
        for writer in (pipe.client, pipe.server):
            if reset:
                writer.transport.abort()
            else:
                writer.close()
        current = asyncio.current_task()
        for task in pipe.tasks:
            if task is not current:
                task.cancel()
