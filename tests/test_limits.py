"""Send limits and attempt budgets at their edges, and what each call costs in Redis."""

from __future__ import annotations

import grpc
import pytest
import redis
from otp.v1 import otp_pb2

from tests.conftest import PHONE, MakeService, age, retry_delay, send, verify, wrong_code
from tests.fake_interakt import NOT_A_CONTACT, Answer, FakeInterakt, refusal
from tests.test_error_details import error_info

# The rules hold on every Redis deployment: one node, a Cluster, Sentinel's primary.
pytestmark = pytest.mark.redis_backends

SENDS = f"otp:{{{PHONE}}}:s"


async def test_send_is_allowed_again_after_the_cooldown(
    make_service: MakeService, interakt: FakeInterakt, redis_db: redis.Redis
) -> None:
    stub = await make_service(resend_cooldown_seconds=30)
    assert (await send(stub)).resend_after_seconds == 30
    age(redis_db, SENDS, 25)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await send(stub)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert 4 <= retry_delay(refused.value) <= 5
    age(redis_db, SENDS, 6)
    await send(stub)
    assert len(interakt.received) == 2


async def test_hourly_cap_is_a_rolling_hour(
    make_service: MakeService, redis_db: redis.Redis
) -> None:
    stub = await make_service(resend_cooldown_seconds=0, max_sends_per_hour=2)
    assert (await send(stub)).resend_after_seconds == 0
    # The send that reaches the cap says the next one waits for the hour, not the cooldown.
    assert 3_590 <= (await send(stub)).resend_after_seconds <= 3_600
    # Sends 59 and 2 minutes old still count...
    older, newer = (member for member, _ in redis_db.zrange(SENDS, 0, -1, withscores=True))
    now_ms = redis_time_ms(redis_db)
    redis_db.zadd(SENDS, {older: now_ms - 59 * 60_000, newer: now_ms - 2 * 60_000})
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await send(stub)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "2 codes an hour" in (refused.value.details() or "")
    assert 59 <= retry_delay(refused.value) <= 61  # when the 59-minute-old one leaves the hour
    # ...and one 61 minutes old does not.
    redis_db.zadd(SENDS, {older: now_ms - 61 * 60_000})
    await send(stub)
    with pytest.raises(grpc.aio.AioRpcError):
        await send(stub)


async def test_sends_interakt_refused_count_against_the_cooldown_and_the_cap(
    make_service: MakeService, interakt: FakeInterakt
) -> None:
    """A number Interakt refuses is not retried at full speed: each refused send reached it."""
    stub = await make_service(resend_cooldown_seconds=30, max_sends_per_hour=2)
    interakt.answer(*[refusal(NOT_A_CONTACT)] * 3)
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await send(stub)
    assert failed.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(grpc.aio.AioRpcError) as cooling:
        await send(stub)
    assert error_info(cooling.value).reason == "RESEND_COOLDOWN"
    capped = await make_service(resend_cooldown_seconds=0, max_sends_per_hour=2)
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await send(capped)
    assert failed.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(grpc.aio.AioRpcError) as over:
        await send(capped)
    assert error_info(over.value).reason == "HOURLY_SEND_CAP"
    assert len(interakt.received) == 2


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
    # Redis 7 names subcommands ("config|resetstat"); 6.2 names only the command.
    calls = {
        name.removeprefix("cmdstat_").partition("|")[0]: stat["calls"]
        for name, stat in redis_db.info("commandstats").items()
    }
    # Redis counts the commands a script runs too; those are the verify script's own.
    assert calls.pop("evalsha") == 1
    assert set(calls) <= {"config", "info", "exists", "hincrby", "hget", "time", "del", "lindex"}


def redis_time_ms(db: redis.Redis) -> int:
    seconds, microseconds = db.time()
    return seconds * 1000 + microseconds // 1000


async def test_a_send_interakt_failed_counts_against_the_cap_but_lifts_the_cooldown(
    make_service: MakeService, interakt: FakeInterakt
) -> None:
    """Interakt answered 5xx: the user got nothing, so a retry may go at once, within the cap."""
    stub = await make_service(resend_cooldown_seconds=30, max_sends_per_hour=2)
    interakt.answer(*[Answer(503, None)] * 3)
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await send(stub)
    assert error_info(failed.value).reason == "PROVIDER_UNAVAILABLE"
    await send(stub)
    assert len(interakt.received) == 4
    capped = await make_service(resend_cooldown_seconds=0, max_sends_per_hour=1)
    interakt.answer(*[Answer(503, None)] * 3)
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await send(capped, "+917003848502")
    with pytest.raises(grpc.aio.AioRpcError) as over:
        await send(capped, "+917003848502")
    assert error_info(over.value).reason == "HOURLY_SEND_CAP"
    assert len(interakt.received) == 7
