"""No leaks: secrets stay out of logs, errors and metrics; oversize input is refused early."""

from __future__ import annotations

import logging

import grpc
import pytest
import redis
from otp.v1 import otp_pb2, otp_pb2_grpc
from prometheus_client import REGISTRY, generate_latest

from tests.conftest import (
    PHONE,
    SECRET,
    TOKEN,
    MakeServer,
    MakeService,
    digest,
    redis_snapshot,
    send,
    verify,
    wrong_code,
)
from tests.fake_interakt import API_KEY, INVALID_TOKEN, Answer, FakeInterakt

OTHER_PHONE = "+917003848502"
WRONG_TOKEN = "an-attackers-guess-at-a-token"


def everything_in(records: list[logging.LogRecord]) -> str:
    """Every field of every record, formatted or not, with any exception's trace."""
    formatter = logging.Formatter()
    parts = []
    for record in records:
        parts.append(record.getMessage())
        parts.extend(repr(value) for value in vars(record).values())
        if record.exc_info:
            parts.append(formatter.formatException(record.exc_info))
    return "\n".join(parts)


async def test_a_full_cycle_with_errors_leaks_no_secret(
    make_server: MakeServer,
    interakt: FakeInterakt,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    caplog.set_level(logging.DEBUG)
    server = await make_server(resend_cooldown_seconds=0)  # a refused number is held otherwise
    details: list[str] = []
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = otp_pb2_grpc.OtpServiceStub(channel)
        auth = (("authorization", f"Bearer {TOKEN}"),)

        async def attempt(call: object) -> None:
            try:
                await call  # type: ignore[misc]
            except grpc.aio.AioRpcError as exc:
                details.append(f"{exc.code()} {exc.details()} {exc.trailing_metadata()}")

        await stub.SendOtp(otp_pb2.SendOtpRequest(phone_number=PHONE), metadata=auth, timeout=10)
        code = interakt.received[-1].code
        for typed in (wrong_code(code), code, code, "12345", "abcdef"):
            await attempt(
                stub.VerifyOtp(
                    otp_pb2.VerifyOtpRequest(phone_number=PHONE, otp_code=typed),
                    metadata=auth,
                    timeout=10,
                )
            )
        # Interakt refuses, then fails for good; both codes are withdrawn.
        interakt.answer(Answer(401, {"result": False, "message": INVALID_TOKEN}))
        await attempt(
            stub.SendOtp(
                otp_pb2.SendOtpRequest(phone_number=OTHER_PHONE), metadata=auth, timeout=10
            )
        )
        interakt.answer(*[Answer(500, {"result": False, "message": "boom"})] * 3)
        await attempt(
            stub.SendOtp(
                otp_pb2.SendOtpRequest(phone_number=OTHER_PHONE), metadata=auth, timeout=10
            )
        )
        for metadata in ((("authorization", f"Bearer {WRONG_TOKEN}"),), ()):
            await attempt(
                stub.VerifyOtp(
                    otp_pb2.VerifyOtpRequest(phone_number=PHONE, otp_code=code),
                    metadata=metadata,
                    timeout=10,
                )
            )
    # Two malformed codes, two failed sends, two bad credentials (wrong/right/used codes are OK).
    assert len(details) == 6

    refused_codes = [message.code for message in interakt.received[1:]]
    secrets = {
        "the code": code,
        "its digest": digest(PHONE, code)[:32],
        "OTP_SECRET": SECRET.decode(),
        "INTERAKT_API_KEY": API_KEY,
        "the caller token": TOKEN,
        "a presented token": WRONG_TOKEN,
        **{f"undelivered code {c}": c for c in refused_codes},
        **{f"undelivered digest {c}": digest(OTHER_PHONE, c)[:32] for c in refused_codes},
    }
    logs = everything_in(caplog.records)
    assert "UNAVAILABLE" in "\n".join(details)  # the cycle really ran into trouble
    captured = capfd.readouterr()
    for where, text in (
        ("logs", logs),
        ("stderr/stdout", captured.out + captured.err),
        ("errors", "\n".join(details)),
        ("metrics", generate_latest(REGISTRY).decode()),
    ):
        for name, secret in secrets.items():
            assert secret not in text, f"{name} appears in {where}"


@pytest.mark.parametrize(
    ("phone", "code", "status", "message"),
    [
        ("+91" + "7" * 30, None, grpc.StatusCode.INVALID_ARGUMENT, "phone_number: must be at most"),
        ("+" + "9" * 4000, None, grpc.StatusCode.INVALID_ARGUMENT, "phone_number: must be at most"),
        (PHONE, "1" * 11, grpc.StatusCode.INVALID_ARGUMENT, "otp_code:"),
        (PHONE, "1" * 3000, grpc.StatusCode.INVALID_ARGUMENT, "otp_code:"),
        (
            "+" + "9" * 5000,
            None,
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "SERVER: Received message larger",
        ),
        (PHONE, "1" * 5000, grpc.StatusCode.RESOURCE_EXHAUSTED, "SERVER: Received message larger"),
    ],
)
async def test_oversize_requests_are_refused_and_change_nothing(
    make_service: MakeService,
    interakt: FakeInterakt,
    redis_db: redis.Redis,
    phone: str,
    code: str | None,
    status: grpc.StatusCode,
    message: str,
) -> None:
    stub = await make_service()
    await send(stub)
    before = redis_snapshot(redis_db)
    call = send(stub, phone) if code is None else verify(stub, code, phone)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await call
    assert refused.value.code() == status
    assert (refused.value.details() or "").startswith(message)
    assert redis_snapshot(redis_db) == before
    assert len(interakt.received) == 1


@pytest.mark.parametrize("body", [b"\xff\xff\xff", b"\x0a\x02\xff\xfe", b"\x0a\x10ab", b"\x12"])
@pytest.mark.parametrize("method", ["SendOtp", "VerifyOtp"])
async def test_a_body_that_is_not_the_request_message_is_invalid_argument(
    make_server: MakeServer, redis_db: redis.Redis, body: bytes, method: str
) -> None:
    server = await make_server()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        call = channel.unary_unary(f"/otp.v1.OtpService/{method}")
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await call(body, metadata=(("authorization", f"Bearer {TOKEN}"),), timeout=10)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert refused.value.details() == f"request: is not a valid {method}Request"
    assert redis_db.keys() == []
