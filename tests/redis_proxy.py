"""A TCP proxy in front of a real Redis: the network between the service and Redis, made visible.

It forwards bytes both ways, optionally speaking TLS to its clients (Redis behind it does not
need TLS). ``hold_next(marker)`` makes the next connection whose bytes contain ``marker`` hold
them, and everything it sends after, back from Redis: a network that delays one direction.
``release()`` delivers what was held, even when the client has given up on that connection, and
returns Redis' answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from dataclasses import dataclass, field


@dataclass(eq=False)
class _Pipe:
    """One client connection and its connection to Redis."""

    to_redis: asyncio.StreamWriter
    held: bytearray | None = None  # None: forwarding
    client_gone: bool = False
    answer: bytes = b""
    answered: asyncio.Event = field(default_factory=asyncio.Event)


class RedisProxy:
    """Listens on loopback (``port``, ``url``) and forwards to Redis on ``redis_port``."""

    def __init__(self, redis_port: int, *, tls: ssl.SSLContext | None = None) -> None:
        self._redis_port = redis_port
        self._tls = tls
        self._server: asyncio.Server | None = None
        self._pipes: list[_Pipe] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._marker: bytes | None = None
        self.holding = asyncio.Event()  # set once a connection holds bytes back
        self.port = 0

    @property
    def url(self) -> str:
        return f"{'rediss' if self._tls else 'redis'}://127.0.0.1:{self.port}/0"

    async def start(self) -> RedisProxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self._tls)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for pipe in self._pipes:
            pipe.to_redis.close()
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

    async def _serve(self, client: asyncio.StreamReader, to_client: asyncio.StreamWriter) -> None:
        try:
            from_redis, to_redis = await asyncio.open_connection("127.0.0.1", self._redis_port)
        except OSError:
            to_client.close()
            return
        pipe = _Pipe(to_redis)
        self._pipes.append(pipe)
        for pump in (self._to_redis(client, pipe), self._to_client(from_redis, to_client, pipe)):
            task = asyncio.create_task(pump)
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _to_redis(self, client: asyncio.StreamReader, pipe: _Pipe) -> None:
        with contextlib.suppress(OSError):
            while data := await client.read(65536):
                if pipe.held is None and self._marker is not None and self._marker in data:
                    self._marker = None
                    pipe.held = bytearray()
                    self.holding.set()
                if pipe.held is not None:
                    pipe.held += data
                else:
                    pipe.to_redis.write(data)
        pipe.client_gone = True
        if pipe.held is None:
            pipe.to_redis.close()

    async def _to_client(
        self, from_redis: asyncio.StreamReader, to_client: asyncio.StreamWriter, pipe: _Pipe
    ) -> None:
        try:
            with contextlib.suppress(OSError):
                while data := await from_redis.read(65536):
                    pipe.answer = data
                    pipe.answered.set()
                    if not to_client.is_closing():
                        to_client.write(data)
        finally:
            to_client.close()
