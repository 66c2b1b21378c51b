"""The OTP rules through the real server: expiry, single use, attempts, resends, limits."""

from __future__ import annotations

import time

import grpc
import pytest
import redis
from otp.v1 import otp_pb2

from tests.conftest import (
    PHONE,
    MakeService,
    assert_no_code_but_counted,
    digest,
    redis_snapshot,
    retry_delay,
    send,
    verify,
    wrong_code,
)
from tests.fake_interakt import NOT_A_CONTACT, Answer, FakeInterakt, refusal

# The rules hold on every Redis deployment: one node, a Cluster, Sentinel's primary.
pytestmark = pytest.mark.redis_backends


async def test_sent_code_verifies_once_and_only_once(
    make_service: MakeService, interakt: FakeInterakt, redis_db: redis.Redis
) -> None:
    stub = await make_service()
    sent = await send(stub)
    assert sent.channel == otp_pb2.CHANNEL_TEXT
    assert sent.message_id == "msg-1"
    assert sent.resend_after_seconds == 30
    assert 595 <= sent.expires_at.seconds - time.time() <= 601

    [message] = interakt.received
    assert message.body["countryCode"] == "+91"
    assert message.body["phoneNumber"] == "7003848501"
    assert message.body["type"] == "Text"
    code = message.code
    assert message.body["data"]["message"] == (
        f"Your OTP for MinServe is {code}. Valid for 10 minutes. "
        "Do not share this code with anyone."
    )
    assert len(code) == 6

    first = await verify(stub, code)
    assert first.verified
    assert first.outcome == otp_pb2.VERIFY_OUTCOME_VERIFIED
    again = await verify(stub, code)
    assert not again.verified
    assert again.outcome == otp_pb2.VERIFY_OUTCOME_NO_ACTIVE_CODE
    assert redis_db.keys("otp:*:c") == []


async def test_redis_holds_only_a_keyed_digest(
    make_service: MakeService, interakt: FakeInterakt, redis_db: redis.Redis
) -> None:
    stub = await make_service()
    await send(stub)
    code = interakt.received[0].code
    dump = b"".join(
        k + b"".join(redis_db.hgetall(k).keys()) + b"".join(redis_db.hgetall(k).values())
        for k in redis_db.keys("otp:*:c")
    )
    assert dump
    assert code.encode() not in dump
    assert digest(PHONE, code)[:32].encode() in dump  # what is kept is the keyed digest


async def test_template_is_used_when_configured(
    make_service: MakeService, interakt: FakeInterakt
) -> None:
    stub = await make_service(template_name="Auth", template_language="en", code_length=8)
    sent = await send(stub)
    assert sent.channel == otp_pb2.CHANNEL_TEMPLATE
    [message] = interakt.received
    assert message.body["type"] == "Template"
    assert message.body["template"]["name"] == "Auth"
    assert message.body["template"]["languageCode"] == "en"
    assert len(message.code) == 8
    assert (await verify(stub, message.code)).verified


async def test_never_sent_is_no_active_code(make_service: MakeService) -> None:
    stub = await make_service()
    result = await verify(stub, "123456")
    assert result.outcome == otp_pb2.VERIFY_OUTCOME_NO_ACTIVE_CODE


async def test_code_expires(
    make_service: MakeService, interakt: FakeInterakt, redis_db: redis.Redis
) -> None:
    stub = await make_service(ttl_seconds=600)
    sent = await send(stub)
    codes = f"otp:{{{PHONE}}}:c"
    # Redis drops the number's codes when the newest expires...
    assert 599_000 < redis_db.pttl(codes) <= 600_000
    [(field, expiry)] = [(f, int(v)) for f, v in redis_db.hgetall(codes).items() if f != b"n"]
    assert expiry == sent.expires_at.ToMilliseconds()
    # ...and a code past its own expiry does not verify while the hash still lives.
    redis_db.hset(codes, field, expiry - 600_000)
    result = await verify(stub, interakt.received[0].code)
    assert not result.verified
    redis_db.delete(codes)  # what the key's expiry does
    result = await verify(stub, interakt.received[0].code)
    assert result.outcome == otp_pb2.VERIFY_OUTCOME_NO_ACTIVE_CODE


async def test_expired_codes_are_purged_and_the_wrong_code_list_expires(
    make_service: MakeService, interakt: FakeInterakt, redis_db: redis.Redis
) -> None:
    """Redis memory stays bounded: nothing of a number outlives its window."""
    # More attempts than wrong codes: a locked number's codes would go for that reason instead.
    stub = await make_service(
        resend_cooldown_seconds=0, max_failed_verifies_per_hour=3, max_attempts=10
    )
    codes, failures = f"otp:{{{PHONE}}}:c", f"otp:{{{PHONE}}}:f"
    await send(stub)
    first = interakt.received[0].code
    for _ in range(3):
        await verify(stub, wrong_code(first))
    # Age the counted wrong codes past the hour, so that more are taken.
    aged = [int(t) - 3_601_000 for t in redis_db.lrange(failures, 0, -1)]
    redis_db.delete(failures)
    redis_db.rpush(failures, *aged)
    for _ in range(2):
        await verify(stub, wrong_code(first))
    # The wrong-code list keeps only the budget's worth of entries, and goes after an hour.
    assert redis_db.llen(failures) == 3
    assert 3_590_000 < redis_db.pttl(failures) <= 3_600_000
    # A code past its expiry is dropped from the hash at the next send.
    [old] = [f for f in redis_db.hkeys(codes) if f != b"n"]
    redis_db.hset(codes, old, 1)
    redis_db.delete(failures)  # let the number send again
    await send(stub)
    fields = [f for f in redis_db.hkeys(codes) if f != b"n"]
    assert len(fields) == 1
    assert old not in fields


async def test_wrong_codes_exhaust_the_budget_then_even_the_right_code_fails(
    make_service: MakeService, interakt: FakeInterakt
) -> None:
    stub = await make_service(max_attempts=3)
    await send(stub)
    code = interakt.received[0].code
    remaining = [(await verify(stub, wrong_code(code))).attempts_remaining for _ in range(3)]
    assert remaining == [2, 1, 0]
    locked = await verify(stub, code)
    assert locked.outcome == otp_pb2.VERIFY_OUTCOME_TOO_MANY_ATTEMPTS
    assert not locked.verified


async def test_resend_keeps_the_first_code_valid_and_shares_the_budget(
    make_service: MakeService, interakt: FakeInterakt
) -> None:
    stub = await make_service(max_attempts=3, resend_cooldown_seconds=0)
    await send(stub)
    first = interakt.received[0].code
    assert (await verify(stub, wrong_code(first))).attempts_remaining == 2
    await send(stub)
    second = interakt.received[1].code
    # The resend did not hand out a fresh budget.
    assert (await verify(stub, wrong_code(first, second))).attempts_remaining == 1
    # The first code, arriving late, still works, and consumes the second one too.
    assert (await verify(stub, first)).verified
    assert (await verify(stub, second)).outcome == otp_pb2.VERIFY_OUTCOME_NO_ACTIVE_CODE


async def test_resend_after_lockout_starts_a_new_budget(
    make_service: MakeService, interakt: FakeInterakt
) -> None:
    stub = await make_service(max_attempts=2, resend_cooldown_seconds=0)
    await send(stub)
    first = interakt.received[0].code
    for _ in range(2):
        await verify(stub, wrong_code(first))
    assert (await verify(stub, first)).outcome == otp_pb2.VERIFY_OUTCOME_TOO_MANY_ATTEMPTS
    await send(stub)
    second = interakt.received[1].code
    # The locked-out first code died with the lockout; only the new one works.
    if first != second:
        assert (await verify(stub, first)).outcome == otp_pb2.VERIFY_OUTCOME_WRONG_CODE
    assert (await verify(stub, second)).verified


async def test_a_resend_after_exactly_the_last_attempt_works_first_time(
    make_service: MakeService, interakt: FakeInterakt
) -> None:
    """The budget's edge: the last wrong code used the last attempt (none typed after it)."""
    stub = await make_service(max_attempts=2, resend_cooldown_seconds=0)
    await send(stub)
    first = interakt.received[0].code
    assert (await verify(stub, wrong_code(first))).attempts_remaining == 1
    assert (await verify(stub, wrong_code(first))).attempts_remaining == 0
    await send(stub)
    assert (await verify(stub, interakt.received[1].code)).verified


async def test_resend_cooldown_is_refused_with_retry_info(
    make_service: MakeService, redis_db: redis.Redis
) -> None:
    stub = await make_service(resend_cooldown_seconds=30)
    await send(stub)
    before = redis_snapshot(redis_db)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await send(stub)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "phone_number" in (refused.value.details() or "")
    assert 29 <= retry_delay(refused.value) <= 30
    assert redis_snapshot(redis_db) == before


async def test_hourly_send_cap(make_service: MakeService, interakt: FakeInterakt) -> None:
    stub = await make_service(resend_cooldown_seconds=0, max_sends_per_hour=3)
    for _ in range(3):
        await send(stub)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await send(stub)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "3 codes an hour" in (refused.value.details() or "")
    assert 3590 <= retry_delay(refused.value) <= 3600
    assert len(interakt.received) == 3
    # Another number has its own budget.
    await send(stub, "+14155552671")


async def test_refused_delivery_leaves_no_code_and_holds_the_cooldown(
    make_service: MakeService, interakt: FakeInterakt, redis_db: redis.Redis
) -> None:
    stub = await make_service()
    interakt.answer(refusal(NOT_A_CONTACT))
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await send(stub)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    undelivered = interakt.received[0].code
    assert_no_code_but_counted(redis_db)
    result = await verify(stub, undelivered)
    assert result.outcome == otp_pb2.VERIFY_OUTCOME_NO_ACTIVE_CODE
    # A number Interakt refuses is not retried at full speed.
    with pytest.raises(grpc.aio.AioRpcError) as cooling:
        await send(stub)
    assert cooling.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert len(interakt.received) == 1


async def test_refused_resend_keeps_the_earlier_code(
    make_service: MakeService, interakt: FakeInterakt
) -> None:
    stub = await make_service(resend_cooldown_seconds=0)
    await send(stub)
    interakt.answer(Answer(500, {"result": False, "message": "oops"}), *[Answer(500, {})] * 3)
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await send(stub)
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
    assert (await verify(stub, interakt.received[0].code)).verified


async def test_numbers_are_normalised(make_service: MakeService, interakt: FakeInterakt) -> None:
    stub = await make_service()
    await send(stub, "+91 70038-48501")
    assert interakt.received[0].body["phoneNumber"] == "7003848501"
    assert (await verify(stub, interakt.received[0].code, PHONE)).verified


@pytest.mark.parametrize(
    ("phone", "country", "national"),
    [
        ("+917003848501", "+91", "7003848501"),
        ("+14155552671", "+1", "4155552671"),
        ("+442071838750", "+44", "2071838750"),
        ("+97143020000", "+971", "43020000"),
        ("+390236618200", "+39", "0236618200"),
    ],
)
async def test_country_code_split(
    make_service: MakeService, interakt: FakeInterakt, phone: str, country: str, national: str
) -> None:
    stub = await make_service()
    await send(stub, phone)
    body = interakt.received[0].body
    assert (body["countryCode"], body["phoneNumber"]) == (country, national)
