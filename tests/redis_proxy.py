"""A TCP proxy in front of a real Redis: the network between the service and Redis, made visible.

It forwards bytes both ways, optionally speaking TLS to its clients (Redis behind it does not
need TLS), and misbehaves on demand:

- ``hold_next(marker)``: the next connection whose bytes contain ``marker`` holds them, and
  everything it sends after, back from Redis (a network that delays one direction);
  ``release()`` delivers what was held, even when the client has given up on that connection,
  and returns Redis' answer.
- ``delay``: every chunk, either way, arrives that many seconds late (latency, in order).
- ``stall()``: nothing passes on any connection until ``resume()``, which delivers it all.
- ``drop()``: the open connections go silent for good: bytes vanish, no FIN, no RST.
- ``cut()``: every open connection is reset at once.
- ``redis_port``: where new connections go (a DNS name or a virtual IP that moved).

``open`` counts the connections its clients hold now, so a test can check that the service
closed the ones it gave up on.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from dataclasses import dataclass, field

# What a reader queues when its side closed (chunks read are never empty): the writer closes
# the other side, after what came before.
_EOF = b""


@dataclass(eq=False)
class _Pipe:
    """One client connection and its connection to Redis."""

    to_client: asyncio.StreamWriter
    to_redis: asyncio.StreamWriter
    held: bytearray | None = None  # None: forwarding
    client_gone: bool = False
    dropped: bool = False
    answer: bytes = b""
    answered: asyncio.Event = field(default_factory=asyncio.Event)


class RedisProxy:
    """Listens on loopback (``port``, ``url``) and forwards to Redis on ``redis_port``."""

    def __init__(self, redis_port: int, *, tls: ssl.SSLContext | None = None) -> None:
        self.redis_port = redis_port
        self._tls = tls
        self._server: asyncio.Server | None = None
        self._pipes: list[_Pipe] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._marker: bytes | None = None
        self._flowing = asyncio.Event()
        self._flowing.set()
        self.holding = asyncio.Event()  # set once a connection holds bytes back
        self.delay = 0.0
        self.port = 0

    @property
    def url(self) -> str:
        return f"{'rediss' if self._tls else 'redis'}://127.0.0.1:{self.port}/0"

    @property
    def open(self) -> int:
        """Connections whose client has not closed them (nor been cut off)."""
        return sum(not pipe.client_gone for pipe in self._pipes)

    async def start(self) -> RedisProxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self._tls)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for pipe in self._pipes:
            pipe.to_redis.close()
            pipe.to_client.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    def hold_next(self, marker: bytes) -> None:
        """Hold back what the next connection to send ``marker`` sends from then on."""
        self._marker = marker

    async def release(self) -> list[bytes]:
        """Deliver every held connection's bytes to Redis; Redis' first answer to each."""
        answers = []
        for pipe in self._pipes:
            if pipe.held is None:
                continue
            data, pipe.held = bytes(pipe.held), None
            pipe.answered.clear()
            pipe.to_redis.write(data)
            await pipe.answered.wait()
            answers.append(pipe.answer)
            if pipe.client_gone:
                pipe.to_redis.close()
        return answers

    def stall(self) -> None:
        self._flowing.clear()

    def resume(self) -> None:
        self._flowing.set()

    def drop(self) -> None:
        for pipe in self._pipes:
            pipe.dropped = True

    def cut(self) -> None:
        for pipe in self._pipes:
            pipe.client_gone = True
            pipe.to_client.transport.abort()
            pipe.to_redis.transport.abort()

    async def _serve(self, client: asyncio.StreamReader, to_client: asyncio.StreamWriter) -> None:
        try:
            from_redis, to_redis = await asyncio.open_connection("127.0.0.1", self.redis_port)
        except OSError:
            to_client.close()
            return
        pipe = _Pipe(to_client, to_redis)
        self._pipes.append(pipe)
        # A reader and a writer each way, so a delay is latency, not a cap on throughput.
        upstream: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
        downstream: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
        for pump in (
            self._from_client(client, pipe, upstream),
            self._deliver(upstream, pipe, to_redis),
            self._from_redis(from_redis, pipe, downstream),
            self._deliver(downstream, pipe, to_client),
        ):
            task = asyncio.create_task(pump)
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _from_client(
        self, client: asyncio.StreamReader, pipe: _Pipe, out: asyncio.Queue[tuple[float, bytes]]
    ) -> None:
        loop = asyncio.get_running_loop()
        with contextlib.suppress(OSError):
            while data := await client.read(65536):
                if pipe.held is None and self._marker is not None and self._marker in data:
                    self._marker = None
                    pipe.held = bytearray()
                    self.holding.set()
                if pipe.held is not None:
                    pipe.held += data
                else:
                    out.put_nowait((loop.time() + self.delay, data))
        pipe.client_gone = True
        out.put_nowait((loop.time() + self.delay, _EOF))

    async def _from_redis(
        self, redis: asyncio.StreamReader, pipe: _Pipe, out: asyncio.Queue[tuple[float, bytes]]
    ) -> None:
        loop = asyncio.get_running_loop()
        with contextlib.suppress(OSError):
            while data := await redis.read(65536):
                pipe.answer = data
                pipe.answered.set()
                out.put_nowait((loop.time() + self.delay, data))
        out.put_nowait((loop.time() + self.delay, _EOF))

    async def _deliver(
        self, queue: asyncio.Queue[tuple[float, bytes]], pipe: _Pipe, sink: asyncio.StreamWriter
    ) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                due, data = await queue.get()
                await asyncio.sleep(max(0.0, due - loop.time()))
                await self._flowing.wait()
                if data == _EOF:
                    # A connection holding bytes stays open towards Redis until release().
                    if not (sink is pipe.to_redis and pipe.held is not None):
                        sink.close()
                    return
                if not pipe.dropped and not sink.is_closing():
                    sink.write(data)
        finally:
            if sink is pipe.to_client:
                sink.close()
