"""OTP_REDIS_REPLICA_ACKS: a verify is answered only once replicas hold what it wrote.

Redis replicates asynchronously: a failover right after a verify could bring back a used code
or an attempt already counted. With acks, VERIFIED (or WRONG_CODE) is said only after WAIT saw
the replicas confirm; without their confirmation the answer is UNAVAILABLE, and the code stays
used on the primary.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import pytest
from otp.v1 import otp_pb2, otp_pb2_grpc

from otp_service.connections.redis_backends import RedisTarget, open_store
from otp_service.errors import StoreUnavailable
from otp_service.store import Stored
from tests.conftest import PHONE, MakeService, eventually, send, verify, wrong_code
from tests.fake_interakt import FakeInterakt, accepted
from tests.redis_deployments import RedisProcess, wait_until
from tests.redis_proxy import RedisProxy
from tests.test_idempotency import received, send_with
from tests.test_store_contract import RULES

CODES = f"otp:{{{PHONE}}}:c"


@pytest.fixture
def primary_and_replica() -> Iterator[tuple[RedisProcess, RedisProcess]]:
    primary = RedisProcess().start()
    replica = RedisProcess("--replicaof", "127.0.0.1", str(primary.port)).start()
    replica.wait_in_sync()
    yield primary, replica
    replica.close()
    primary.close()


async def in_sync(replica: RedisProcess) -> None:
    """Wait until ``replica`` is in sync with its primary (in a thread: the replication link
    may go through a proxy on this event loop)."""
    await asyncio.to_thread(replica.wait_in_sync)


@dataclass
class Durable:
    """The service waiting for one replica, and a code it sent."""

    stub: otp_pb2_grpc.OtpServiceStub
    primary: RedisProcess
    replica: RedisProcess
    code: str


@pytest.fixture
async def durable(
    make_service: MakeService,
    primary_and_replica: tuple[RedisProcess, RedisProcess],
    interakt: FakeInterakt,
) -> Durable:
    primary, replica = primary_and_replica
    stub = await make_service(
        redis_url=f"redis://{primary.address}/0", redis_replica_acks=1, redis_timeout_seconds=0.5
    )
    await send(stub)
    return Durable(stub, primary, replica, interakt.received[0].code)


def wait_calls(node: RedisProcess) -> int:
    with node.client() as client:
        return int(client.info("commandstats").get("cmdstat_wait", {}).get("calls", 0))


async def test_a_verify_is_answered_once_the_replica_holds_it(durable: Durable) -> None:
    stub, primary, code = durable.stub, durable.primary, durable.code
    with durable.replica.client() as client:
        wait_until(lambda: client.exists(CODES), "the code on the replica")
        answer = await verify(stub, wrong_code(code))
        assert answer.attempts_remaining == 4
        # WAIT returned only once the replica had the attempt: it is there when we are told.
        assert client.hget(CODES, "n") == b"1"
        waits = wait_calls(primary)
        assert (await verify(stub, code)).verified
        assert not client.exists(CODES)
    assert wait_calls(primary) == waits + 1


async def test_without_the_replica_a_verify_is_unavailable_and_the_code_stays_used(
    durable: Durable, interakt: FakeInterakt
) -> None:
    stub, primary, replica, code = durable.stub, durable.primary, durable.replica, durable.code
    await asyncio.to_thread(replica.stop, signal.SIGKILL)

    with pytest.raises(grpc.aio.AioRpcError) as wrong:
        await verify(stub, wrong_code(code))
    assert wrong.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "no replica confirmed" in (wrong.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as right:
        await verify(stub, code)
    assert right.value.code() == grpc.StatusCode.UNAVAILABLE
    with primary.client() as client:
        assert not client.exists(CODES)  # the right code was used, though not reported
    # A verify that writes nothing needs no replica: the answer is true as it stands.
    answer = await verify(stub, code)
    assert answer.outcome == otp_pb2.VERIFY_OUTCOME_NO_ACTIVE_CODE

    await asyncio.to_thread(replica.start)  # the replica is back: verifies are answered again
    await in_sync(replica)
    await send(stub, "+917003848502")
    assert (await verify(stub, interakt.received[-1].code, "+917003848502")).verified


async def test_an_idempotent_send_answered_before_a_failover_is_answered_the_same_after(
    make_service: MakeService, interakt: FakeInterakt
) -> None:
    """What a send's caller was told (its message id, the answer repeats of its key get) is
    recorded until a replica confirms it, so a failover cannot lose it: a repeat after one gets
    that answer, and nothing is sent twice.

    The replica gets its primary's writes through a proxy that then drops them, as a replica
    that falls behind would: it holds the send's code (confirmed before the message went out),
    not Interakt's answer. The primary is lost, the replica promoted, and REDIS_URL (a proxy,
    as a DNS name would) moved to it.
    """
    primary = RedisProcess().start()
    link = await RedisProxy(primary.port).start()  # the replication link
    replica = RedisProcess("--replicaof", "127.0.0.1", str(link.port)).start()
    newcomer = RedisProcess()
    service_link = await RedisProxy(primary.port).start()  # REDIS_URL
    try:
        await in_sync(replica)
        stub = await make_service(
            redis_url=service_link.url, redis_replica_acks=1, redis_timeout_seconds=0.5
        )
        hold = asyncio.Event()
        interakt.answer(accepted("msg-1", hold=hold))
        first = asyncio.ensure_future(send_with(stub, "key-1"))
        await eventually(received(interakt, 1))  # the code is stored, and on the replica
        link.drop()  # from now on the replica gets nothing
        hold.set()
        answer = await first  # the message is on its way: the caller is told so
        assert answer.message_id == "msg-1"

        await asyncio.to_thread(primary.stop, signal.SIGKILL)
        with replica.client() as client:
            client.execute_command("REPLICAOF", "NO", "ONE")
            [claim] = client.keys(f"otp:{{{PHONE}}}:k:*")
            assert client.hget(claim, "done") is None  # the failover lost the answer
        service_link.redis_port = replica.port
        service_link.cut()
        # The new primary gets a replica of its own, so writes can be confirmed again.
        await asyncio.to_thread(newcomer.start)
        with newcomer.client() as client:
            client.execute_command("REPLICAOF", "127.0.0.1", str(replica.port))
        await in_sync(newcomer)

        async def answer_recorded_again() -> bool:
            with replica.client() as client:
                return client.hget(claim, "done") is not None

        await eventually(answer_recorded_again)  # by the service, still trying to record it
        # The caller repeats, as the clients do while the answer is UNAVAILABLE (connections
        # the cut left are found dead one call at a time).
        repeats: list[otp_pb2.SendOtpResponse] = []

        async def repeated() -> bool:
            try:
                repeats.append(await send_with(stub, "key-1"))
            except grpc.aio.AioRpcError as error:
                if error.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
            return bool(repeats)

        await eventually(repeated)
        assert repeats == [answer]
        assert len(interakt.received) == 1
    finally:
        for node in (newcomer, replica, primary):
            node.close()
        await link.close()
        await service_link.close()


async def test_a_primary_that_lost_its_replicas_is_left_for_where_redis_url_points_now(
    primary_and_replica: tuple[RedisProcess, RedisProcess],
) -> None:
    """A failover promoted the replica; the old primary, not yet told, still takes writes but
    no replica confirms them. The call that meets it is UNAVAILABLE, and the pool's
    connections are dropped: the next call connects to the address behind REDIS_URL now."""
    old, promoted = primary_and_replica
    proxy = await RedisProxy(old.port).start()
    store = open_store(RedisTarget(url=proxy.url, timeout=0.5, replica_acks=1), RULES)
    other = RedisProcess().start()
    try:
        assert isinstance(await store.add_code(PHONE, "a" * 32, "send-1"), Stored)
        with promoted.client() as client, other.client() as other_client:
            client.replicaof("NO", "ONE")
            other_client.replicaof("127.0.0.1", promoted.port)
        await in_sync(other)
        proxy.redis_port = promoted.port
        with pytest.raises(StoreUnavailable):
            await store.add_code("+917003848502", "b" * 32, "send-2")
        assert isinstance(await store.add_code("+917003848503", "c" * 32, "send-3"), Stored)
        with promoted.client() as client:
            assert client.exists("otp:{+917003848503}:c")
    finally:
        await store.close()
        await proxy.close()
        other.close()
