"""Interakt's delivery reports (POST /webhooks/interakt) and GetOtpStatus, through the running
server: the fake Interakt posts the reports as Interakt does, signed. What happens while Redis
cannot answer is in tests/test_delivery_redis_faults.py."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import random

import aiohttp
import grpc
import pytest
import redis
from otp.v1 import otp_pb2, otp_pb2_grpc

from otp_service.gateway._webhooks import MAX_REPORT_BYTES
from tests.conftest import (
    CALLER,
    PHONE,
    TOKEN,
    WEBHOOK_SECRET,
    Gateway,
    MakeGateway,
    age,
    delta,
    eventually,
    redis_snapshot,
    retry_delay,
    scrape,
    send,
    verify,
    wrong_code,
)
from tests.fake_interakt import CallbackAt, FakeInterakt, Queued, refusal, report_body, sign
from tests.test_no_leaks import everything_in

# The rules hold on every Redis deployment: one node, a Cluster, Sentinel's primary.
pytestmark = pytest.mark.redis_backends

STATUS = "/api/v1/auth/otp-status"


async def status(
    stub: otp_pb2_grpc.OtpServiceStub, phone: str = PHONE
) -> otp_pb2.GetOtpStatusResponse:
    return await stub.GetOtpStatus(otp_pb2.GetOtpStatusRequest(phone_number=phone), timeout=10)


async def state_becomes(
    stub: otp_pb2_grpc.OtpServiceStub, state: int, phone: str = PHONE
) -> otp_pb2.GetOtpStatusResponse:
    """GetOtpStatus once the number's code is in ``state`` (reports are applied after the 200)."""
    answers: list[otp_pb2.GetOtpStatusResponse] = []

    async def reached() -> bool:
        answers.append(await status(stub, phone))
        return answers[-1].state == state

    await eventually(reached)
    return answers[-1]


@pytest.fixture
async def gateway(make_gateway: MakeGateway, interakt: FakeInterakt) -> Gateway:
    """A server whose fake Interakt reports to its webhook (no report until a test asks)."""
    return reporting(await make_gateway(), interakt)


def reporting(gateway: Gateway, interakt: FakeInterakt) -> Gateway:
    """``gateway``, with the fake Interakt's reports going to its webhook."""
    interakt.webhook_url, interakt.webhook_secret = gateway.webhook_url, WEBHOOK_SECRET
    return gateway


async def sent_message(gateway: Gateway, interakt: FakeInterakt, phone: str = PHONE) -> Queued:
    """Send a code to ``phone``; the message the fake queued for it."""
    await send(gateway.stub, phone)
    return interakt.queued[-1]


# --- GetOtpStatus ------------------------------------------------------------------------------


async def test_status_of_a_sent_code_says_queued_and_never_carries_the_code(
    gateway: Gateway, interakt: FakeInterakt
) -> None:
    sent = await send(gateway.stub)
    answer = await status(gateway.stub)
    assert answer.state == otp_pb2.DELIVERY_STATE_QUEUED
    assert answer.channel == otp_pb2.CHANNEL_TEXT
    assert answer.message_id == sent.message_id == interakt.queued[0].id
    assert answer.failure_reason == ""
    assert answer.failure == otp_pb2.DELIVERY_FAILURE_UNSPECIFIED
    assert answer.language == ""  # a Text message has none
    assert not answer.verified
    assert answer.expires_at == sent.expires_at
    assert answer.resend_after_seconds == sent.resend_after_seconds == 30
    # The send put its id in callbackData, for the reports to name.
    assert interakt.queued[0].callback_data
    code = interakt.received[0].code
    assert code.encode() not in answer.SerializeToString()


async def test_status_says_when_a_send_will_be_accepted_as_the_refusal_does(
    make_gateway: MakeGateway, interakt: FakeInterakt, redis_db: redis.Redis
) -> None:
    """resend_after_seconds is the RetryInfo of the refusal a send now would get, exactly:
    whole seconds rounded up, whichever limit holds the number."""
    gateway = await make_gateway(max_failed_verifies_per_hour=2)
    await send(gateway.stub)
    # Half a second into the cooldown: 29.5 s left, which is 30 whole seconds.
    age(redis_db, f"otp:{{{PHONE}}}:s", 0.5)
    answer = await status(gateway.stub)
    with pytest.raises(grpc.aio.AioRpcError) as cooling:
        await send(gateway.stub)
    assert answer.resend_after_seconds == retry_delay(cooling.value) == 30

    # Past the cooldown, but over the hourly budget of wrong codes: paused for the hour.
    age(redis_db, f"otp:{{{PHONE}}}:s", 60)
    code = interakt.received[0].code
    for _ in range(2):
        await verify(gateway.stub, wrong_code(code))
    answer = await status(gateway.stub)
    with pytest.raises(grpc.aio.AioRpcError) as paused:
        await send(gateway.stub)
    assert "verification is paused" in (paused.value.details() or "")
    assert answer.resend_after_seconds == retry_delay(paused.value) == 3600


async def test_status_of_a_number_without_a_live_code_is_not_found(
    gateway: Gateway, redis_db: redis.Redis
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await status(gateway.stub)
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    assert "NO_CODE_SENT" in str(missing.value.trailing_metadata())
    await send(gateway.stub)
    # The code expires, and its delivery record with it (ageing it as the clock would).
    for key in redis_db.keys(f"otp:{{{PHONE}}}:*"):
        redis_db.pexpire(key, 1)

    async def expired() -> bool:
        return not redis_db.exists(f"otp:{{{PHONE}}}:d")

    await eventually(expired)
    with pytest.raises(grpc.aio.AioRpcError) as expired:
        await status(gateway.stub)
    assert expired.value.code() == grpc.StatusCode.NOT_FOUND


async def test_status_needs_a_caller_token_and_a_valid_number(gateway: Gateway) -> None:
    await send(gateway.stub)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await gateway.stub.GetOtpStatus(
            otp_pb2.GetOtpStatusRequest(phone_number=PHONE),
            metadata=(("authorization", "Bearer not-a-token-of-anyone"),),
            timeout=10,
        )
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.aio.AioRpcError) as invalid:
        await status(gateway.stub, "12")
    assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_status_says_verified_once_a_code_is(
    gateway: Gateway, interakt: FakeInterakt
) -> None:
    await send(gateway.stub)
    assert not (await status(gateway.stub)).verified
    assert (await verify(gateway.stub, interakt.received[0].code)).verified
    answer = await status(gateway.stub)
    assert answer.verified
    assert answer.state == otp_pb2.DELIVERY_STATE_QUEUED


async def test_status_of_a_test_number_is_queued_on_the_test_channel(
    make_gateway: MakeGateway,
) -> None:
    gateway = await make_gateway(test_numbers=(("+919999900001", "246810"),))
    await send(gateway.stub, "+919999900001")
    answer = await status(gateway.stub, "+919999900001")
    assert (answer.state, answer.channel, answer.message_id) == (
        otp_pb2.DELIVERY_STATE_QUEUED,
        otp_pb2.CHANNEL_TEST,
        "",
    )


async def test_a_failed_send_leaves_the_status_of_the_code_before_it(
    make_gateway: MakeGateway, interakt: FakeInterakt
) -> None:
    gateway = await make_gateway(resend_cooldown_seconds=0)
    first = await send(gateway.stub)
    interakt.answer(refusal("Something new"))
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await send(gateway.stub)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    answer = await status(gateway.stub)
    assert answer.message_id == first.message_id
    assert answer.expires_at == first.expires_at


# --- the webhook: reports applied --------------------------------------------------------------


async def test_reports_move_the_state_queued_sent_delivered_read(
    gateway: Gateway, interakt: FakeInterakt
) -> None:
    message = await sent_message(gateway, interakt)
    for status_name, state in (
        ("sent", otp_pb2.DELIVERY_STATE_SENT),
        ("delivered", otp_pb2.DELIVERY_STATE_DELIVERED),
        ("read", otp_pb2.DELIVERY_STATE_READ),
    ):
        assert await interakt.report(message, status_name) == 200
        await state_becomes(gateway.stub, state)


async def test_the_fake_reports_on_its_own_redelivered_and_out_of_order(
    gateway: Gateway, interakt: FakeInterakt, http: aiohttp.ClientSession
) -> None:
    interakt.reports, interakt.redeliver, interakt.reverse = (
        ("sent", "delivered", "read"),
        True,
        True,
    )
    _, before = await scrape(http, gateway.url)
    await send(gateway.stub)
    await interakt.reports_done()
    assert interakt.report_answers == [200] * 6
    await state_becomes(gateway.stub, otp_pb2.DELIVERY_STATE_READ)

    async def all_applied() -> bool:
        _, after = await scrape(http, gateway.url)
        counted = {
            result: delta(before, after, "otp_delivery_reports_total", result=result)
            for result in ("applied", "unchanged")
        }
        return counted["applied"] + counted["unchanged"] == 6

    await eventually(all_applied)
    _, after = await scrape(http, gateway.url)
    # read came first: the only change; every later report (older, or again) changed nothing.
    assert delta(before, after, "otp_delivery_reports_total", result="applied") == 1
    assert delta(before, after, "otp_delivery_reports_total", result="unchanged") == 5
    assert (await status(gateway.stub)).state == otp_pb2.DELIVERY_STATE_READ


async def test_a_late_sent_never_takes_delivered_back_and_failed_after_delivered_is_ignored(
    gateway: Gateway, interakt: FakeInterakt
) -> None:
    message = await sent_message(gateway, interakt)
    assert await interakt.report(message, "delivered") == 200
    await state_becomes(gateway.stub, otp_pb2.DELIVERY_STATE_DELIVERED)
    assert await interakt.report(message, "sent") == 200
    assert await interakt.report(message, "failed", reason="too late") == 200
    assert await interakt.report(message, "read") == 200
    # Applied in order of arrival: once read shows, the two before it were applied too.
    answer = await state_becomes(gateway.stub, otp_pb2.DELIVERY_STATE_READ)
    assert answer.failure_reason == ""


async def test_failed_says_why_and_lifts_the_cooldown_but_not_the_hourly_cap(
    make_gateway: MakeGateway, interakt: FakeInterakt
) -> None:
    gateway = reporting(await make_gateway(max_sends_per_hour=2), interakt)
    message = await sent_message(gateway, interakt)
    with pytest.raises(grpc.aio.AioRpcError) as cooling:
        await send(gateway.stub)
    assert cooling.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

    assert await interakt.report(message, "failed", reason="Message undeliverable") == 200
    answer = await state_becomes(gateway.stub, otp_pb2.DELIVERY_STATE_FAILED)
    assert answer.failure_reason == "Message undeliverable"
    assert answer.resend_after_seconds == 0
    second = await send(gateway.stub)  # at once: the user never got the first code
    assert second.message_id != message.id
    assert (await status(gateway.stub)).state == otp_pb2.DELIVERY_STATE_QUEUED

    # The failed send still counts against the hour: a third is over the cap of two, even
    # once the second fails too.
    assert await interakt.report(interakt.queued[-1], "failed") == 200
    await state_becomes(gateway.stub, otp_pb2.DELIVERY_STATE_FAILED)
    assert (await status(gateway.stub)).resend_after_seconds > 3000
    with pytest.raises(grpc.aio.AioRpcError) as capped:
        await send(gateway.stub)
    assert capped.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "HOURLY_SEND_CAP" in str(capped.value.trailing_metadata())
    assert retry_delay(capped.value) > 3000


@pytest.mark.parametrize("callback_at", ["message", "meta_data"])
async def test_a_report_before_the_send_is_answered_is_applied(
    gateway: Gateway, interakt: FakeInterakt, callback_at: CallbackAt
) -> None:
    """Interakt may report before its answer to the send is recorded: the callback data finds
    the message, at either place a report has it."""
    interakt.reports, interakt.early = ("sent",), True
    interakt.callback_at = callback_at
    sent = await send(gateway.stub)
    assert interakt.report_answers == [200]
    answer = await state_becomes(gateway.stub, otp_pb2.DELIVERY_STATE_SENT)
    assert answer.message_id == sent.message_id


async def test_reports_on_unknown_or_earlier_messages_and_other_types_are_acknowledged_and_dropped(
    gateway: Gateway, interakt: FakeInterakt, redis_db: redis.Redis, http: aiohttp.ClientSession
) -> None:
    first = await sent_message(gateway, interakt)
    _, before = await scrape(http, gateway.url)
    snapshot = redis_snapshot(redis_db)
    stranger = Queued("msg-not-ours", "+91", "7003848599", None)
    assert await interakt.report(stranger, "delivered") == 200
    assert await interakt.report(first, "read", kind="message_campaign_read") == 200
    assert await interakt.report(first, "read", kind="message_received") == 200

    async def counted() -> bool:
        _, after = await scrape(http, gateway.url)
        return delta(before, after, "otp_delivery_reports_total", result="unknown") == 1

    await eventually(counted)
    _, after = await scrape(http, gateway.url)
    assert delta(before, after, "otp_delivery_reports_total", result="ignored") == 2
    assert redis_snapshot(redis_db) == snapshot

    # A report on the first message once a second code was sent: no longer the latest.
    await _age_cooldown(redis_db)
    await send(gateway.stub)
    await interakt.report(first, "failed")
    await interakt.report(interakt.queued[-1], "sent")
    answer = await state_becomes(gateway.stub, otp_pb2.DELIVERY_STATE_SENT)
    assert answer.message_id == interakt.queued[-1].id


async def _age_cooldown(redis_db: redis.Redis) -> None:
    """Move the number's sends a minute into the past, as the clock would."""
    key = f"otp:{{{PHONE}}}:s"
    redis_db.zadd(key, {m: s - 60_000 for m, s in redis_db.zrange(key, 0, -1, withscores=True)})


async def test_a_report_on_an_expired_code_is_acknowledged_and_dropped(
    gateway: Gateway, interakt: FakeInterakt, redis_db: redis.Redis, http: aiohttp.ClientSession
) -> None:
    message = await sent_message(gateway, interakt)
    redis_db.delete(f"otp:{{{PHONE}}}:d")  # what expiry does
    _, before = await scrape(http, gateway.url)
    assert await interakt.report(message, "delivered") == 200

    async def dropped() -> bool:
        _, after = await scrape(http, gateway.url)
        return delta(before, after, "otp_delivery_reports_total", result="unknown") == 1

    await eventually(dropped)
    assert redis_db.keys(f"otp:{{{PHONE}}}:d") == []


# --- the webhook: who may post -----------------------------------------------------------------


async def test_unsigned_or_wrongly_signed_reports_are_401_and_change_nothing(
    gateway: Gateway,
    interakt: FakeInterakt,
    redis_db: redis.Redis,
    http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    message = await sent_message(gateway, interakt)
    snapshot = redis_snapshot(redis_db)
    _, before = await scrape(http, gateway.url)
    assert await interakt.report(message, "failed", signature="none") == 401
    assert await interakt.report(message, "failed", signature="wrong") == 401
    body = json.dumps(report_body(message, "failed")).encode()
    # Signed over other bytes (the same JSON written differently), or signed twice.
    other = json.dumps(report_body(message, "failed"), indent=4).encode()
    for headers in (
        [("Interakt-Signature", sign(other, WEBHOOK_SECRET))],
        [("Interakt-Signature", sign(body, WEBHOOK_SECRET))] * 2,
        [("Interakt-Signature", sign(body, WEBHOOK_SECRET).removeprefix("sha256="))],
    ):
        async with http.post(gateway.webhook_url, data=body, headers=headers) as answer:
            assert answer.status == 401
            reply = await answer.json()
            assert reply["code"] == grpc.StatusCode.UNAUTHENTICATED.value[0]
            assert "Interakt-Signature" in reply["message"]
    text, after = await scrape(http, gateway.url)
    assert delta(before, after, "otp_delivery_reports_total", result="rejected") == 5
    assert redis_snapshot(redis_db) == snapshot
    assert (await status(gateway.stub)).state == otp_pb2.DELIVERY_STATE_QUEUED
    # The secret, and what it signs, stay out of the logs and the metrics.
    for where in (everything_in(caplog.records), text):
        assert WEBHOOK_SECRET not in where
        assert sign(body, WEBHOOK_SECRET) not in where
    # The hex digest is a number: written in capitals, it is the same signature.
    upper = "sha256=" + sign(body, WEBHOOK_SECRET).removeprefix("sha256=").upper()
    async with http.post(
        gateway.webhook_url, data=body, headers={"Interakt-Signature": upper}
    ) as answer:
        assert answer.status == 200
    await state_becomes(gateway.stub, otp_pb2.DELIVERY_STATE_FAILED)


async def test_the_webhook_needs_no_caller_token(
    make_gateway: MakeGateway, interakt: FakeInterakt
) -> None:
    """Interakt has no caller token; the signature is its credential, with metrics guarded too."""
    gateway = reporting(await make_gateway(metrics_auth=True), interakt)
    message = await sent_message(gateway, interakt)
    assert await interakt.report(message, "delivered") == 200  # no Authorization header
    await state_becomes(gateway.stub, otp_pb2.DELIVERY_STATE_DELIVERED)


async def test_without_a_secret_the_route_is_off(
    make_gateway: MakeGateway, http: aiohttp.ClientSession
) -> None:
    gateway = await make_gateway(interakt_webhook_secret="")
    async with http.post(gateway.webhook_url, data=b"{}") as answer:
        assert answer.status == 404


async def test_signed_reports_that_are_not_understood_are_acknowledged(
    gateway: Gateway,
    interakt: FakeInterakt,
    http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Signed, so Interakt's: a 4xx would only count against the webhook, never fix it."""
    message = await sent_message(gateway, interakt)
    _, before = await scrape(http, gateway.url)
    missing_id = report_body(message, "delivered")
    del missing_id["data"]["message"]["id"]
    for body in (b"not json", b"[1]", json.dumps(missing_id).encode()):
        assert await interakt.post_report(body) == 200
    _, after = await scrape(http, gateway.url)
    assert delta(before, after, "otp_delivery_reports_total", result="malformed") == 3
    assert [r.levelname for r in caplog.records if r.event == "delivery_report_malformed"] == [  # type: ignore[attr-defined]
        "WARNING"
    ] * 3
    # A type that is no type of ours, whatever its JSON shape, is ignored: never a 500.
    for kind in ([], ["message_api_delivered"], {"a": 1}, 7, None, True):
        odd = {**report_body(message, "delivered"), "type": kind}
        assert await interakt.post_report(json.dumps(odd).encode()) == 200
    _, after = await scrape(http, gateway.url)
    assert delta(before, after, "otp_delivery_reports_total", result="ignored") == 6


async def test_a_report_over_the_size_limit_is_413(
    gateway: Gateway, interakt: FakeInterakt
) -> None:
    body = json.dumps({"type": "message_api_sent", "padding": "x" * MAX_REPORT_BYTES}).encode()
    assert await interakt.post_report(body) == 413


# --- the webhook: a storm -------------------------------------------------------------------


async def test_a_storm_of_reports_is_answered_and_every_one_applied(
    make_gateway: MakeGateway, interakt: FakeInterakt, http: aiohttp.ClientSession
) -> None:
    """1,000 reports in a few seconds, redelivered and out of order: every one answered 200,
    every one applied (or found to change nothing), and every number ends where its furthest
    report puts it."""
    gateway = await make_gateway(caller_sends_per_minute=1_000, interakt_sends_per_minute=1_000)
    reporting(gateway, interakt)
    phones = [f"+9170038{n:05d}" for n in range(200)]
    for batch in range(0, len(phones), 50):
        await asyncio.gather(*(send(gateway.stub, phone) for phone in phones[batch : batch + 50]))
    # A quarter of the messages fail, the others are read; each gets every report of its way
    # once, and some twice: five reports a message.
    messages = {message.country_code + message.phone_number: message for message in interakt.queued}
    final = {}
    plan = []
    for index, phone in enumerate(phones):
        steps = ["sent", "failed"] if index % 4 == 0 else ["sent", "delivered", "read"]
        final[phone] = otp_pb2.DeliveryState.Value(f"DELIVERY_STATE_{steps[-1].upper()}")
        plan += [(messages[phone], step) for step in itertools.islice(itertools.cycle(steps), 5)]
    random.Random(11).shuffle(plan)
    assert len(plan) == 1_000
    _, before = await scrape(http, gateway.url)
    queue: asyncio.Queue[tuple[Queued, str]] = asyncio.Queue()
    for item in plan:
        queue.put_nowait(item)

    async def poster() -> None:
        while not queue.empty():
            message, step = queue.get_nowait()
            await interakt.report(message, step)

    await asyncio.gather(*(poster() for _ in range(20)))
    assert interakt.report_answers == [200] * 1_000

    async def all_applied() -> bool:
        _, after = await scrape(http, gateway.url)
        results = ("applied", "unchanged", "unknown", "lost")
        done = sum(delta(before, after, "otp_delivery_reports_total", result=r) for r in results)
        return done == 1_000

    await eventually(all_applied)
    _, after = await scrape(http, gateway.url)
    assert delta(before, after, "otp_delivery_reports_total", result="unknown") == 0
    assert delta(before, after, "otp_delivery_reports_total", result="lost") == 0
    for phone in phones:
        answer = await status(gateway.stub, phone)
        assert (answer.message_id, answer.state) == (messages[phone].id, final[phone]), phone


# --- done when: over gRPC and REST -------------------------------------------------------------


async def test_send_retry_with_the_same_key_then_watch_it_be_read_over_grpc(
    gateway: Gateway, interakt: FakeInterakt
) -> None:
    request = otp_pb2.SendOtpRequest(phone_number=PHONE, idempotency_key="login-7f3a")
    first = await gateway.stub.SendOtp(request, timeout=10)
    again = await gateway.stub.SendOtp(request, timeout=10)  # a retry after a lost answer
    assert again == first
    assert len(interakt.received) == 1
    message = interakt.queued[0]
    await state_becomes(gateway.stub, otp_pb2.DELIVERY_STATE_QUEUED)
    for step, state in (
        ("sent", otp_pb2.DELIVERY_STATE_SENT),
        ("delivered", otp_pb2.DELIVERY_STATE_DELIVERED),
        ("read", otp_pb2.DELIVERY_STATE_READ),
    ):
        await interakt.report(message, step)
        await state_becomes(gateway.stub, state)
    assert (await verify(gateway.stub, interakt.received[0].code)).verified
    assert (await status(gateway.stub)).verified


async def test_send_retry_then_failed_then_resend_at_once_over_rest(
    gateway: Gateway, interakt: FakeInterakt, http: aiohttp.ClientSession
) -> None:
    send_url = gateway.url + "/api/v1/auth/send-otp"
    body = {"phone_number": PHONE, "idempotency_key": "login-1"}
    async with http.post(send_url, json=body) as answer:
        assert answer.status == 200
        first = await answer.json()
    async with http.post(send_url, json=body) as answer:
        assert (answer.status, await answer.json()) == (200, first)
    assert len(interakt.received) == 1

    async def rest_status() -> dict[str, object]:
        async with http.get(gateway.url + STATUS, params={"phone_number": PHONE}) as answer:
            assert answer.status == 200
            reply: dict[str, object] = await answer.json()
            return reply

    assert (await rest_status())["state"] == "DELIVERY_STATE_QUEUED"
    await interakt.report(interakt.queued[0], "sent")
    await interakt.report(
        interakt.queued[0], "failed", reason="Number is not on WhatsApp", error_code=131026
    )

    async def failed() -> bool:
        return (await rest_status())["state"] == "DELIVERY_STATE_FAILED"

    await eventually(failed)
    reply = await rest_status()
    assert reply["failure_reason"] == "Number is not on WhatsApp"
    assert reply["failure"] == "DELIVERY_FAILURE_NOT_ON_WHATSAPP"
    assert reply["resend_after_seconds"] == 0
    assert reply["message_id"] == first["message_id"]
    assert set(reply) == {field.name for field in otp_pb2.GetOtpStatusResponse.DESCRIPTOR.fields}
    async with http.post(send_url, json={**body, "idempotency_key": "login-2"}) as answer:
        assert answer.status == 200
    assert (await rest_status())["state"] == "DELIVERY_STATE_QUEUED"


async def test_rest_status_of_a_number_without_a_code_is_404_and_needs_its_parameter(
    gateway: Gateway, http: aiohttp.ClientSession
) -> None:
    async with http.get(gateway.url + STATUS, params={"phone_number": PHONE}) as answer:
        assert answer.status == 404
        reply = await answer.json()
        assert reply["code"] == grpc.StatusCode.NOT_FOUND.value[0]
        assert reply["details"][0]["reason"] == "NO_CODE_SENT"
    # Written unencoded, the + arrives as a space: read as the + it was.
    async with http.get(gateway.url + STATUS + f"?phone_number={PHONE}") as answer:
        assert answer.status == 404
    async with http.get(gateway.url + STATUS) as answer:
        assert answer.status == 400
        assert (await answer.json())["message"] == "phone_number: is required"
    encoded = PHONE.replace("+", "%2B")
    async with http.get(gateway.url + STATUS + f"?phone_number={encoded}&phone_number=1") as answer:
        assert answer.status == 400
        assert (await answer.json())["message"] == "phone_number: given more than once"
    async with http.get(gateway.url + STATUS + f"?phone_number={PHONE[1:]}") as answer:
        assert answer.status == 400
        assert "%2B" in (await answer.json())["message"]
    async with http.get(
        gateway.url + STATUS, params={"phone_number": PHONE}, headers={"Authorization": "Bearer x"}
    ) as answer:
        assert answer.status == 401


# --- typed failures, the language, and whose status it is ----------------------------------------


@pytest.mark.parametrize(
    ("error_code", "reason", "failure"),
    [
        (131026, "Message undeliverable", otp_pb2.DELIVERY_FAILURE_NOT_ON_WHATSAPP),
        ("131026", "Failed", otp_pb2.DELIVERY_FAILURE_NOT_ON_WHATSAPP),
        (None, "Message Undeliverable.", otp_pb2.DELIVERY_FAILURE_NOT_ON_WHATSAPP),
        (
            132001,
            "Template name does not exist in the translation",
            otp_pb2.DELIVERY_FAILURE_TEMPLATE_UNAVAILABLE,
        ),
        (131008, "Required parameter is missing", otp_pb2.DELIVERY_FAILURE_TEMPLATE_UNAVAILABLE),
        (
            131049,
            "This message was not delivered to maintain healthy ecosystem engagement.",
            otp_pb2.DELIVERY_FAILURE_RATE_LIMITED,
        ),
        (
            131056,
            "(Business Account, Consumer Account) pair rate limit hit",
            otp_pb2.DELIVERY_FAILURE_RATE_LIMITED,
        ),
        (130429, "Rate limit hit", otp_pb2.DELIVERY_FAILURE_RATE_LIMITED),
        (None, "Message expired", otp_pb2.DELIVERY_FAILURE_EXPIRED),
        (1, "Something new", otp_pb2.DELIVERY_FAILURE_UNKNOWN),
        (None, None, otp_pb2.DELIVERY_FAILURE_UNKNOWN),
    ],
)
async def test_a_failed_report_is_typed_from_its_error_code_else_its_words(
    gateway: Gateway,
    interakt: FakeInterakt,
    error_code: int | str | None,
    reason: str | None,
    failure: int,
) -> None:
    message = await sent_message(gateway, interakt)
    assert await interakt.report(message, "failed", reason=reason, error_code=error_code) == 200
    answer = await state_becomes(gateway.stub, otp_pb2.DELIVERY_STATE_FAILED)
    assert answer.failure == failure
    assert answer.failure_reason == (reason or "")
    # Delivered after all (reports come in any order): no failure left.
    assert await interakt.report(message, "delivered") == 200
    answer = await state_becomes(gateway.stub, otp_pb2.DELIVERY_STATE_DELIVERED)
    assert answer.failure == otp_pb2.DELIVERY_FAILURE_UNSPECIFIED


async def test_status_and_the_rest_route_say_the_template_language(
    make_gateway: MakeGateway, interakt: FakeInterakt, http: aiohttp.ClientSession
) -> None:
    gateway = await make_gateway(template_name="Auth", template_languages=(("91", "hi"),))
    await send(gateway.stub)
    assert (await status(gateway.stub)).language == "hi"
    async with http.get(gateway.url + STATUS, params={"phone_number": PHONE}) as answer:
        reply = await answer.json()
    assert (reply["channel"], reply["language"]) == ("CHANNEL_TEMPLATE", "hi")


async def test_an_array_of_reports_is_applied_each_once_and_a_malformed_one_ignored(
    gateway: Gateway, interakt: FakeInterakt, http: aiohttp.ClientSession
) -> None:
    message = await sent_message(gateway, interakt)
    other_phone = "+917003848502"
    other = await sent_message(gateway, interakt, other_phone)
    _, before = await scrape(http, gateway.url)
    reports = [
        report_body(message, "sent"),
        42,
        {"type": "message_api_read"},
        report_body(other, "failed", reason="Message undeliverable", error_code=131026),
        report_body(message, "delivered", callback_at="meta_data"),
    ]
    assert await interakt.post_report(json.dumps(reports).encode()) == 200
    answer = await state_becomes(gateway.stub, otp_pb2.DELIVERY_STATE_DELIVERED)
    assert answer.message_id == message.id
    other_answer = await state_becomes(gateway.stub, otp_pb2.DELIVERY_STATE_FAILED, other_phone)
    assert other_answer.failure == otp_pb2.DELIVERY_FAILURE_NOT_ON_WHATSAPP

    async def counted() -> bool:
        _, after = await scrape(http, gateway.url)
        return delta(before, after, "otp_delivery_reports_total", result="applied") == 3

    await eventually(counted)
    _, after = await scrape(http, gateway.url)
    assert delta(before, after, "otp_delivery_reports_total", result="malformed") == 2
    assert await interakt.post_report(b"[]") == 200


OTHER_CALLER, OTHER_TOKEN = "signup", "another-caller-token-abcdefgh"
READER, READER_TOKEN = "support", "a-support-token-0123456789"


@pytest.mark.parametrize("readers", [frozenset(), frozenset({READER})])
async def test_status_is_for_the_caller_that_sent_the_code_unless_one_may_read_all(
    make_gateway: MakeGateway, http: aiohttp.ClientSession, readers: frozenset[str]
) -> None:
    """Another caller is told NOT_FOUND, exactly as for a number without a code (SECURITY.md);
    OTP_STATUS_READERS names callers that see every status."""
    gateway = await make_gateway(
        client_tokens=((CALLER, TOKEN), (OTHER_CALLER, OTHER_TOKEN), (READER, READER_TOKEN)),
        status_readers=readers,
    )
    other = {"authorization": f"Bearer {OTHER_TOKEN}"}
    with pytest.raises(grpc.aio.AioRpcError) as never_sent:
        await status(gateway.stub, "+917003848509")
    await send(gateway.stub)
    assert (await status(gateway.stub)).message_id  # the sender sees its own
    with pytest.raises(grpc.aio.AioRpcError) as hidden:
        await gateway.stub.GetOtpStatus(
            otp_pb2.GetOtpStatusRequest(phone_number=PHONE), timeout=10, metadata=(*other.items(),)
        )
    assert hidden.value.code() == grpc.StatusCode.NOT_FOUND
    assert hidden.value.details() == never_sent.value.details()
    assert "NO_CODE_SENT" in str(hidden.value.trailing_metadata())

    async def rest_status(headers: dict[str, str]) -> int:
        async with http.get(
            gateway.url + STATUS, params={"phone_number": PHONE}, headers=headers
        ) as answer:
            if answer.status == 404:
                assert (await answer.json())["details"][0]["reason"] == "NO_CODE_SENT"
            return answer.status

    assert await rest_status(other) == 404
    assert await rest_status({}) == 200  # the test caller's own token
    assert await rest_status({"authorization": f"Bearer {READER_TOKEN}"}) == (
        200 if readers else 404
    )
