"""How the store reaches Redis: one node, the primary Sentinel names, or a Cluster.

The Lua scripts, the one source of each rule, are the same on every backend (store/lua/); only
the client differs:

- ``redis://``, ``rediss://``, ``unix://``: PipelinedRedis, one connection pipelining every
  caller's commands (redis-py's pool cost a quarter of VerifyOtp's CPU: bench/README.md).
- ``REDIS_SENTINELS`` + ``REDIS_SENTINEL_MASTER``: the same pipelined connection, opened to
  whichever node the sentinels name primary (redis-py's SentinelConnectionPool, asked again at
  each connect).
- ``redis+cluster://``, ``rediss+cluster://``: redis-py's ``RedisCluster``. The slot map,
  MOVED/ASK redirects, reconnects and following a node failover are the library's.

Whatever the backend, a command that may have reached Redis is never sent again (the rules
count attempts and sends), and every call ends within the Redis timeout: failing closed,
with UNAVAILABLE, is always allowed; answering twice is not.

``OTP_REDIS_REPLICA_ACKS=N`` adds ``WAIT N`` after the scripts whose writes a failover must not
lose, on the connection that ran them (WAIT counts the replicas holding that connection's
writes). Not on the shared pipelined connection: Redis blocks a connection while its WAIT
waits, so every command queued behind it (sends, other verifies, the readiness ping) would wait
a replica round trip, and keeping a WAIT on the connection of its writes across a reconnect is
more than that client promises. Durable calls take connections of their own from a redis-py
pool: the calls of one event-loop turn and one WAIT after them go as one pipeline on one
connection, so one replica round trip answers for the whole turn. On a Cluster, each call and
its WAIT go to the node that owns the number's slot. docs/scaling.md has what each costs
(``python -m bench.wait_cost`` compares the choices).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, PipelineCommand, RedisCluster
from redis.asyncio.connection import ConnectionPool, SSLConnection, parse_url
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import NoBackoff
from redis.exceptions import (
    AskError,
    ClusterError,
    MovedError,
    ReadOnlyError,
    RedisError,
    ResponseError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from otp_service.config import parse_host_ports
from otp_service.connections.pipelined_redis import PipelinedRedis
from otp_service.store import RedisStore, ReplicaAcks, Rules

CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")
# A MOVED or ASK is followed this many times before a durable verify gives up: one is the
# normal case (the slot moved once), more mean the cluster is being resharded right now.
_MAX_REDIRECTS = 3


@dataclass(frozen=True, kw_only=True)
class RedisTarget:
    """Where Redis is, from REDIS_URL and the REDIS_SENTINEL* settings (config.py checks them)."""

    url: str
    timeout: float
    sentinels: tuple[tuple[str, int], ...] = ()
    sentinel_master: str | None = None
    sentinel_password: str | None = None
    replica_acks: int = 0


def open_store(target: RedisTarget, rules: Rules) -> RedisStore:
    """The store on the Redis ``target`` names; connections open lazily, on first use."""
    timeout, replicas = target.timeout, target.replica_acks
    acks: ReplicaAcks | None = None
    address = described(target)
    if urlsplit(target.url).scheme in CLUSTER_SCHEMES:
        cluster = cluster_client(target.url, timeout)
        if replicas:
            acks = _ClusterAcks(cluster, replicas=replicas, timeout=timeout)
        return RedisStore(_Cluster(cluster, timeout), rules, acks=acks, address=address)
    make_pool = _sentinel_pools(target) if target.sentinels else _url_pools(target)
    if replicas:
        acks = _PooledAcks(make_pool(), replicas=replicas, timeout=timeout)
    return RedisStore(_Primary(make_pool(), timeout), rules, acks=acks, address=address)


def described(target: RedisTarget) -> str:
    """Where ``target`` is, for logs: the URL without its credentials, or the sentinels."""
    if target.sentinels:
        sentinels = ",".join(f"{host}:{port}" for host, port in target.sentinels)
        return f"the primary {target.sentinel_master!r} of the sentinels {sentinels}"
    parts = urlsplit(target.url)
    where = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, where, parts.path, "", ""))


def _url_pools(target: RedisTarget) -> Callable[[], ConnectionPool]:
    """Pools for the one Redis at ``target.url``."""
    return lambda: ConnectionPool.from_url(target.url, **_connection_options(target.timeout))


def _sentinel_pools(target: RedisTarget) -> Callable[[], ConnectionPool]:
    """Pools whose connections go to the primary the sentinels name, found anew at each connect.

    REDIS_URL gives the data nodes' credentials, database and TLS options; the sentinels get
    REDIS_SENTINEL_PASSWORD and the same TLS options.
    """
    options: dict[str, Any] = dict(parse_url(target.url))
    ssl = options.pop("connection_class", None) is SSLConnection
    tls = {name: value for name, value in options.items() if name.startswith("ssl_")}
    # Sentinels are asked in turn; each gets a share of the timeout, connecting to the primary
    # the last share, so a dead sentinel cannot use up a connect's whole budget.
    share = target.timeout / (len(target.sentinels) + 1)
    sentinel = Sentinel(
        target.sentinels,
        sentinel_kwargs={
            "password": target.sentinel_password,
            "ssl": ssl,
            **tls,
            "socket_connect_timeout": share,
            "socket_timeout": share,
        },
    )
    master = target.sentinel_master or ""
    return lambda: SentinelConnectionPool(  # type: ignore[no-untyped-call]
        master, sentinel, ssl=ssl, **options, **_connection_options(target.timeout)
    )


def _connection_options(timeout: float) -> dict[str, Any]:
    """redis-py connection options: no retry inside redis-py, since a command that may have run
    must not be sent again. Reads have no socket timeout: each call is bounded as a whole (an
    asyncio timeout), and an idle connection is not a failed one."""
    return {
        "socket_connect_timeout": timeout,
        "socket_timeout": None,
        "retry": Retry(NoBackoff(), 0),
    }


def cluster_client(url: str, timeout: float) -> RedisCluster:
    """redis-py's cluster client for ``redis+cluster://[user:password@]host:port,...[?options]``."""
    parts = urlsplit(url)
    userinfo, at, hosts = parts.netloc.rpartition("@")
    nodes = parse_host_ports(hosts)
    # redis-py parses credentials and TLS options from a one-node URL; every node seeds the map.
    first = userinfo + at + hosts.split(",")[0].strip()
    scheme = parts.scheme.removesuffix("+cluster")
    one_node = urlunsplit((scheme, first, parts.path, parts.query, ""))
    options: dict[str, Any] = dict(parse_url(one_node))
    ssl = options.pop("connection_class", None) is SSLConnection
    # Every node is a startup node already; a Cluster has only database 0 (config.py checks).
    for name in ("host", "port", "db"):
        options.pop(name, None)
    return RedisCluster(
        startup_nodes=[ClusterNode(host, port) for host, port in nodes],
        ssl=ssl,
        **options,
        **_connection_options(timeout),
    )


class _Primary:
    """PipelinedRedis that moves to a new connection when its node is no longer the primary.

    After a failover the old primary becomes a replica, but a connection to it stays open:
    writes there answer READONLY (a script's as an error naming it), and would forever. Such an
    answer fails its caller with UNAVAILABLE, and the next command opens a new connection,
    which goes where the sentinels (or the DNS name in REDIS_URL) point now.

    Before it is turned into a replica, the old primary still takes writes that the failover
    is about to discard. So with Sentinel, each readiness ping (once a second) also asks the
    sentinels which node is primary, and moves when it is no longer the connection's.
    """

    def __init__(self, pool: ConnectionPool, timeout: float) -> None:
        self._pool = pool
        self._timeout = timeout
        self._client = PipelinedRedis(pool, timeout=timeout)
        self._closing: set[asyncio.Task[None]] = set()

    async def execute_command(self, *args: Any) -> Any:
        client = self._client
        try:
            return await client.execute_command(*args)
        except ResponseError as exc:
            if _on_a_replica(exc):
                self._move_from(client)
            raise

    async def ping(self) -> bool:
        pool = self._pool
        if isinstance(pool, SentinelConnectionPool) and pool.master_address is not None:
            # Sentinels that do not answer say nothing about the primary: it is pinged as is.
            with contextlib.suppress(RedisError, OSError):
                named = await pool.sentinel_manager.discover_master(pool.service_name)
                if named != pool.master_address:
                    self._move_from(self._client)
        return await self._client.ping()

    def _move_from(self, client: PipelinedRedis) -> None:
        """Leave ``client``'s connection (once); the next command opens another."""
        if client is self._client:
            self._client = PipelinedRedis(self._pool, timeout=self._timeout)
            closing = asyncio.get_running_loop().create_task(client.aclose())
            self._closing.add(closing)
            closing.add_done_callback(self._closing.discard)

    async def aclose(self) -> None:
        await self._client.aclose()
        await asyncio.gather(*self._closing)
        await _close(self._pool)


async def _close(pool: ConnectionPool) -> None:
    """Close a pool's connections, and a Sentinel pool's connections to the sentinels too."""
    await pool.disconnect()
    if isinstance(pool, SentinelConnectionPool):
        for sentinel in pool.sentinel_manager.sentinels:
            await sentinel.aclose()


def _on_a_replica(error: ResponseError) -> bool:
    """Whether Redis refused a write because it is a replica (directly, or inside a script)."""
    return isinstance(error, ReadOnlyError) or "READONLY" in str(error)


class _Cluster:
    """RedisCluster as the store's client: each command ends within ``timeout``.

    redis-py's own bound is per node operation; a command can also wait for the slot map to be
    fetched or follow redirects. Cancelling it is safe: redis-py drops a connection whose reply
    was not read.
    """

    def __init__(self, cluster: RedisCluster, timeout: float) -> None:
        self._cluster = cluster
        self._timeout = timeout

    async def execute_command(self, *args: Any) -> Any:
        async with asyncio.timeout(self._timeout):
            return await self._cluster.execute_command(*args)

    async def ping(self) -> bool:
        async with asyncio.timeout(self._timeout):
            return bool(await self._cluster.ping())

    async def aclose(self) -> None:
        await self._cluster.aclose()


def _wait_ms(timeout: float) -> int:
    """WAIT's own timeout: half the Redis timeout, so the whole call still ends within it.

    Never 0, which would make WAIT block until the replicas answer, however long.
    """
    return max(1, int(timeout * 500))


# A command waiting for its batch: its arguments, and where its reply and WAIT's count go.
_Waiting = tuple[tuple[Any, ...], "asyncio.Future[tuple[Any, int]]"]


class _PooledAcks:
    """ReplicaAcks over a redis-py pool: the commands of one event-loop turn, then one WAIT.

    They go as one redis-py pipeline, which sends them on one connection, in order, and reads
    every reply before the connection goes back to the pool; WAIT counts every write its
    connection made before it, so one WAIT answers for the whole turn (see the module docstring
    for why not on the pipelined connection).
    """

    def __init__(self, pool: ConnectionPool, *, replicas: int, timeout: float) -> None:
        self._pool = pool
        self._redis = aioredis.Redis(connection_pool=pool)
        self.replicas = replicas
        self._timeout = timeout
        self._wait = ("WAIT", replicas, _wait_ms(timeout))
        self._turn: list[_Waiting] | None = None
        self._batches: set[asyncio.Task[None]] = set()

    async def execute_then_wait(self, *args: Any) -> tuple[Any, int]:
        loop = asyncio.get_running_loop()
        if self._turn is None:
            # The first command of this turn; the others join it, and the batch leaves next turn.
            self._turn = []
            loop.call_soon(self._send_turn)
        reply: asyncio.Future[tuple[Any, int]] = loop.create_future()
        self._turn.append((args, reply))
        return await reply

    def _send_turn(self) -> None:
        turn, self._turn = self._turn or [], None
        batch = asyncio.get_running_loop().create_task(self._send(turn))
        self._batches.add(batch)
        batch.add_done_callback(self._batches.discard)

    async def _send(self, turn: list[_Waiting]) -> None:
        try:
            async with asyncio.timeout(self._timeout):
                pipe = self._redis.pipeline(transaction=False)
                for args, _ in turn:
                    pipe.execute_command(*args)
                pipe.execute_command(*self._wait)
                *replies, acked = await pipe.execute(raise_on_error=False)
        except Exception as exc:
            for _, waiting in turn:
                if not waiting.done():
                    waiting.set_exception(exc)
            return
        if any(isinstance(r, ResponseError) and _on_a_replica(r) for r in replies) or (
            isinstance(acked, int) and acked < self.replicas
        ):
            # On a replica, or on a primary that lost its replicas (as a deposed one does): the
            # next connections go where the sentinels (or REDIS_URL) point now.
            await self._pool.disconnect()
        for (_, waiting), reply in zip(turn, replies, strict=True):
            if not waiting.done():  # its caller may have given up
                try:
                    waiting.set_result(_replies(reply, acked))
                except Exception as exc:
                    waiting.set_exception(exc)

    async def aclose(self) -> None:
        await asyncio.gather(*self._batches, return_exceptions=True)
        await _close(self._pool)


class _ClusterAcks:
    """ReplicaAcks on a Cluster: the command and its WAIT on one connection to the slot's primary.

    Sent straight to the node (not through RedisCluster's pipeline, which would send WAIT, a
    command without keys, to an arbitrary node). So redirects are followed here: MOVED updates
    the client's slot map, as redis-py does for its own commands, and ASK is answered with
    ASKING on the same connection. A lost node makes the client map the cluster afresh on its
    next command, again as redis-py does itself.
    """

    def __init__(self, cluster: RedisCluster, *, replicas: int, timeout: float) -> None:
        self._cluster = cluster
        self.replicas = replicas
        self._timeout = timeout
        self._wait = ("WAIT", replicas, _wait_ms(timeout))

    async def execute_then_wait(self, *args: Any) -> tuple[Any, int]:
        async with asyncio.timeout(self._timeout):
            cluster = await self._cluster.initialize()
            key = args[3]  # EVALSHA/EVAL sha-or-source numkeys key...: the slot's first key
            node = cluster.get_node_from_key(key)
            asking = False
            for _ in range(_MAX_REDIRECTS):
                if node is None:
                    raise ClusterError(f"no node serves the slot of {key!r}")
                prefix: Sequence[tuple[Any, ...]] = [("ASKING",)] if asking else []
                commands = [
                    PipelineCommand(i, *command)
                    for i, command in enumerate([*prefix, args, self._wait])
                ]
                try:
                    await node.execute_pipeline(commands)
                except (RedisConnectionError, RedisTimeoutError):
                    await cluster.aclose()
                    raise
                reply, acked = commands[-2].result, commands[-1].result
                if isinstance(reply, MovedError):  # before AskError: MovedError is one
                    await cluster.nodes_manager.move_slot(reply)
                    node, asking = cluster.get_node_from_key(key), False
                elif isinstance(reply, AskError):
                    redirected = cluster.get_node(host=reply.host, port=reply.port)
                    if redirected is None:
                        raise reply
                    node, asking = redirected, True
                else:
                    return _replies(reply, acked)
        raise ClusterError(f"still redirected after {_MAX_REDIRECTS} tries")

    async def aclose(self) -> None:
        pass  # the connections are the cluster client's, closed with it


def _replies(reply: Any, acked: Any) -> tuple[Any, int]:
    """A command's reply and WAIT's, raising either's error reply."""
    for answer in (reply, acked):
        if isinstance(answer, Exception):
            raise answer
    return reply, int(acked)
