"""``python -m bench.wait_cost``: where a durable verify's WAIT should go (docs/scaling.md).

WAIT blocks the connection it is sent on until the replicas confirm. This runs the verify script
against a local primary with one replica, 64 callers at a time, four ways:

- no WAIT: the store as deployed without OTP_REDIS_REPLICA_ACKS (the pipelined connection);
- one WAIT per turn, pooled: OTP_REDIS_REPLICA_ACKS=1 as built (the verifies of one event-loop
  turn and one WAIT after them in a redis-py pipeline, on a pooled connection of its own);
- WAIT per verify, shared: each verify and its WAIT queued on the one pipelined connection;
- one WAIT per turn, shared: the verifies queued in one event-loop turn, then a single WAIT
  after them on the pipelined connection (WAIT counts every earlier write of its connection).

The last two need WAIT to stay on the connection of the writes it covers, which the pipelined
client does not promise across a reconnect; they are measured here only, not used.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable
from typing import Any

from otp_service.connections.embedded_redis import EmbeddedRedis
from otp_service.connections.pipelined_redis import PipelinedRedis
from otp_service.connections.redis_backends import RedisTarget, open_store
from otp_service.store import RedisStore, Store
from tests.redis_deployments import RedisProcess, wait_until
from tests.test_store_contract import RULES as CONTRACT_RULES

CALLERS = 64
VERIFIES = 20_000
PHONE = "+917003848501"
WRONG = "0" * 32
# The contract test's limits, but each way of running sends the number a code and spends its
# attempts again, so neither the cooldown nor the wrong-code budget may stop the next way.
RULES = dataclasses.replace(
    CONTRACT_RULES, resend_cooldown_seconds=0, max_failed_verifies_per_hour=1_000
)
WAIT = ("WAIT", 1, 500)


class WaitEach:
    """The pipelined connection, each command followed by a WAIT queued right behind it."""

    def __init__(self, client: PipelinedRedis) -> None:
        self._client = client

    async def execute_command(self, *args: Any) -> Any:
        reply, _ = await asyncio.gather(
            self._client.execute_command(*args), self._client.execute_command(*WAIT)
        )
        return reply

    async def ping(self) -> bool:
        return await self._client.ping()

    async def aclose(self) -> None:
        await self._client.aclose()


class WaitPerTurn(WaitEach):
    """The pipelined connection, one WAIT after the commands queued in an event-loop turn."""

    def __init__(self, client: PipelinedRedis) -> None:
        super().__init__(client)
        self._wait: asyncio.Future[Any] | None = None

    async def execute_command(self, *args: Any) -> Any:
        reply = asyncio.ensure_future(self._client.execute_command(*args))
        if self._wait is None:
            loop = asyncio.get_running_loop()
            self._wait = loop.create_future()
            loop.call_soon(self._send_wait, self._wait)
        wait = self._wait
        result = await reply
        await wait
        return result

    def _send_wait(self, wait: asyncio.Future[Any]) -> None:
        # Runs after the commands of this turn were queued: their tasks started before it.
        self._wait = None
        sent = asyncio.ensure_future(self._client.execute_command(*WAIT))
        sent.add_done_callback(lambda done: wait.set_result(done.result()))


async def rate(store: Store) -> float:
    """Verifies a second, ``CALLERS`` at a time, of a number over its attempt budget: each one
    still counts the attempt (a write), so each needs the replica's confirmation."""
    await store.add_code(PHONE, "a" * 32, "seed")
    left = VERIFIES

    async def caller() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            await store.verify(PHONE, WRONG)

    started = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(CALLERS)))
    elapsed = time.perf_counter() - started
    await store.close()
    return VERIFIES / elapsed


async def measure(url: str) -> dict[str, float]:
    target = RedisTarget(url=url, timeout=1.0)
    shared: Callable[[type[WaitEach]], Store] = lambda kind: RedisStore(  # noqa: E731
        kind(PipelinedRedis.from_url(url, timeout=1.0)), RULES
    )
    return {
        "no WAIT": await rate(open_store(target, RULES)),
        "one WAIT per turn, pooled": await rate(
            open_store(dataclasses.replace(target, replica_acks=1), RULES)
        ),
        "WAIT per verify, shared": await rate(shared(WaitEach)),
        "one WAIT per turn, shared": await rate(shared(WaitPerTurn)),
    }


def main() -> None:
    with EmbeddedRedis() as primary:
        replica = RedisProcess("--replicaof", "127.0.0.1", str(primary.port)).start()
        try:
            with replica.client() as client:
                wait_until(lambda: client.info("replication")["master_link_status"] == "up", "sync")
            results = asyncio.run(measure(primary.url))
        finally:
            replica.close()
    base = results["no WAIT"]
    print(f"{VERIFIES} verifies, {CALLERS} callers at a time, one replica on loopback:")
    for name, per_second in results.items():
        print(f"  {name:28} {per_second:8,.0f}/s  ({per_second / base:.0%} of no WAIT)")


if __name__ == "__main__":
    main()
