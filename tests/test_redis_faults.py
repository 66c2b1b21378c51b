"""Redis faults in the middle of a send or a verify, through the real server and a real Redis.

A send that fails, however it fails, leaves nothing once Redis answers again: no code, no count
against the number's limits or the caller's and account's budgets, even when the withdrawal
reaches Redis before the send's own late command. Redis is made late with DEBUG SLEEP and
CLIENT PAUSE, and a proxy (tests/redis_proxy.py) delays one direction of one connection.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import grpc
import pytest
import redis
from otp.v1 import otp_pb2

from otp_service.connections.embedded_redis import EmbeddedRedis
from tests.conftest import (
    CALLER,
    PHONE,
    MakeService,
    SilentRedis,
    eventually,
    send,
    verify,
)
from tests.fake_interakt import Answer, FakeInterakt
from tests.redis_proxy import RedisProxy
from tests.test_error_details import error_info

OTHER_PHONE = "+917003848502"
CALLER_SENDS = f"otp:{{senders}}:caller-sends:{CALLER}"
ACCOUNT_SENDS = "otp:{senders}:account-sends"


def what_a_send_left(db: redis.Redis, phone: str = PHONE) -> dict[str, int]:
    """What stays of sends to ``phone``: codes, and sends counted anywhere."""
    return {
        "codes": db.hlen(f"otp:{{{phone}}}:c") - db.hexists(f"otp:{{{phone}}}:c", "n"),
        "number's sends": db.zcard(f"otp:{{{phone}}}:s"),
        "caller's sends": db.zcard(CALLER_SENDS),
        "account's sends": db.zcard(ACCOUNT_SENDS),
    }


# After one successful send to OTHER_PHONE: what the failed send to PHONE must leave.
NOTHING_BUT_THE_FIRST_SEND = {
    "codes": 0,
    "number's sends": 0,
    "caller's sends": 1,
    "account's sends": 1,
}


@pytest.fixture
def db(private_redis: EmbeddedRedis) -> redis.Redis:
    return redis.Redis(port=private_redis.port)


@pytest.fixture
async def proxy(private_redis: EmbeddedRedis) -> AsyncIterator[RedisProxy]:
    in_front = await RedisProxy(private_redis.port).start()
    yield in_front
    await in_front.close()


async def settles_to(db: redis.Redis, expected: dict[str, int]) -> None:
    """Wait until what the failed send left is ``expected`` (its withdrawal runs after it)."""

    async def settled() -> bool:
        return await asyncio.to_thread(what_a_send_left, db) == expected

    await eventually(settled)


async def test_a_send_redis_runs_late_leaves_nothing_and_its_caller_is_not_held(
    make_service: MakeService, private_redis: EmbeddedRedis, db: redis.Redis
) -> None:
    """DEBUG SLEEP: the send's command runs when Redis wakes, long after the caller was told."""
    stub = await make_service(redis_url=private_redis.url, redis_timeout_seconds=0.3)
    await send(stub, OTHER_PHONE)  # the scripts are loaded: the late command really runs
    sleeper = asyncio.create_task(
        asyncio.to_thread(redis.Redis(port=private_redis.port).execute_command, "DEBUG", "SLEEP", 3)
    )
    await eventually(lambda: asleep(private_redis.port))
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await send(stub)
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
    # Told within its own Redis timeout; the withdrawal waits for Redis in the background.
    assert not sleeper.done()
    await sleeper
    await settles_to(db, NOTHING_BUT_THE_FIRST_SEND)


async def test_the_callers_deadline_passing_while_redis_is_paused_leaves_nothing(
    make_service: MakeService, private_redis: EmbeddedRedis, db: redis.Redis
) -> None:
    """The call is cancelled while its code-storing command waits in Redis."""
    stub = await make_service(redis_url=private_redis.url, redis_timeout_seconds=30)
    await send(stub, OTHER_PHONE)
    db.execute_command("CLIENT", "PAUSE", 1500, "ALL")
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await stub.SendOtp(otp_pb2.SendOtpRequest(phone_number=PHONE), timeout=0.3)
    assert failed.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await settles_to(db, NOTHING_BUT_THE_FIRST_SEND)


async def test_the_callers_deadline_passing_during_delivery_leaves_the_send_in_doubt(
    make_service: MakeService, interakt: FakeInterakt, private_redis: EmbeddedRedis, db: redis.Redis
) -> None:
    stub = await make_service(redis_url=private_redis.url)
    await send(stub, OTHER_PHONE)
    release = asyncio.Event()
    interakt.answer(Answer(body={"result": True, "id": "too-late"}, hold=release))
    try:
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await stub.SendOtp(otp_pb2.SendOtpRequest(phone_number=PHONE), timeout=0.5)
    finally:
        release.set()
    # The server answers before the deadline (it keeps time for Redis out of the delivery's):
    # the message is in Interakt's hands, so it may arrive, and its code stays.
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE, failed.value.details()
    assert error_info(failed.value).reason == "DELIVERY_IN_DOUBT"
    assert (await verify(stub, interakt.received[-1].code)).verified


@pytest.mark.parametrize(
    ("held", "what"),
    [
        (PHONE.encode(), "the command storing the code"),
        (b"{senders}", "the command counting the send against the budgets"),
    ],
)
async def test_a_withdrawal_that_reaches_redis_before_the_sends_late_command(
    make_service: MakeService,
    proxy: RedisProxy,
    db: redis.Redis,
    held: bytes,
    what: str,
) -> None:
    """The send's command is held on its (dropped) connection while the withdrawal goes out on
    a new one and runs; then Redis gets the late command, which must store and count nothing."""
    stub = await make_service(redis_url=proxy.url, redis_timeout_seconds=0.3)
    await send(stub, OTHER_PHONE)
    proxy.hold_next(held)
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await send(stub)
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
    assert proxy.holding.is_set(), f"{what} was not held"

    async def withdrawn() -> bool:
        return bool(await asyncio.to_thread(db.keys, "otp:*:withdrawn:*"))

    await eventually(withdrawn)
    [answer] = await proxy.release()
    assert not answer.startswith(b"-"), answer  # it ran (an error reply would change nothing)
    assert what_a_send_left(db) == NOTHING_BUT_THE_FIRST_SEND


async def test_a_verify_that_failed_says_it_may_have_run(
    make_service: MakeService, private_redis: EmbeddedRedis
) -> None:
    """Redis took the command and did not answer in time (DEBUG SLEEP): it may have counted the
    attempt or used the code before the answer was lost, so the caller must not promise the user
    a free retry."""
    stub = await make_service(redis_url=private_redis.url, redis_timeout_seconds=0.2)
    await verify(stub, "123456")  # connected, the scripts loaded: the next verify reaches Redis
    sleeper = asyncio.create_task(
        asyncio.to_thread(redis.Redis(port=private_redis.port).execute_command, "DEBUG", "SLEEP", 1)
    )
    await eventually(lambda: asleep(private_redis.port))
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await verify(stub, "123456")
    await sleeper
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
    assert failed.value.details() == (
        "storage is unavailable, try again shortly; the check may still have run, counting "
        "this attempt or using up the code"
    )


async def test_a_verify_that_never_reached_redis_says_only_that(
    make_service: MakeService, silent_redis: SilentRedis
) -> None:
    """A Redis that never finishes the connection's handshake: the verify was never sent, so
    nothing was counted or used."""
    stub = await make_service(redis_url=silent_redis.url, redis_timeout_seconds=0.2)
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await verify(stub, "123456")
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
    assert failed.value.details() == "storage is unavailable, try again shortly"


async def asleep(port: int) -> bool:
    """Whether Redis on ``port`` leaves a PING unanswered for a while (DEBUG SLEEP)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"PING\r\n")
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(0.2):
                await reader.readline()
                return False
        return True
    finally:
        writer.close()
