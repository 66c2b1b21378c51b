"""A minimal Redis client on ``asyncio.Protocol``: the yardstick for the product's connection.

The Protocol reference (``bench/references.py``) runs the product's own store over this client
instead of ``PipelinedRedis``, so the two Redis references differ only in the connection. It is
about the least a pipelining client can do: each command is written at once, every byte Redis
sends is fed to a hiredis reader in ``data_received``, and each complete reply resolves the
oldest waiting command. No reader or writer task, no timeout, no reconnection, no AUTH or
SELECT: a benchmark yardstick, not a client for the service.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any
from urllib.parse import urlsplit

import hiredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError


def _error_reply(message: str) -> ResponseError:
    # NOSCRIPT as redis-py raises it, so the store's script reload works over this client too.
    return NoScriptError(message) if message.startswith("NOSCRIPT") else ResponseError(message)


class ProtocolRedis(asyncio.Protocol):
    """One connection; replies are matched to commands in order. Has what the store calls."""

    def __init__(self) -> None:
        self._replies = hiredis.Reader(replyError=_error_reply)
        self._waiting: deque[asyncio.Future[Any]] = deque()
        self._transport: asyncio.Transport | None = None
        self._loop = asyncio.get_running_loop()

    @classmethod
    async def connect(cls, url: str) -> ProtocolRedis:
        """Connect to a ``redis://host:port[/0]`` URL without a password."""
        parts = urlsplit(url)
        if parts.scheme != "redis" or parts.password or parts.path not in ("", "/", "/0"):
            raise ValueError(f"the minimal client speaks only plain redis://host:port/0: {url}")
        _, client = await asyncio.get_running_loop().create_connection(
            cls, parts.hostname or "127.0.0.1", parts.port or 6379
        )
        return client

    def execute_command(self, *args: Any) -> asyncio.Future[Any]:
        """Send one command; the future gets its reply, or its error reply as an exception."""
        if self._transport is None:
            raise RedisConnectionError("the connection to Redis is closed")
        self._transport.write(hiredis.pack_command(args))
        reply = self._loop.create_future()
        self._waiting.append(reply)
        return reply

    async def ping(self) -> bool:
        return bool(await self.execute_command("PING") == b"PONG")

    async def aclose(self) -> None:
        if self._transport is not None:
            self._transport.close()

    # -- asyncio.Protocol --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self._replies.feed(data)
        # RESP2 has no boolean reply, so False can only mean "no complete reply yet".
        while (reply := self._replies.gets()) is not False:
            waiting = self._waiting.popleft()
            if waiting.done():
                continue  # its caller gave up (cancelled); the reply is discarded
            if isinstance(reply, ResponseError):
                waiting.set_exception(reply)
            else:
                waiting.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        error = RedisConnectionError(f"lost the connection to Redis: {exc!r}")
        while self._waiting:
            if not (waiting := self._waiting.popleft()).done():
                waiting.set_exception(error)
