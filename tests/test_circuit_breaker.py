"""The circuit breaker in front of Interakt, through the running server."""

from __future__ import annotations

import asyncio
import logging

import aiohttp
import grpc
import pytest
import redis
from otp.v1 import otp_pb2, otp_pb2_grpc

from tests.conftest import (
    PHONE,
    MakeGateway,
    assert_no_code_left,
    eventually,
    retry_delay,
    scrape,
    send,
)
from tests.fake_interakt import RATE_LIMITED, Answer, FakeInterakt, accepted, refusal
from tests.test_error_details import error_info

# The rules hold on every Redis deployment: one node, a Cluster, Sentinel's primary.
pytestmark = pytest.mark.redis_backends

OTHER_PHONES = ["+917003848502", "+917003848503", "+917003848504", "+917003848505"]
FAILING = Answer(503, None)


async def send_fails(stub: otp_pb2_grpc.OtpServiceStub, phone: str) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await send(stub, phone)
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE, failed.value.details()
    return failed.value


async def circuit(http: aiohttp.ClientSession, url: str) -> str:
    """The state the breaker's metric shows."""
    _, samples = await scrape(http, url)
    [state] = [
        dict(labels)["state"]
        for (name, labels), value in samples.items()
        if name == "otp_interakt_circuit_state" and value == 1
    ]
    return state


async def open_circuit(stub: otp_pb2_grpc.OtpServiceStub, interakt: FakeInterakt) -> None:
    """Fail three requests in a row (one send and its two retries): the threshold here."""
    before = len(interakt.received)
    interakt.answer(FAILING, FAILING, FAILING)
    await send_fails(stub, OTHER_PHONES[0])
    assert len(interakt.received) == before + 3


async def test_consecutive_failures_open_it_and_sends_are_refused_at_once(
    make_gateway: MakeGateway,
    interakt: FakeInterakt,
    redis_db: redis.Redis,
    http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    gateway = await make_gateway(breaker_failures=3, breaker_cooloff_seconds=600)
    assert await circuit(http, gateway.url) == "closed"
    await open_circuit(gateway.stub, interakt)
    assert await circuit(http, gateway.url) == "open"

    refused = await send_fails(gateway.stub, PHONE)
    info = error_info(refused)
    assert info.reason == "PROVIDER_CIRCUIT_OPEN"
    assert 500 < retry_delay(refused) <= 600
    assert "nothing was sent" in (refused.details() or "")
    # Nothing reached Interakt, and nothing was stored or counted (the three requests counted
    # are those made before it opened).
    assert len(interakt.received) == 3
    assert_no_code_left(redis_db)
    assert redis_db.zcard("otp:{senders}:caller-sends:tests") == 3
    [opened] = [r for r in caplog.records if getattr(r, "event", "") == "interakt_circuit"]
    assert (opened.levelname, opened.state) == ("WARNING", "open")  # type: ignore[attr-defined]


async def test_after_the_cooloff_one_trial_goes_through_and_closes_it(
    make_gateway: MakeGateway,
    interakt: FakeInterakt,
    http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, "otp_service.breaker")
    gateway = await make_gateway(breaker_failures=3, breaker_cooloff_seconds=0.5)
    await open_circuit(gateway.stub, interakt)
    hold = asyncio.Event()
    interakt.answer(accepted("msg-trial", hold=hold))

    async def send_once_allowed() -> otp_pb2.SendOtpResponse:
        while True:
            try:
                return await send(gateway.stub, PHONE)
            except grpc.aio.AioRpcError as exc:
                if error_info(exc).reason != "PROVIDER_CIRCUIT_OPEN":
                    raise
            await asyncio.sleep(0.05)

    trial = asyncio.ensure_future(send_once_allowed())

    async def trial_started() -> bool:
        return len(interakt.received) == 4

    await eventually(trial_started)
    assert await circuit(http, gateway.url) == "half_open"
    # While the trial runs, the others are still refused at once.
    refused = await send_fails(gateway.stub, OTHER_PHONES[1])
    assert error_info(refused).reason == "PROVIDER_CIRCUIT_OPEN"
    assert len(interakt.received) == 4
    hold.set()
    assert (await trial).message_id == "msg-trial"
    assert await circuit(http, gateway.url) == "closed"
    await send(gateway.stub, OTHER_PHONES[2])
    assert len(interakt.received) == 5
    states = [r.state for r in caplog.records if getattr(r, "event", "") == "interakt_circuit"]  # type: ignore[attr-defined]
    assert states == ["open", "half_open", "closed"]


async def test_a_failed_trial_opens_it_again(
    make_gateway: MakeGateway, interakt: FakeInterakt, http: aiohttp.ClientSession
) -> None:
    gateway = await make_gateway(breaker_failures=3, breaker_cooloff_seconds=0.5)
    await open_circuit(gateway.stub, interakt)
    interakt.answer(FAILING)

    async def trial_failed() -> bool:
        try:
            await send(gateway.stub, PHONE)
        except grpc.aio.AioRpcError:
            return len(interakt.received) == 4
        raise AssertionError("the trial should fail")

    await eventually(trial_failed)
    # One failure was enough: open again at once, and the trial itself was not retried.
    assert await circuit(http, gateway.url) == "open"
    refused = await send_fails(gateway.stub, OTHER_PHONES[1])
    assert error_info(refused).reason == "PROVIDER_CIRCUIT_OPEN"
    assert len(interakt.received) == 4


async def test_refusals_and_rate_limits_are_not_failures(
    make_gateway: MakeGateway, interakt: FakeInterakt, http: aiohttp.ClientSession
) -> None:
    gateway = await make_gateway(breaker_failures=2, breaker_cooloff_seconds=600)
    for phone in OTHER_PHONES[:3]:
        interakt.answer(refusal("Something new"))
        with pytest.raises(grpc.aio.AioRpcError):
            await send(gateway.stub, phone)
    limited = Answer(429, {"result": False, "message": RATE_LIMITED})
    interakt.answer(limited, limited, limited)
    error = await send_fails(gateway.stub, OTHER_PHONES[3])
    assert error_info(error).reason == "PROVIDER_UNAVAILABLE"
    assert await circuit(http, gateway.url) == "closed"
    await send(gateway.stub, PHONE)  # reaches Interakt
    assert len(interakt.received) == 7


async def test_only_failures_in_a_row_count(
    make_gateway: MakeGateway, interakt: FakeInterakt, http: aiohttp.ClientSession
) -> None:
    gateway = await make_gateway(breaker_failures=2, breaker_cooloff_seconds=600)
    for phone in OTHER_PHONES:
        interakt.answer(FAILING)  # then the retry succeeds
        await send(gateway.stub, phone)
    assert await circuit(http, gateway.url) == "closed"
    assert len(interakt.received) == 8


async def test_a_repeat_of_a_send_that_answered_gets_its_answer_while_it_is_open(
    make_gateway: MakeGateway, interakt: FakeInterakt
) -> None:
    gateway = await make_gateway(breaker_failures=3, breaker_cooloff_seconds=600)
    request = otp_pb2.SendOtpRequest(phone_number=PHONE, idempotency_key="key-1")
    sent = await gateway.stub.SendOtp(request, timeout=10)
    await open_circuit(gateway.stub, interakt)
    assert await gateway.stub.SendOtp(request, timeout=10) == sent
    other = otp_pb2.SendOtpRequest(phone_number=OTHER_PHONES[1], idempotency_key="key-2")
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await gateway.stub.SendOtp(other, timeout=10)
    assert error_info(refused.value).reason == "PROVIDER_CIRCUIT_OPEN"


async def test_test_numbers_are_sent_while_it_is_open(
    make_gateway: MakeGateway, interakt: FakeInterakt
) -> None:
    gateway = await make_gateway(
        breaker_failures=3,
        breaker_cooloff_seconds=600,
        test_numbers=(("+919999900001", "246810"),),
    )
    await open_circuit(gateway.stub, interakt)
    tried = len(interakt.received)
    answer = await send(gateway.stub, "+919999900001")
    assert answer.channel == otp_pb2.CHANNEL_TEST
    assert len(interakt.received) == tried


def numbers(count: int, start: int = 0) -> list[str]:
    return [f"+9170038486{i:02d}" for i in range(start, start + count)]


async def test_a_callers_short_deadline_does_not_open_it_for_everyone(
    make_gateway: MakeGateway, interakt: FakeInterakt, http: aiohttp.ClientSession
) -> None:
    """Cut short by the caller's own deadline, a request says nothing of Interakt's health."""
    gateway = await make_gateway(breaker_failures=3, breaker_cooloff_seconds=600)
    interakt.answer(*[accepted(f"msg-{i}", delay=0.3) for i in range(21)])
    for phone in numbers(20):
        with pytest.raises(grpc.aio.AioRpcError) as cut:
            await gateway.stub.SendOtp(otp_pb2.SendOtpRequest(phone_number=phone), timeout=0.15)
        assert cut.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    assert await circuit(http, gateway.url) == "closed"
    # Another caller, with time to wait for Interakt, is served. Which of the queued answers it
    # gets depends on how many of the cut-short sends still had time to reach Interakt (one
    # whose deadline is nearly spent is answered without a request, as it should be).
    sent = await send(gateway.stub, PHONE)
    assert sent.message_id in {f"msg-{i}" for i in range(21)}
    assert interakt.received[-1].body["phoneNumber"] == PHONE[3:]


async def test_a_trial_cut_short_by_its_caller_neither_closes_nor_opens_it(
    make_gateway: MakeGateway, interakt: FakeInterakt, http: aiohttp.ClientSession
) -> None:
    gateway = await make_gateway(breaker_failures=3, breaker_cooloff_seconds=0.5)
    await open_circuit(gateway.stub, interakt)
    interakt.answer(accepted("msg-slow", delay=0.3), accepted("msg-trial"))
    [short, other] = numbers(2)

    async def trial_cut_short() -> bool:
        try:
            await gateway.stub.SendOtp(otp_pb2.SendOtpRequest(phone_number=short), timeout=0.15)
        except grpc.aio.AioRpcError as exc:
            if error_info(exc).reason == "PROVIDER_CIRCUIT_OPEN":
                return False
            return len(interakt.received) == 4
        raise AssertionError("the short call should not get Interakt's answer in time")

    await eventually(trial_cut_short)
    assert await circuit(http, gateway.url) == "half_open"
    # The trial was given back: the next send is the trial, and Interakt's answer closes it.
    assert (await send(gateway.stub, other)).message_id == "msg-trial"
    assert await circuit(http, gateway.url) == "closed"


async def test_a_cancelled_trial_is_given_back(
    make_gateway: MakeGateway,
    interakt: FakeInterakt,
    redis_db: redis.Redis,
    http: aiohttp.ClientSession,
) -> None:
    gateway = await make_gateway(breaker_failures=3, breaker_cooloff_seconds=0.5)
    await open_circuit(gateway.stub, interakt)
    hold = asyncio.Event()
    interakt.answer(accepted("msg-held", hold=hold), accepted("msg-next"))
    [cancelled, other] = numbers(2)

    async def trial_in_flight() -> bool:
        call = gateway.stub.SendOtp(otp_pb2.SendOtpRequest(phone_number=cancelled), timeout=10)
        try:
            async with asyncio.timeout(0.5):
                await call
        except grpc.aio.AioRpcError as exc:
            if error_info(exc).reason != "PROVIDER_CIRCUIT_OPEN":
                raise
            return False
        except TimeoutError:
            # Held by Interakt: the trial is in flight. The caller gives up.
            assert len(interakt.received) == 4
            return True
        raise AssertionError("the trial should be held")

    try:
        await eventually(trial_in_flight)

        async def server_gave_up() -> bool:
            # The server recorded the cancelled send (in doubt: Interakt holds it).
            return redis_db.hget(f"otp:{{{cancelled}}}:d", "ch") is not None

        await eventually(server_gave_up)
        assert await circuit(http, gateway.url) == "half_open"
        # Not stuck half open behind a trial nobody runs: the next send is tried.
        assert (await send(gateway.stub, other)).message_id == "msg-next"
        assert await circuit(http, gateway.url) == "closed"
    finally:
        hold.set()
