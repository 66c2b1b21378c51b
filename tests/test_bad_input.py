"""Bad input: INVALID_ARGUMENT naming the field, nothing stored, nothing sent."""

from __future__ import annotations

import grpc
import pytest
import redis
from otp.v1 import otp_pb2

from tests.conftest import PHONE, MakeService, redis_snapshot, send, verify
from tests.fake_interakt import FakeInterakt

BAD_PHONES = [
    pytest.param("", id="empty"),
    pytest.param("917003848501", id="no-plus"),
    pytest.param("07003848501", id="national-form"),
    pytest.param("+91700384850", id="too-short"),
    pytest.param("+9170038485011234", id="too-long"),
    pytest.param("+0917003848501", id="no-country-code"),
    pytest.param("+917003848501abc", id="trailing-letters"),
    pytest.param("+1 800 FLOWERS", id="vanity-letters"),
    pytest.param("+917003848501 ext 123", id="extension"),
    pytest.param("+917003848501;ext=9", id="rfc3966-extension"),
    pytest.param("++917003848501", id="double-plus"),
    pytest.param("+917003848501\x00", id="nul"),
    pytest.param("+91\n7003848501", id="newline"),
    pytest.param(" +917003848501", id="leading-space"),
    pytest.param(
        "+\u0669\u0661\u0667\u0660\u0660\u0663\u0668\u0664\u0668\u0665\u0660\u0661",
        id="arabic-digits",
    ),
    pytest.param("+" + "9" * 40, id="oversize"),
    pytest.param("+91 " + " " * 1000 + "7003848501", id="oversize-padding"),
]

BAD_CODES = [
    pytest.param("", "is required", id="empty"),
    pytest.param("12a456", "digits", id="letter"),
    pytest.param("12 456", "digits", id="space"),
    pytest.param("-12345", "digits", id="sign"),
    pytest.param("\u0661\u0662\u0663\u0664\u0665\u0666", "digits", id="arabic-digits"),
    pytest.param("\u00b2\u00b3\u00b9456", "digits", id="superscripts"),
    pytest.param("12345", "exactly 6 digits", id="too-short"),
    pytest.param("1234567", "exactly 6 digits", id="too-long"),
    pytest.param("1" * 11, "exactly 6 digits", id="digits-over-max-length"),
    pytest.param("1" * 3000, "exactly 6 digits", id="oversize"),
]


async def assert_invalid(call: object, field: str, redis_db: redis.Redis, expect: str = "") -> None:
    before = redis_snapshot(redis_db)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await call  # type: ignore[misc]
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = refused.value.details() or ""
    assert details.startswith(f"{field}: "), details
    assert expect in details
    assert redis_snapshot(redis_db) == before


@pytest.mark.parametrize("phone", BAD_PHONES)
async def test_send_refuses_a_bad_phone_number(
    make_service: MakeService, interakt: FakeInterakt, redis_db: redis.Redis, phone: str
) -> None:
    stub = await make_service()
    await send(stub)  # state that must survive the bad request unchanged
    await assert_invalid(send(stub, phone), "phone_number", redis_db)
    assert len(interakt.received) == 1


@pytest.mark.parametrize("phone", BAD_PHONES)
async def test_verify_refuses_a_bad_phone_number(
    make_service: MakeService, interakt: FakeInterakt, redis_db: redis.Redis, phone: str
) -> None:
    stub = await make_service()
    await send(stub)
    await assert_invalid(verify(stub, interakt.received[0].code, phone), "phone_number", redis_db)
    # The bad request did not use up an attempt or the code.
    assert (await verify(stub, interakt.received[0].code)).verified


@pytest.mark.parametrize(("code", "expect"), BAD_CODES)
async def test_verify_refuses_a_malformed_code(
    make_service: MakeService,
    interakt: FakeInterakt,
    redis_db: redis.Redis,
    code: str,
    expect: str,
) -> None:
    stub = await make_service(max_attempts=1)
    await send(stub)
    await assert_invalid(verify(stub, code), "otp_code", redis_db, expect)
    # With a budget of one, a counted attempt would have locked the number.
    assert (await verify(stub, interakt.received[0].code)).verified


async def test_code_length_follows_the_setting(
    make_service: MakeService, redis_db: redis.Redis
) -> None:
    stub = await make_service(code_length=4)
    await assert_invalid(verify(stub, "123456"), "otp_code", redis_db, "exactly 4 digits")
    assert (await verify(stub, "1234")).outcome == otp_pb2.VERIFY_OUTCOME_NO_ACTIVE_CODE


async def test_a_message_over_the_size_cap_is_refused_before_any_work(
    make_service: MakeService, interakt: FakeInterakt, redis_db: redis.Redis
) -> None:
    """Requests are two short strings; gRPC itself refuses kilobytes before the service runs."""
    stub = await make_service()
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await send(stub, "+" + "9" * 10_000)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await verify(stub, "1" * 10_000, PHONE)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert redis_db.dbsize() == 0
    assert interakt.received == []
