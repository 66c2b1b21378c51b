"""Interakt delivery: every answer of the shared contract becomes a clear status."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import grpc
import pytest
import redis
from otp.v1 import otp_pb2

from otp_service.connections.embedded_redis import free_port
from otp_service.sender import BACKOFF_BASE_SECONDS, MAX_RETRY_AFTER_SECONDS
from tests.conftest import (
    PHONE,
    SECRET,
    MakeService,
    assert_no_code_but_counted,
    assert_no_code_left,
    eventually,
    retry_delay,
    send,
    verify,
)
from tests.fake_interakt import (
    API_KEY,
    INVALID_TOKEN,
    NOT_A_CONTACT,
    OUTSIDE_24H,
    RATE_LIMITED,
    Answer,
    FakeInterakt,
    no_template,
    refusal,
)
from tests.test_error_details import error_info


async def send_fails(stub: object, code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await send(stub)  # type: ignore[arg-type]
    assert failed.value.code() == code, failed.value.details()
    return failed.value


async def test_request_follows_the_contract(
    make_service: MakeService, interakt: FakeInterakt
) -> None:
    stub = await make_service(brand="Acme {Pay}", ttl_seconds=300)
    await send(stub)
    [message] = interakt.received
    assert message.headers["Authorization"] == f"Basic {API_KEY}"
    assert message.headers["Content-Type"].startswith("application/json")
    assert message.body["data"]["message"] == (
        f"Your OTP for Acme {{Pay}} is {message.code}. Valid for 5 minutes. "
        "Do not share this code with anyone."
    )


@pytest.mark.parametrize(
    ("answer", "overrides", "says"),
    [
        pytest.param(refusal(NOT_A_CONTACT), {}, "not a contact", id="not-a-contact"),
        pytest.param(refusal(OUTSIDE_24H), {}, "INTERAKT_TEMPLATE_NAME", id="outside-24h"),
        pytest.param(refusal(INVALID_TOKEN, 401), {}, "INTERAKT_API_KEY", id="invalid-token"),
        pytest.param(
            refusal(no_template("Auth", "hi")),
            {"template_name": "Auth", "template_language": "hi"},
            "INTERAKT_TEMPLATE_NAME",
            id="no-template",
        ),
        pytest.param(refusal("Something new"), {}, "Something new", id="unknown-refusal"),
    ],
)
async def test_refusals_are_failed_precondition_with_the_reason(
    make_service: MakeService,
    interakt: FakeInterakt,
    redis_db: redis.Redis,
    answer: Answer,
    overrides: dict[str, str],
    says: str,
) -> None:
    stub = await make_service(**overrides)
    interakt.answer(answer)
    failed = await send_fails(stub, grpc.StatusCode.FAILED_PRECONDITION)
    details = failed.details() or ""
    assert says in details
    assert "Interakt" in details
    # A refusal is not retried: retrying will not change Interakt's mind.
    assert len(interakt.received) == 1
    assert_no_code_but_counted(redis_db)


@pytest.mark.parametrize("status", [400, 404, 422])
async def test_result_true_with_a_4xx_is_not_an_acceptance(
    make_service: MakeService, interakt: FakeInterakt, redis_db: redis.Redis, status: int
) -> None:
    """Only a 2xx with ``result: true`` is a queued message: a 4xx that says true (a proxy's
    page, an API change) sent nothing we know of, so the code is not left behind. It is an
    answer, though: the send stays counted, as any refusal."""
    stub = await make_service()
    body = {"result": True, "message": "Message queued for sending", "id": "msg-4xx"}
    interakt.answer(Answer(status, body))
    failed = await send_fails(stub, grpc.StatusCode.FAILED_PRECONDITION)
    assert "msg-4xx" not in (failed.details() or "")
    assert len(interakt.received) == 1
    assert_no_code_but_counted(redis_db)


async def test_the_fake_itself_refuses_what_interakt_would(
    make_service: MakeService, interakt: FakeInterakt
) -> None:
    """Not scripted: the fake judges the key, the 24-hour window and the template."""
    bad_key = await make_service(interakt_api_key="bm90LXRoZS1rZXk=", resend_cooldown_seconds=0)
    assert "INTERAKT_API_KEY" in (
        (await send_fails(bad_key, grpc.StatusCode.FAILED_PRECONDITION)).details() or ""
    )
    interakt.in_window = set()
    text = await make_service(resend_cooldown_seconds=0)
    assert "24 hours" in (
        (await send_fails(text, grpc.StatusCode.FAILED_PRECONDITION)).details() or ""
    )
    template = await make_service(template_name="Auth", resend_cooldown_seconds=0)
    assert (await send(template)).channel == otp_pb2.CHANNEL_TEMPLATE
    assert (await verify(template, interakt.received[-1].code)).verified


@pytest.mark.parametrize(
    "transient",
    [
        pytest.param(Answer(429, {"result": False, "message": RATE_LIMITED}), id="429"),
        pytest.param(Answer(500, {"result": False, "message": "oops"}), id="500"),
        pytest.param(Answer(503, None), id="503-no-body"),
        pytest.param(Answer(502, None, headers={"Content-Type": "text/html"}), id="502-html"),
    ],
)
async def test_transient_failures_are_retried(
    make_service: MakeService, interakt: FakeInterakt, transient: Answer
) -> None:
    stub = await make_service()
    interakt.answer(transient, transient)
    sent = await send(stub)
    assert sent.message_id
    assert len(interakt.received) == 3
    # With a backoff between them that doubles (jitter only lengthens it).
    first, second, third = (message.at for message in interakt.received)
    assert second - first >= BACKOFF_BASE_SECONDS
    assert third - second >= 2 * BACKOFF_BASE_SECONDS
    # All three requests carried the same code, and it verifies.
    assert len({message.code for message in interakt.received}) == 1
    assert (await verify(stub, interakt.received[-1].code)).verified


def rate_limited(retry_after: str) -> Answer:
    return Answer(
        429, {"result": False, "message": RATE_LIMITED}, headers={"Retry-After": retry_after}
    )


async def test_a_retry_after_within_the_budget_is_waited_for_then_retried(
    make_service: MakeService, interakt: FakeInterakt
) -> None:
    stub = await make_service(interakt_timeout_seconds=5)
    interakt.answer(rate_limited("1"))
    sent = await send(stub)
    assert sent.message_id
    first, second = interakt.received
    assert second.at - first.at >= 1
    assert (await verify(stub, second.code)).verified


async def test_a_retry_after_beyond_the_budget_is_unavailable_at_once_with_retry_info(
    make_service: MakeService, interakt: FakeInterakt, redis_db: redis.Redis
) -> None:
    stub = await make_service(interakt_timeout_seconds=5)
    interakt.answer(*[rate_limited("7")] * 3)
    failed = await send_fails(stub, grpc.StatusCode.UNAVAILABLE)
    assert "rate limited" in (failed.details() or "")
    # Waiting 7 s could only end past the budget: the caller is told to wait instead.
    assert len(interakt.received) == 1
    assert retry_delay(failed) == 7
    assert_no_code_but_counted(redis_db)


@dataclasses.dataclass(frozen=True)
class HttpDate:
    """A Retry-After date this many seconds from when the test runs (not when it is collected)."""

    seconds_from_now: int

    def __str__(self) -> str:
        when = datetime.now(UTC) + timedelta(seconds=self.seconds_from_now)
        return format_datetime(when, usegmt=True)


# Unusable hints are ignored (the backoff runs, and the caller is told 1 s), absurd ones capped.
IGNORED = (1, 1)
CAPPED = (MAX_RETRY_AFTER_SECONDS, MAX_RETRY_AFTER_SECONDS)


@pytest.mark.parametrize(
    ("retry_after", "told"),
    [
        pytest.param("inf", IGNORED, id="inf"),
        pytest.param("1e400", IGNORED, id="1e400"),
        pytest.param("nan", IGNORED, id="nan"),
        pytest.param("-5", IGNORED, id="negative"),
        pytest.param("2.5", IGNORED, id="not-whole"),
        pytest.param("soon", IGNORED, id="garbage"),
        pytest.param("", IGNORED, id="empty"),
        pytest.param("9" * 400, CAPPED, id="400-nines"),
        pytest.param("9" * 5000, CAPPED, id="5000-nines"),
        pytest.param(HttpDate(-3600), IGNORED, id="date-in-the-past"),
        pytest.param(HttpDate(120), (118, 121), id="date-in-2-minutes"),
        pytest.param(HttpDate(10**6), CAPPED, id="date-in-12-days"),
        pytest.param("Sun, 06 Nov 1994 08:49:37 +" + "9" * 30, IGNORED, id="date-huge-zone"),
        pytest.param("Sun, 06 Nov " + "9" * 40 + " 08:49:37 GMT", IGNORED, id="date-huge-year"),
    ],
)
async def test_any_retry_after_is_unavailable_with_a_sane_retry_info(
    make_service: MakeService,
    interakt: FakeInterakt,
    redis_db: redis.Redis,
    retry_after: str | HttpDate,
    told: tuple[float, float],
) -> None:
    """Seconds or an HTTP date (RFC 9110); anything else is not a reason for UNKNOWN/INTERNAL."""
    # A short budget: when the hint is ignored, the backoff gives up after one retry or two.
    stub = await make_service(interakt_timeout_seconds=0.5)
    interakt.answer(*[rate_limited(str(retry_after))] * 3)
    failed = await send_fails(stub, grpc.StatusCode.UNAVAILABLE)
    assert "rate limited" in (failed.details() or "")
    assert told[0] <= retry_delay(failed) <= told[1]
    assert_no_code_but_counted(redis_db)


async def test_retries_stop_within_the_callers_deadline_when_it_is_shorter_than_the_budget(
    make_service: MakeService, interakt: FakeInterakt, redis_db: redis.Redis
) -> None:
    stub = await make_service(interakt_timeout_seconds=5)
    # Waiting 1 s fits the caller's 2.5 s; waiting 2 s more would not, though it fits the 5 s.
    interakt.answer(rate_limited("1"), rate_limited("2"), rate_limited("1"))
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await stub.SendOtp(otp_pb2.SendOtpRequest(phone_number=PHONE), timeout=2.5)
    # The server's own answer, with the wait, rather than gRPC cutting it at the deadline.
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE, failed.value.details()
    assert retry_delay(failed.value) == 2
    first, second = interakt.received
    assert second.at - first.at >= 1
    assert_no_code_but_counted(redis_db)


async def test_slow_upstream_is_unavailable_within_the_time_budget_and_in_doubt(
    make_service: MakeService, interakt: FakeInterakt
) -> None:
    stub = await make_service(interakt_timeout_seconds=0.3)
    interakt.answer(*[Answer(delay=3, body={"result": True, "id": "late"})] * 3)
    failed = await send_fails(stub, grpc.StatusCode.UNAVAILABLE)
    assert "timed out" in (failed.details() or "")
    # Interakt has the message and may yet send it: its code stays, for one request only.
    assert error_info(failed).reason == "DELIVERY_IN_DOUBT"
    assert "may still arrive" in (failed.details() or "")
    [message] = interakt.received
    assert (await verify(stub, message.code)).verified


async def test_a_page_that_is_not_interakt_is_refused_or_retried_by_status(
    make_service: MakeService, interakt: FakeInterakt, redis_db: redis.Redis
) -> None:
    stub = await make_service(resend_cooldown_seconds=0)
    # A 404 page (a wrong INTERAKT_BASE_URL) will not get better: no retry.
    interakt.answer(Answer(404, html="<html>Not Found</html>"))
    failed = await send_fails(stub, grpc.StatusCode.FAILED_PRECONDITION)
    assert "HTTP 404" in (failed.details() or "")
    assert len(interakt.received) == 1
    # A proxy's 502 page is transient: retried, then UNAVAILABLE.
    interakt.answer(*[Answer(502, html="<html>Bad Gateway</html>")] * 3)
    await send_fails(stub, grpc.StatusCode.UNAVAILABLE)
    assert len(interakt.received) == 4
    assert_no_code_but_counted(redis_db, sends=2)


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
async def test_a_redirect_is_never_followed(
    make_service: MakeService, interakt: FakeInterakt, redis_db: redis.Redis, status: int
) -> None:
    """Followed, a 307/308 would post the code elsewhere, and a 302's target could answer
    ``result: true`` for a message Interakt never saw."""
    stub = await make_service()
    interakt.answer(interakt.redirect(status))
    failed = await send_fails(stub, grpc.StatusCode.FAILED_PRECONDITION)
    assert "INTERAKT_BASE_URL is misconfigured" in (failed.details() or "")
    assert f"HTTP {status}" in (failed.details() or "")
    assert interakt.followed == []
    assert len(interakt.received) == 1
    assert_no_code_but_counted(redis_db)


async def test_unreachable_upstream_is_unavailable(
    make_service: MakeService, redis_db: redis.Redis
) -> None:
    stub = await make_service(interakt_base_url=f"http://127.0.0.1:{free_port()}/v1/public")
    await send_fails(stub, grpc.StatusCode.UNAVAILABLE)
    assert_no_code_left(redis_db)


async def test_caller_giving_up_mid_send_keeps_the_code_in_doubt(
    make_service: MakeService, interakt: FakeInterakt, redis_db: redis.Redis
) -> None:
    stub = await make_service()
    interakt.answer(Answer(delay=3, body={"result": True, "id": "late"}))
    call = stub.SendOtp(otp_pb2.SendOtpRequest(phone_number=PHONE), timeout=10)
    # Give up once the code is stored and the server waits on Interakt.
    for _ in range(100):
        if interakt.received:
            break
        await asyncio.sleep(0.02)
    assert redis_db.keys("otp:*:c")
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call

    async def recorded_in_doubt() -> bool:
        return bool(redis_db.hget(f"otp:{{{PHONE}}}:d", "ch"))

    # Interakt has the message: the server records the send as in doubt, and keeps its code.
    await eventually(recorded_in_doubt)
    assert redis_db.zcard(f"otp:{{{PHONE}}}:s") == 1
    assert (await verify(stub, interakt.received[0].code)).verified


async def test_a_call_without_a_deadline_is_served(
    make_service: MakeService, interakt: FakeInterakt
) -> None:
    stub = await make_service()
    await stub.SendOtp(otp_pb2.SendOtpRequest(phone_number=PHONE))
    assert len(interakt.received) == 1


async def test_secrets_never_reach_logs_or_errors(
    make_service: MakeService, interakt: FakeInterakt, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    stub = await make_service(max_attempts=2, resend_cooldown_seconds=0)
    await send(stub)
    interakt.answer(Answer(500, None), refusal(INVALID_TOKEN, 401))
    errors = [(await send_fails(stub, grpc.StatusCode.FAILED_PRECONDITION)).details() or ""]
    interakt.answer(*[Answer(503, None)] * 3)
    errors.append((await send_fails(stub, grpc.StatusCode.UNAVAILABLE)).details() or "")
    codes = {message.code for message in interakt.received}
    await verify(stub, "000000" if "000000" not in codes else "111111")
    seen = caplog.text + "".join(errors)
    for secret in [API_KEY, SECRET.decode(), *codes]:
        assert secret not in seen
