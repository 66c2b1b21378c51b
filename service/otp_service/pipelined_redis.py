"""One long-lived Redis connection that pipelines the commands of all concurrent callers.

Why: with ``redis.asyncio``'s pool every command pays a pool checkout and release, the retry
wrapper, per-command hooks and a timeout wrapper around each read and write; on the VerifyOtp
hot path that was about a quarter of the server's CPU (bench/README.md). Here a command is
packed, queued and answered by one reader task that matches replies to callers in order, so
commands that arrive in the same event-loop turn leave in one write.

Built on redis-py's own ``Connection`` (hiredis parser, AUTH/SELECT/TLS from the URL); error
replies arrive as redis-py's exceptions (NOSCRIPT as NoScriptError), so the store's script
reload works over it as over redis-py's own client.

Faults, and why each is handled this way:
- No answer within ``timeout``: the connection is dropped and every command waiting on it
  fails with TimeoutError. Replies are matched by order, so a late reply can never be trusted
  to belong to a later command on the same connection.
- Connection lost (Redis restarted): the reader sees it at once, fails what is waiting with
  ConnectionError, and the next command connects afresh. A command that was already written is
  never sent again: it may have run, and the rules (attempt counting, sends) are not idempotent.
- Error replies (NOSCRIPT, WRONGTYPE...) go to their caller only; the connection stays.

Only what the store uses is here. On Redis Cluster the store would be given a cluster client
instead: every script already touches a single hash slot.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from typing import Any

from redis.asyncio.connection import AbstractConnection, ConnectionPool
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError


class _Pending:
    """A command written to Redis, waiting for its reply."""

    __slots__ = ("deadline", "future")

    def __init__(self, future: asyncio.Future[Any], deadline: float) -> None:
        self.future = future
        self.deadline = deadline


class PipelinedRedis:
    """A Redis client for many concurrent callers over one connection (see module docstring)."""

    _loop: asyncio.AbstractEventLoop  # the connection's event loop, set when it opens

    def __init__(self, url: str, *, timeout: float) -> None:
        # The pool only parses the URL and builds connections; its checkout is never used.
        self._factory = ConnectionPool.from_url(
            url,
            socket_connect_timeout=timeout,
            socket_timeout=None,  # reads wait on the reader task; the watchdog enforces timeout
            retry=Retry(NoBackoff(), 0),
        )
        self._timeout = timeout
        self._connection: AbstractConnection | None = None
        self._reader: asyncio.Task[None] | None = None
        self._pending: deque[_Pending] = deque()
        self._outbox: list[bytes] = []
        self._opening: asyncio.Task[AbstractConnection] | None = None
        self._watchdog: asyncio.TimerHandle | None = None
        self._writes: set[asyncio.Task[None]] = set()

    # -- what the store calls ------------------------------------------------------------

    async def ping(self) -> bool:
        return bool(await self.execute_command("PING") in (b"PONG", "PONG", True))

    async def aclose(self) -> None:
        if self._connection is not None:
            self._drop(self._connection, RedisConnectionError("the client was closed"))
        if self._writes:
            await asyncio.gather(*self._writes, return_exceptions=True)

    async def execute_command(self, *args: Any) -> Any:
        """Send one command and wait for its reply; raise its error reply or a fault."""
        connection = self._connection or await self._connect()
        if connection is not self._connection:
            raise RedisConnectionError("lost the connection to Redis right after opening it")
        # Not asyncio.get_running_loop(): on Python 3.11 that is a getpid() system call.
        loop = self._loop
        future: asyncio.Future[Any] = loop.create_future()
        self._pending.append(_Pending(future, loop.time() + self._timeout))
        if not self._outbox:
            # The first command of this loop turn; the others join it in one write.
            loop.call_soon(self._flush, connection)
        self._outbox.extend(connection.pack_command(*args))
        if self._watchdog is None:
            self._watchdog = loop.call_later(self._timeout / 4, self._watch)
        return await future

    # -- the connection ------------------------------------------------------------------

    async def _connect(self) -> AbstractConnection:
        """The connection, opened by one attempt that every caller arriving meanwhile shares.

        Shared, so that with Redis unreachable N waiting callers fail together within one
        timeout instead of queueing for N attempts; shielded, so that one caller giving up does
        not abort the attempt for the others.
        """
        if self._opening is None or self._opening.done():
            self._opening = asyncio.get_running_loop().create_task(self._open())
            # Retrieved here too, so a failure nobody waited for is not reported as lost.
            self._opening.add_done_callback(lambda task: task.cancelled() or task.exception())
        return await asyncio.shield(self._opening)

    async def _open(self) -> AbstractConnection:
        connection: AbstractConnection = self._factory.make_connection()  # type: ignore[no-untyped-call]
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
        self._connection = connection
        self._loop = asyncio.get_running_loop()
        self._reader = self._loop.create_task(self._read(connection))
        return connection

    def _flush(self, connection: AbstractConnection) -> None:
        if connection is not self._connection or not self._outbox:
            # Dropped meanwhile: its commands have failed, and anything queued since belongs
            # to the next connection, whose own flush is scheduled.
            return
        chunks, self._outbox = self._outbox, []
        write = self._loop.create_task(connection.send_packed_command(chunks, check_health=False))
        self._writes.add(write)
        write.add_done_callback(lambda task: self._written(connection, task))

    def _written(self, connection: AbstractConnection, task: asyncio.Task[None]) -> None:
        self._writes.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            self._drop(connection, exc)

    async def _read(self, connection: AbstractConnection) -> None:
        """Hand each reply to the oldest waiting command, until the connection fails."""
        try:
            while True:
                try:
                    reply = await connection.read_response()
                except ResponseError as exc:
                    reply = exc
                if not self._pending:
                    raise RedisConnectionError("Redis sent a reply nobody asked for")
                future = self._pending.popleft().future
                if future.done():
                    continue  # its caller gave up (cancelled); the reply is discarded
                if isinstance(reply, ResponseError):
                    future.set_exception(reply)
                else:
                    future.set_result(reply)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._drop(connection, exc)

    def _watch(self) -> None:
        """Drop the connection when its oldest command has waited longer than the timeout."""
        self._watchdog = None
        if not self._pending:
            return
        loop = asyncio.get_running_loop()
        if self._pending[0].deadline <= loop.time():
            error = RedisTimeoutError(f"Redis did not answer within {self._timeout}s")
            if self._connection is not None:
                self._drop(self._connection, error)
            self._fail_pending(error)
        else:
            self._watchdog = loop.call_later(self._timeout / 4, self._watch)

    def _drop(self, connection: AbstractConnection, cause: BaseException) -> None:
        """Forget a failed connection and fail every command waiting on it."""
        if connection is not self._connection:
            return
        self._connection = None
        self._outbox = []
        if self._reader is not None and self._reader is not asyncio.current_task():
            self._reader.cancel()
        self._reader = None
        if isinstance(cause, RedisTimeoutError | RedisConnectionError):
            error: Exception = cause
        else:
            error = RedisConnectionError(f"lost the connection to Redis: {cause!r}")
        self._fail_pending(error)
        with contextlib.suppress(RuntimeError):
            closing = asyncio.get_running_loop().create_task(connection.disconnect(nowait=True))
            self._writes.add(closing)
            closing.add_done_callback(self._writes.discard)

    def _fail_pending(self, error: Exception) -> None:
        pending, self._pending = self._pending, deque()
        for waiting in pending:
            if not waiting.future.done():
                waiting.future.set_exception(error)
