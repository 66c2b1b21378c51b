"""Errors a program can act on: every error status carries an ErrorInfo naming its reason."""

from __future__ import annotations

from typing import Any

import aiohttp
import grpc
import pytest
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from otp.v1 import error_reason_pb2, otp_pb2

from otp_service.auth import Callers
from otp_service.errors import ErrorReason
from otp_service.gateway import HttpServer, LocalBackend
from otp_service.otp import OtpService
from otp_service.servicer import ERROR_DOMAIN
from tests.conftest import (
    PHONE,
    TOKEN,
    MakeServer,
    MakeService,
    SilentRedis,
    send,
    verify,
    wrong_code,
)
from tests.fake_interakt import (
    INVALID_TOKEN,
    NOT_A_CONTACT,
    OUTSIDE_24H,
    Answer,
    FakeInterakt,
    no_template,
    refusal,
)

OTHER_PHONE = "+917003848502"


def details(error: grpc.aio.AioRpcError) -> list[Any]:
    """The google.rpc details of a failed call, unpacked."""
    found: list[Any] = []
    for key, value in error.trailing_metadata() or ():
        if key != "grpc-status-details-bin":
            continue
        for detail in status_pb2.Status.FromString(value).details:
            for kind in (
                error_details_pb2.ErrorInfo,
                error_details_pb2.BadRequest,
                error_details_pb2.RetryInfo,
            ):
                message: Message = kind()
                if detail.Unpack(message):
                    found.append(message)
    return found


def error_info(error: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo:
    infos = [d for d in details(error) if isinstance(d, error_details_pb2.ErrorInfo)]
    assert len(infos) == 1, details(error)
    assert infos[0].domain == ERROR_DOMAIN == "otp-service"
    return infos[0]


def kinds(error: grpc.aio.AioRpcError) -> list[str]:
    return [type(d).__name__ for d in details(error)]


async def refused(call: Any, code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await call
    assert failed.value.code() == code, failed.value.details()
    return failed.value


def test_the_service_reasons_are_the_protos() -> None:
    """errors.ErrorReason mirrors otp.v1.ErrorReason, name for name and number for number."""
    proto = dict(error_reason_pb2.ErrorReason.items())
    assert proto.pop("ERROR_REASON_UNSPECIFIED") == 0
    assert {reason.name: reason.value for reason in ErrorReason} == proto


@pytest.mark.parametrize(
    ("phone", "code", "reason", "field"),
    [
        pytest.param("0700", "123456", "INVALID_PHONE_NUMBER", "phone_number", id="phone"),
        pytest.param(PHONE, "12a456", "INVALID_CODE", "otp_code", id="code"),
    ],
)
async def test_bad_input_names_its_field_in_error_info_and_bad_request(
    make_service: MakeService, phone: str, code: str, reason: str, field: str
) -> None:
    stub = await make_service()
    error = await refused(verify(stub, code, phone), grpc.StatusCode.INVALID_ARGUMENT)
    info = error_info(error)
    assert (info.reason, dict(info.metadata)) == (reason, {"field": field})
    assert kinds(error) == ["ErrorInfo", "BadRequest"]
    (violation,) = details(error)[1].field_violations
    assert violation.field == field
    assert f"{field}: {violation.description}" == error.details()


async def test_a_body_that_is_not_the_request_is_invalid_request(make_server: MakeServer) -> None:
    server = await make_server()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        rpc = channel.unary_unary("/otp.v1.OtpService/VerifyOtp")
        call = rpc(b"\xff\xff\xff", metadata=(("authorization", "Bearer x"),), timeout=10)
        # Auth runs first, so an unknown caller learns nothing about the body.
        assert error_info(await refused(call, grpc.StatusCode.UNAUTHENTICATED)).reason == (
            "CALLER_NOT_AUTHENTICATED"
        )
        call = rpc(b"\xff\xff\xff", metadata=(("authorization", f"Bearer {TOKEN}"),), timeout=10)
        error = await refused(call, grpc.StatusCode.INVALID_ARGUMENT)
    assert error_info(error).reason == "INVALID_REQUEST"
    assert kinds(error) == ["ErrorInfo", "BadRequest"]


async def test_unauthenticated_carries_its_reason_over_grpc_and_on_metrics(
    make_server: MakeServer,
) -> None:
    server = await make_server()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub_call = channel.unary_unary(
            "/otp.v1.OtpService/SendOtp",
            request_serializer=otp_pb2.SendOtpRequest.SerializeToString,
        )
        error = await refused(
            stub_call(otp_pb2.SendOtpRequest(phone_number=PHONE), timeout=10),
            grpc.StatusCode.UNAUTHENTICATED,
        )
    info = error_info(error)
    assert (info.reason, dict(info.metadata)) == ("CALLER_NOT_AUTHENTICATED", {})
    assert kinds(error) == ["ErrorInfo"]

    callers = Callers((("ops", "ops-token-0123456789"),))
    backend = LocalBackend(server.behaviors, server.health)
    http = await HttpServer.start("127.0.0.1:0", backend, shutdown_timeout=1, callers=callers)
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{http.port}/metrics") as response,
        ):
            assert response.status == 401
            body = await response.json()
    finally:
        await http.close()
    assert body["details"] == [
        {
            "@type": "type.googleapis.com/google.rpc.ErrorInfo",
            "reason": "CALLER_NOT_AUTHENTICATED",
            "domain": "otp-service",
        }
    ]


async def test_country_not_served_says_which_and_what_is(make_service: MakeService) -> None:
    stub = await make_service(allowed_countries=frozenset({"91", "44"}))
    error = await refused(send(stub, "+14155552671"), grpc.StatusCode.PERMISSION_DENIED)
    info = error_info(error)
    assert info.reason == "COUNTRY_NOT_SERVED"
    assert dict(info.metadata) == {"country_code": "+1", "allowed_country_codes": "+44,+91"}
    assert kinds(error) == ["ErrorInfo"]


async def test_each_limit_has_its_own_reason_with_retry_info(
    make_service: MakeService, interakt: FakeInterakt
) -> None:
    stub = await make_service(max_sends_per_hour=2, resend_cooldown_seconds=30)
    await send(stub)
    cooldown = await refused(send(stub), grpc.StatusCode.RESOURCE_EXHAUSTED)
    info = error_info(cooldown)
    assert (info.reason, dict(info.metadata)) == ("RESEND_COOLDOWN", {"cooldown_seconds": "30"})
    assert kinds(cooldown) == ["ErrorInfo", "RetryInfo"]

    capped = await make_service(max_sends_per_hour=1, resend_cooldown_seconds=0)
    await send(capped, OTHER_PHONE)
    info = error_info(await refused(send(capped, OTHER_PHONE), grpc.StatusCode.RESOURCE_EXHAUSTED))
    assert (info.reason, dict(info.metadata)) == ("HOURLY_SEND_CAP", {"max_sends_per_hour": "1"})


async def test_a_number_locked_after_wrong_codes_is_number_locked(
    make_service: MakeService, interakt: FakeInterakt
) -> None:
    stub = await make_service(max_failed_verifies_per_hour=1)
    await send(stub)
    code = interakt.received[-1].code
    await verify(stub, wrong_code(code))
    for call in (verify(stub, code), send(stub)):
        error = await refused(call, grpc.StatusCode.RESOURCE_EXHAUSTED)
        info = error_info(error)
        assert info.reason == "NUMBER_LOCKED"
        assert dict(info.metadata) == {"max_failed_verifies_per_hour": "1"}
        assert kinds(error) == ["ErrorInfo", "RetryInfo"]


async def test_the_send_budgets_are_told_apart(
    make_service: MakeService, interakt: FakeInterakt
) -> None:
    caller = await make_service(caller_sends_per_minute=1)
    await send(caller)
    info = error_info(await refused(send(caller, OTHER_PHONE), grpc.StatusCode.RESOURCE_EXHAUSTED))
    assert info.reason == "CALLER_SEND_BUDGET"
    assert dict(info.metadata) == {"caller": "tests", "max_sends_per_minute": "1"}

    account = await make_service(interakt_sends_per_minute=1)
    info = error_info(
        await refused(send(account, "+917003848503"), grpc.StatusCode.RESOURCE_EXHAUSTED)
    )
    assert (info.reason, dict(info.metadata)) == (
        "ACCOUNT_SEND_BUDGET",
        {"max_sends_per_minute": "1"},
    )


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        pytest.param(refusal(NOT_A_CONTACT), "RECIPIENT_NOT_A_CONTACT", id="not-a-contact"),
        pytest.param(refusal(OUTSIDE_24H), "OUTSIDE_24_HOUR_WINDOW", id="24h"),
        pytest.param(refusal(no_template("Auth", "en")), "TEMPLATE_NOT_APPROVED", id="template"),
        pytest.param(refusal(INVALID_TOKEN, 401), "PROVIDER_KEY_REJECTED", id="key"),
        pytest.param(refusal("Something new"), "PROVIDER_REFUSED", id="unknown"),
    ],
)
async def test_interakt_refusals_carry_their_cause(
    make_service: MakeService, interakt: FakeInterakt, answer: Answer, reason: str
) -> None:
    stub = await make_service()
    interakt.answer(answer)
    error = await refused(send(stub), grpc.StatusCode.FAILED_PRECONDITION)
    info = error_info(error)
    assert info.reason == reason
    assert dict(info.metadata) == {"provider_message": answer.body["message"]}  # type: ignore[index]
    assert kinds(error) == ["ErrorInfo"]


async def test_interakt_unavailable_is_provider_unavailable_with_retry_info(
    make_service: MakeService, interakt: FakeInterakt
) -> None:
    stub = await make_service()
    interakt.answer(*[Answer(503, None)] * 3)
    error = await refused(send(stub), grpc.StatusCode.UNAVAILABLE)
    assert error_info(error).reason == "PROVIDER_UNAVAILABLE"
    assert kinds(error) == ["ErrorInfo", "RetryInfo"]


async def test_redis_unavailable_is_store_unavailable(
    make_service: MakeService, silent_redis: SilentRedis
) -> None:
    stub = await make_service(redis_url=silent_redis.url, redis_timeout_seconds=0.2)
    error = await refused(verify(stub, "123456"), grpc.StatusCode.UNAVAILABLE)
    assert error_info(error).reason == "STORE_UNAVAILABLE"


async def test_a_bug_is_internal_error_without_its_trace(
    make_service: MakeService, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken(*_: object) -> None:
        raise RuntimeError("secret internals")

    monkeypatch.setattr(OtpService, "verify", broken)
    stub = await make_service()
    error = await refused(verify(stub, "123456"), grpc.StatusCode.INTERNAL)
    assert error.details() == "internal error"
    assert error_info(error).reason == "INTERNAL_ERROR"
