"""One long-lived Redis connection that pipelines the commands of all concurrent callers.

Why: with ``redis.asyncio``'s pool every command pays a pool checkout and release, the retry
wrapper, per-command hooks and a timeout wrapper around each read and write; on the VerifyOtp
hot path that was about a quarter of the server's CPU (bench/README.md). Here a command is
packed and queued, commands queued in the same event-loop turn leave in one write, and replies
are matched to callers in order.

How: redis-py opens each connection (TCP, TLS, unix socket, or whatever a Sentinel pool
resolves; AUTH with an ACL user, SELECT, HELLO: all as its URL or pool says). Then the
connection's transport is handed to ``_Link``, a small asyncio Protocol of ours: every byte
Redis sends goes into a hiredis reader built with redis-py's own error mapping (NOSCRIPT arrives
as NoScriptError, error replies as redis-py's exception types, so the store's script reload
works here as over redis-py's own client), and each complete reply resolves the oldest waiting
command. There is no reader task and no write task: writes are plain ``transport.write`` calls,
one per loop turn.

Faults, and why each is handled this way:
- A link that is down never writes again. Each link writes only to its own transport, and only
  while it is up; nothing ever reconnects a dropped link (redis-py's send would, and the batch
  it wrote then went to a socket nobody read). A dropped link's socket is closed at once.
- No answer within ``timeout``: the link is dropped and every command waiting on it fails with
  TimeoutError. Replies are matched by order, so a late reply can never be trusted to belong to
  a later command on the same connection.
- Connection lost (Redis restarted, CLIENT KILL): the link sees it at once, fails what is
  waiting with ConnectionError, and the next command connects afresh. A command that was
  already written is never sent again: it may have run, and the rules (attempt counting, sends)
  are not idempotent.
- A command that cannot be encoded fails its caller alone: it is packed before anything is
  queued, so it takes no reply slot.
- Error replies (NOSCRIPT, WRONGTYPE...) go to their caller only; the connection stays.

Only what the store uses is here. On Redis Cluster the store would be given a cluster client
instead: every script already touches a single hash slot.
"""

from __future__ import annotations

import asyncio
import codecs
from collections import deque
from collections.abc import Callable
from typing import Any

import hiredis
from redis._parsers import BaseParser
from redis.asyncio.connection import AbstractConnection, ConnectionPool
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import InvalidResponse, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

# What hiredis returns while no reply is complete (False and None can be replies).
_NOT_ENOUGH_DATA = object()


def _packer(connection: AbstractConnection) -> Callable[[tuple[Any, ...]], bytes]:
    """How ``connection``'s commands are encoded: hiredis' C packer where it writes the same
    bytes as redis-py's own ``pack_command``, which packs in Python (about 5 us an EVALSHA,
    bench/README.md).

    hiredis packs str as UTF-8, and bytes, int and float as redis-py does; anything else (a
    command name of two words, a value hiredis refuses, another encoding) goes to redis-py,
    so what is sent, and the DataError for what cannot be, are redis-py's.
    """
    redis_py = connection.pack_command
    encoder = connection.encoder

    def by_redis_py(args: tuple[Any, ...]) -> bytes:
        return b"".join(redis_py(*args))

    if (codecs.lookup(encoder.encoding).name, encoder.encoding_errors) != ("utf-8", "strict"):
        return by_redis_py

    def pack(args: tuple[Any, ...]) -> bytes:
        name = args[0]
        if type(name) is str and " " not in name:
            try:
                packed: bytes = hiredis.pack_command(args)
                return packed
            except TypeError:
                pass
        return by_redis_py(args)

    return pack


class _Link(asyncio.Protocol):
    """One open connection to Redis: writes commands, matches replies to them in order."""

    def __init__(
        self,
        connection: AbstractConnection,
        writer: asyncio.StreamWriter,
        timeout: float,
        on_down: Callable[[_Link], None],
    ) -> None:
        self._pack = _packer(connection)
        encoder = connection.encoder
        decoding: dict[str, Any] = {}
        if encoder.decode_responses:
            decoding = {"encoding": encoder.encoding, "errors": encoder.encoding_errors}
        self._replies = hiredis.Reader(
            protocolError=InvalidResponse,
            replyError=BaseParser.parse_error,  # redis-py's exception type for each error reply
            notEnoughData=_NOT_ENOUGH_DATA,
            **decoding,
        )
        # The writer is kept only because collecting it while the socket is open closes it.
        self._writer = writer
        self._transport: asyncio.Transport = writer.transport  # type: ignore[assignment]
        self._timeout = timeout
        self._on_down = on_down
        # Not asyncio.get_running_loop() per command: on Python 3.11 that is a getpid() call.
        self._loop = asyncio.get_running_loop()
        self._waiting: deque[tuple[asyncio.Future[Any], float]] = deque()  # (reply, deadline)
        self._outbox: list[bytes] = []
        self._watchdog: asyncio.TimerHandle | None = None
        self.error: RedisError | None = None  # why the link is down; None while it is up
        self.closed: asyncio.Future[None] = self._loop.create_future()  # the socket is closed

    @classmethod
    def take_over(
        cls, connection: AbstractConnection, timeout: float, on_down: Callable[[_Link], None]
    ) -> _Link:
        """The link that owns ``connection``'s socket from now on (redis-py no longer does)."""
        # redis-py keeps its stream private; its transport is the seam. Cleared on the
        # connection, so that redis-py neither reads, writes nor closes the socket again.
        reader, writer = connection._reader, connection._writer
        connection._reader = connection._writer = None
        if reader is None or writer is None:
            raise RedisConnectionError("the connection to Redis closed while it was opened")
        if reader.at_eof() or writer.transport.is_closing():
            writer.transport.abort()
            raise RedisConnectionError("Redis closed the connection right after opening it")
        link = cls(connection, writer, timeout, on_down)
        writer.transport.set_protocol(link)
        return link

    def send(self, args: tuple[Any, ...]) -> asyncio.Future[Any]:
        """Queue one command; the future gets its reply, its error reply or the link's fault."""
        if self.error is not None:
            raise RedisConnectionError("lost the connection to Redis") from self.error
        # Packed first: a command that cannot be encoded must not take a reply slot.
        packed = self._pack(args)
        loop = self._loop
        reply: asyncio.Future[Any] = loop.create_future()
        self._waiting.append((reply, loop.time() + self._timeout))
        if not self._outbox:
            # The first command of this loop turn; the others join it in one write.
            loop.call_soon(self._flush)
        self._outbox.append(packed)
        if self._watchdog is None:
            self._watchdog = loop.call_later(self._timeout / 4, self._watch)
        return reply

    def drop(self, error: RedisError) -> None:
        """Take the link down: close the socket, fail what waits. Nothing is written after."""
        if self.error is not None:
            return
        self.error = error
        self._outbox = []
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        self._transport.abort()
        waiting, self._waiting = self._waiting, deque()
        for reply, _ in waiting:
            if not reply.done():
                reply.set_exception(error)
        self._on_down(self)

    # -- asyncio.Protocol --------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        replies = self._replies
        replies.feed(data)
        while self.error is None:
            try:
                answer = replies.gets()
            except InvalidResponse as exc:
                self.drop(RedisConnectionError(f"Redis sent something unreadable: {exc}"))
                return
            if answer is _NOT_ENOUGH_DATA:
                return
            if isinstance(answer, hiredis.PushNotification):
                continue  # RESP3 pushes answer no command
            if not self._waiting:
                self.drop(RedisConnectionError("Redis sent a reply nobody asked for"))
                return
            reply = self._waiting.popleft()[0]
            if reply.done():
                continue  # its caller gave up (cancelled); the reply is discarded
            if isinstance(answer, Exception):
                reply.set_exception(answer)
            else:
                reply.set_result(answer)

    def eof_received(self) -> bool:
        return False  # Redis closed its side: let the transport close ours (connection_lost)

    def connection_lost(self, exc: Exception | None) -> None:
        cause = f": {exc!r}" if exc is not None else ""
        self.drop(RedisConnectionError(f"lost the connection to Redis{cause}"))
        if not self.closed.done():
            self.closed.set_result(None)

    # -- inside ------------------------------------------------------------------------------

    def _flush(self) -> None:
        if self.error is None and self._outbox:
            chunks, self._outbox = self._outbox, []
            self._transport.write(b"".join(chunks))

    def _watch(self) -> None:
        """Drop the link when its oldest command has waited longer than the timeout."""
        self._watchdog = None
        if not self._waiting or self.error is not None:
            return
        if self._waiting[0][1] <= self._loop.time():
            self.drop(RedisTimeoutError(f"Redis did not answer within {self._timeout}s"))
        else:
            self._watchdog = self._loop.call_later(self._timeout / 4, self._watch)


# The note on a fault of a command that was never sent (see PipelinedRedis.execute_command).
NOT_SENT = "not sent: no connection to Redis could be opened"


class PipelinedRedis:
    """A Redis client for many concurrent callers over one connection (see module docstring).

    ``pool`` only makes connections (``make_connection()``: an unconnected redis-py
    connection, plain, TLS, unix or Sentinel-managed); its checkout is never used, and it stays
    the caller's to close. Every command fails within about ``timeout`` seconds.
    """

    def __init__(self, pool: ConnectionPool, *, timeout: float) -> None:
        self._pool = pool
        self._timeout = timeout
        self._link: _Link | None = None
        self._opening: asyncio.Task[_Link] | None = None
        self._closed = False

    @classmethod
    def from_url(cls, url: str, *, timeout: float) -> PipelinedRedis:
        """A client for ``url`` (``redis://``, ``rediss://`` with ``ssl_*`` options, ``unix://``;
        user and password for AUTH, the database number for SELECT)."""
        pool = ConnectionPool.from_url(
            url,
            socket_connect_timeout=timeout,
            socket_timeout=timeout,  # the handshake's reads; later ones are the link's
            retry=Retry(NoBackoff(), 0),
        )
        return cls(pool, timeout=timeout)

    # -- what the store calls ------------------------------------------------------------

    async def execute_command(self, *args: Any) -> Any:
        """Send one command and wait for its reply; raise its error reply or a fault.

        A fault raised because no connection could be opened carries the note NOT_SENT: the
        command never reached Redis.
        """
        link = self._link
        if link is None:
            try:
                link = await self._connect()
            except RedisError as exc:
                if NOT_SENT not in getattr(exc, "__notes__", ()):  # shared by the callers waiting
                    exc.add_note(NOT_SENT)
                raise
        return await link.send(args)

    async def ping(self) -> bool:
        return bool(await self.execute_command("PING") in (b"PONG", "PONG", True))

    async def aclose(self) -> None:
        """Close the connection; commands after this fail."""
        self._closed = True
        if self._opening is not None:
            # Not cancelled: callers share it. Bounded by the timeout; its link is dropped.
            await asyncio.wait([self._opening])
        link, self._link = self._link, None
        if link is not None:
            link.drop(RedisConnectionError("the client was closed"))
            await link.closed

    # -- the connection ------------------------------------------------------------------

    async def _connect(self) -> _Link:
        """The link, opened by one attempt that every caller arriving meanwhile shares.

        Shared, so that with Redis unreachable N waiting callers fail together within one
        timeout instead of queueing for N attempts; shielded, so that one caller giving up does
        not abort the attempt for the others.
        """
        if self._closed:
            raise RedisConnectionError("the client was closed")
        if self._opening is None or self._opening.done():
            self._opening = asyncio.get_running_loop().create_task(self._open())
            # Retrieved here too, so a failure nobody waited for is not reported as lost.
            self._opening.add_done_callback(lambda task: task.cancelled() or task.exception())
        return await asyncio.shield(self._opening)

    async def _open(self) -> _Link:
        connection: AbstractConnection = self._pool.make_connection()  # type: ignore[no-untyped-call]
        try:
            # connect() also runs AUTH/SELECT/CLIENT SETINFO, which must not wait forever.
            async with asyncio.timeout(self._timeout):
                await connection.connect()  # type: ignore[no-untyped-call]
        except TimeoutError as exc:
            await connection.disconnect(nowait=True)
            raise RedisTimeoutError("timed out connecting to Redis") from exc
        except BaseException:
            await connection.disconnect(nowait=True)
            raise
        link = _Link.take_over(connection, self._timeout, self._down)
        if self._closed:
            link.drop(RedisConnectionError("the client was closed"))
        if link.error is not None:
            raise link.error
        self._link = link
        return link

    def _down(self, link: _Link) -> None:
        if self._link is link:
            self._link = None
