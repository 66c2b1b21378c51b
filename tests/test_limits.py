"""Send limits and attempt budgets at their edges, and what each call costs in Redis."""

from __future__ import annotations

import asyncio

import grpc
import pytest
import redis
from otp.v1 import otp_pb2

from tests.conftest import PHONE, MakeService, send, verify, wrong_code
from tests.fake_interakt import NOT_A_CONTACT, FakeInterakt, refusal

SENDS = f"otp:{{{PHONE}}}:s"


async def test_send_is_allowed_again_after_the_cooldown(
    make_service: MakeService, interakt: FakeInterakt
) -> None:
    stub = await make_service(resend_cooldown_seconds=1)
    assert (await send(stub)).resend_after_seconds == 1
    with pytest.raises(grpc.aio.AioRpcError):
        await send(stub)
    await asyncio.sleep(1.1)
    await send(stub)
    assert len(interakt.received) == 2


async def test_hourly_cap_is_a_rolling_hour(
    make_service: MakeService, redis_db: redis.Redis
) -> None:
    stub = await make_service(resend_cooldown_seconds=0, max_sends_per_hour=2)
    assert (await send(stub)).resend_after_seconds == 0
    # The send that reaches the cap says the next one waits for the hour, not the cooldown.
    assert 3_590 <= (await send(stub)).resend_after_seconds <= 3_600
    with pytest.raises(grpc.aio.AioRpcError):
        await send(stub)
    # Age the oldest send past the hour, as the clock would.
    oldest, score = redis_db.zrange(SENDS, 0, 0, withscores=True)[0]
    redis_db.zadd(SENDS, {oldest: score - 3_600_000})
    await send(stub)
    with pytest.raises(grpc.aio.AioRpcError):
        await send(stub)


async def test_failed_sends_do_not_count_against_the_cap(
    make_service: MakeService, interakt: FakeInterakt
) -> None:
    stub = await make_service(resend_cooldown_seconds=30, max_sends_per_hour=2)
    interakt.answer(*[refusal(NOT_A_CONTACT)] * 3)
    for _ in range(3):
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await send(stub)
        assert failed.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    await send(stub)
    assert (await verify(stub, interakt.received[-1].code)).verified


async def test_a_failed_resend_does_not_refill_the_budget(
    make_service: MakeService, interakt: FakeInterakt
) -> None:
    stub = await make_service(max_attempts=3, resend_cooldown_seconds=0)
    await send(stub)
    first = interakt.received[0].code
    assert (await verify(stub, wrong_code(first))).attempts_remaining == 2
    interakt.answer(refusal(NOT_A_CONTACT))
    with pytest.raises(grpc.aio.AioRpcError):
        await send(stub)
    undelivered = interakt.received[1].code
    guess = wrong_code(first, undelivered)
    assert (await verify(stub, guess)).attempts_remaining == 1
    if undelivered != first:
        wrong = await verify(stub, undelivered)
        assert wrong.outcome == otp_pb2.VERIFY_OUTCOME_WRONG_CODE
        assert wrong.attempts_remaining == 0
    else:
        assert (await verify(stub, guess)).attempts_remaining == 0
    assert (await verify(stub, first)).outcome == otp_pb2.VERIFY_OUTCOME_TOO_MANY_ATTEMPTS


async def test_an_expired_first_code_does_not_verify_while_a_resent_one_lives(
    make_service: MakeService, interakt: FakeInterakt, redis_db: redis.Redis
) -> None:
    stub = await make_service(resend_cooldown_seconds=0)
    await send(stub)
    await send(stub)
    first, second = (message.code for message in interakt.received)
    if first == second:
        pytest.skip("both sends drew the same code")
    # Expire the first code only, as its own TTL would.
    codes = f"otp:{{{PHONE}}}:c"
    for field, expiry in redis_db.hgetall(codes).items():
        if field != b"n" and int(expiry) == min(
            int(v) for f, v in redis_db.hgetall(codes).items() if f != b"n"
        ):
            redis_db.hset(codes, field, 1)
            break
    assert (await verify(stub, first)).outcome == otp_pb2.VERIFY_OUTCOME_WRONG_CODE
    assert (await verify(stub, second)).verified


async def test_verify_is_one_redis_command(
    make_service: MakeService, interakt: FakeInterakt, redis_db: redis.Redis
) -> None:
    stub = await make_service()
    await send(stub)
    await verify(stub, wrong_code(interakt.received[0].code))  # scripts are loaded by now
    redis_db.config_resetstat()
    await verify(stub, interakt.received[0].code)
    calls = {
        name.removeprefix("cmdstat_"): stat["calls"]
        for name, stat in redis_db.info("commandstats").items()
    }
    # Redis counts the commands a script runs too; those are the verify script's own.
    assert calls.pop("evalsha") == 1
    assert set(calls) <= {"config", "info", "exists", "hincrby", "hget", "time", "del", "lindex"}
