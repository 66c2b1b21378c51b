"""Abuse limits through the real server: country allowlist, caller budget, wrong-code budget."""

from __future__ import annotations

import asyncio

import grpc
import pytest
import redis
from otp.v1 import otp_pb2, otp_pb2_grpc
from prometheus_client import REGISTRY

from otp_service import Settings
from otp_service.connections.embedded_redis import free_port
from otp_service.store import SCRIPT_COMMANDS
from tests.conftest import (
    PHONE,
    TOKEN,
    MakeServer,
    MakeService,
    age,
    redis_snapshot,
    retry_delay,
    send,
    verify,
    wrong_code,
)
from tests.fake_interakt import NOT_A_CONTACT, Answer, FakeInterakt, refusal
from tests.test_error_details import error_info

# The rules hold on every Redis deployment: one node, a Cluster, Sentinel's primary.
pytestmark = pytest.mark.redis_backends

OTHER_PHONES = ["+917003848502", "+917003848503", "+917003848504", "+917003848505"]


async def send_as(stub: otp_pb2_grpc.OtpServiceStub, token: str, phone: str) -> None:
    """SendOtp to ``phone`` with the caller token ``token``."""
    await stub.SendOtp(
        otp_pb2.SendOtpRequest(phone_number=phone),
        metadata=(("authorization", f"Bearer {token}"),),
        timeout=10,
    )


# What others send Redis on their own schedule: the inspecting INFO, the readiness ping (once a
# second), the sentinels' hello messages (PUBLISH every 2 s) and the replicas' acknowledgements.
_BACKGROUND = frozenset({"info", "ping", "publish", "replconf"})


def redis_calls(db: redis.Redis) -> dict[str, int]:
    """Commands Redis has run so far, by name, leaving out the background ones."""
    stats = db.info("commandstats")
    return {
        name: value["calls"]
        for stat, value in stats.items()
        if (name := stat.removeprefix("cmdstat_")) not in _BACKGROUND
    }


def round_trips_since(db: redis.Redis, before: dict[str, int]) -> dict[str, int]:
    """Commands sent to Redis since ``before``, not counting those scripts ran inside it."""
    after = redis_calls(db)
    return {
        name: n - before.get(name, 0)
        for name, n in after.items()
        if n != before.get(name, 0) and name not in SCRIPT_COMMANDS
    }


async def test_numbers_outside_the_allowed_countries_are_refused_before_anything_happens(
    make_service: MakeService, interakt: FakeInterakt, redis_db: redis.Redis
) -> None:
    stub = await make_service(allowed_countries=frozenset({"91", "44"}))
    for phone, country in (("+14155552671", "+1"), ("+97143020000", "+971")):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await send(stub, phone)
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert refused.value.details() == (
            f"phone_number: codes are not sent to {country} numbers (allowed: +44, +91)"
        )
    assert interakt.received == []
    assert redis_db.keys() == []
    await send(stub, "+442071838750")
    await send(stub, PHONE)
    assert len(interakt.received) == 2


async def test_the_default_allowlist_is_india_only(make_service: MakeService) -> None:
    assert Settings().allowed_countries == frozenset({"91"})
    stub = await make_service(allowed_countries=Settings().allowed_countries)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await send(stub, "+442071838750")
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "allowed: +91)" in (refused.value.details() or "")


async def test_a_caller_over_its_rate_is_refused_across_replicas(
    make_service: MakeService,
    interakt: FakeInterakt,
    redis_db: redis.Redis,
) -> None:
    # Two replicas on one Redis: the caller's budget is shared, not per process.
    first = await make_service(caller_sends_per_minute=3)
    second = await make_service(caller_sends_per_minute=3)
    await send(first, OTHER_PHONES[0])
    await send(second, OTHER_PHONES[1])
    await send(first, OTHER_PHONES[2])
    before = redis_snapshot(redis_db)
    counted = REGISTRY.get_sample_value("otp_limit_refusals_total", {"kind": "caller"}) or 0.0
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await send(second, OTHER_PHONES[3])
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert refused.value.details() == "caller: at most 3 sends a minute"
    assert REGISTRY.get_sample_value("otp_limit_refusals_total", {"kind": "caller"}) == counted + 1
    assert 1 <= retry_delay(refused.value) <= 60
    assert redis_snapshot(redis_db) == before
    assert len(interakt.received) == 3
    # Verification is not a send: it stays open to the caller.
    answer = await verify(second, "123456", OTHER_PHONES[3])
    assert answer.outcome == otp_pb2.VERIFY_OUTCOME_NO_ACTIVE_CODE


async def test_the_interakt_account_budget_is_shared_by_every_replica_and_caller(
    make_server: MakeServer, interakt: FakeInterakt, redis_db: redis.Redis
) -> None:
    tokens = (("billing", "billing-token-0123456789"), ("signup", "signup-token-0123456"))
    replicas = [await make_server(interakt_sends_per_minute=2, client_tokens=tokens) for _ in "ab"]
    channels = [grpc.aio.insecure_channel(f"127.0.0.1:{r.port}") for r in replicas]
    stubs = [otp_pb2_grpc.OtpServiceStub(channel) for channel in channels]

    try:
        await send_as(stubs[0], "billing-token-0123456789", OTHER_PHONES[0])
        await send_as(stubs[1], "signup-token-0123456", OTHER_PHONES[1])
        before = redis_snapshot(redis_db)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await send_as(stubs[0], "signup-token-0123456", OTHER_PHONES[2])
    finally:
        for channel in channels:
            await channel.close()
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert refused.value.details() == (
        "the service's WhatsApp budget of 2 messages a minute is spent"
    )
    assert 1 <= retry_delay(refused.value) <= 60
    assert redis_snapshot(redis_db) == before
    assert len(interakt.received) == 2


async def test_each_caller_has_its_own_budget(
    make_server: MakeServer, interakt: FakeInterakt
) -> None:
    server = await make_server(
        caller_sends_per_minute=1,
        client_tokens=(("billing", "billing-token-0123456789"), ("signup", "signup-token-0123456")),
    )
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = otp_pb2_grpc.OtpServiceStub(channel)
        await send_as(stub, "billing-token-0123456789", OTHER_PHONES[0])
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await send_as(stub, "billing-token-0123456789", OTHER_PHONES[1])
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        await send_as(stub, "signup-token-0123456", OTHER_PHONES[1])
    assert len(interakt.received) == 2


@pytest.mark.parametrize(
    ("setting", "key", "message"),
    [
        ("caller_sends_per_minute", "otp:{senders}:caller-sends:tests", "caller: at most 1 sends"),
        ("interakt_sends_per_minute", "otp:{senders}:account-sends", "the service's WhatsApp"),
    ],
)
async def test_send_budgets_are_rolling_minutes(
    make_service: MakeService, redis_db: redis.Redis, setting: str, key: str, message: str
) -> None:
    stub = await make_service(**{setting: 1})
    await send(stub, OTHER_PHONES[0])
    age(redis_db, key, 30)  # a send 30 s old still counts
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await send(stub, OTHER_PHONES[1])
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert (refused.value.details() or "").startswith(message)
    assert 29 <= retry_delay(refused.value) <= 30
    age(redis_db, key, 31)  # one 61 s old does not
    await send(stub, OTHER_PHONES[1])


async def test_a_send_interakt_refused_counts_in_both_budgets(
    make_service: MakeService, interakt: FakeInterakt, redis_db: redis.Redis
) -> None:
    """The budgets bound the requests made to Interakt, whatever it answered."""
    stub = await make_service(caller_sends_per_minute=1, interakt_sends_per_minute=1)
    interakt.answer(refusal(NOT_A_CONTACT))
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await send(stub, OTHER_PHONES[0])
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert redis_db.zcard("otp:{senders}:caller-sends:tests") == 1
    assert redis_db.zcard("otp:{senders}:account-sends") == 1
    with pytest.raises(grpc.aio.AioRpcError) as spent:
        await send(stub, OTHER_PHONES[1])
    assert error_info(spent.value).reason == "CALLER_SEND_BUDGET"
    assert len(interakt.received) == 1


async def test_a_send_that_never_reached_interakt_is_given_back_to_both_budgets(
    make_service: MakeService, interakt: FakeInterakt, redis_db: redis.Redis
) -> None:
    stub = await make_service(
        caller_sends_per_minute=1,
        interakt_sends_per_minute=1,
        interakt_base_url=f"http://127.0.0.1:{free_port()}/v1/public",
    )
    with pytest.raises(grpc.aio.AioRpcError) as unreachable:
        await send(stub, OTHER_PHONES[0])
    assert error_info(unreachable.value).reason == "PROVIDER_UNAVAILABLE"
    assert redis_db.zcard("otp:{senders}:caller-sends:tests") == 0
    assert redis_db.zcard("otp:{senders}:account-sends") == 0
    assert redis_db.zcard(f"otp:{{{OTHER_PHONES[0]}}}:s") == 0


async def test_sends_the_rules_refused_do_not_use_the_callers_budget(
    make_service: MakeService, interakt: FakeInterakt, redis_db: redis.Redis
) -> None:
    stub = await make_service(caller_sends_per_minute=3)
    await send(stub, PHONE)
    # Refused by the number's cooldown: not a send. Refused by Interakt: a request made.
    with pytest.raises(grpc.aio.AioRpcError) as cooldown:
        await send(stub, PHONE)
    assert cooldown.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    interakt.answer(Answer(400, {"result": False, "message": "Invalid token provided"}))
    with pytest.raises(grpc.aio.AioRpcError) as upstream:
        await send(stub, OTHER_PHONES[0])
    assert upstream.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    await send(stub, OTHER_PHONES[1])
    assert redis_db.zcard("otp:{senders}:caller-sends:tests") == 3


async def test_a_phone_over_its_wrong_code_budget_is_refused_even_with_the_right_code(
    make_service: MakeService, interakt: FakeInterakt, redis_db: redis.Redis
) -> None:
    stub = await make_service(
        max_failed_verifies_per_hour=3, max_attempts=2, resend_cooldown_seconds=0
    )
    await send(stub)
    first = interakt.received[-1].code
    for _ in range(2):
        answer = await verify(stub, wrong_code(first))
        assert answer.outcome == otp_pb2.VERIFY_OUTCOME_WRONG_CODE
    # A resend refills the per-code budget, but not the number's hourly one.
    await send(stub)
    second = interakt.received[-1].code
    answer = await verify(stub, wrong_code(first, second))
    assert answer.outcome == otp_pb2.VERIFY_OUTCOME_WRONG_CODE
    assert answer.attempts_remaining == 1

    for code in (second, wrong_code(second)):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await verify(stub, code)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert refused.value.details() == (
            "phone_number: 3 wrong codes in the last hour; verification is paused"
        )
        assert 3_590 <= retry_delay(refused.value) <= 3_600
    # No code could verify before the window moves on, so none is sent: that would only cost.
    sent_before = len(interakt.received)
    with pytest.raises(grpc.aio.AioRpcError) as still:
        await send(stub)
    assert still.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert 3_590 <= retry_delay(still.value) <= 3_600
    assert len(interakt.received) == sent_before
    # The budget belongs to the number and lives beside its codes, in the same hash slot.
    assert redis_db.llen(f"otp:{{{PHONE}}}:f") == 3
    await send(stub, OTHER_PHONES[0])
    answer = await verify(stub, interakt.received[-1].code, OTHER_PHONES[0])
    assert answer.verified


async def test_the_wrong_code_budget_forgets_failures_older_than_an_hour(
    make_service: MakeService, interakt: FakeInterakt, redis_db: redis.Redis
) -> None:
    stub = await make_service(max_failed_verifies_per_hour=2)
    await send(stub)
    code = interakt.received[-1].code
    await verify(stub, wrong_code(code))
    await verify(stub, wrong_code(code))
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await verify(stub, code)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    # Move the counted failures an hour and a second into the past, as the window moving would.
    key = f"otp:{{{PHONE}}}:f"
    old = [int(t) - 3_601_000 for t in redis_db.lrange(key, 0, -1)]
    redis_db.delete(key)
    redis_db.rpush(key, *old)
    assert (await verify(stub, code)).verified


async def test_verify_is_one_redis_round_trip_and_send_three(
    make_service: MakeService, interakt: FakeInterakt, redis_db: redis.Redis
) -> None:
    stub = await make_service()
    # Warm up: the first use of each script loads it, on the node that serves the number (a
    # Cluster's nodes each have their own script cache). Then the number starts afresh.
    await send(stub)
    await verify(stub, "123456")
    redis_db.delete(*redis_db.keys(f"otp:{{{PHONE}}}:*"))

    before = redis_calls(redis_db)
    await send(stub)
    # Store the code, count the send (the budgets' own hash slot), then, once Interakt took it,
    # record its message id (README: Rules).
    assert round_trips_since(redis_db, before) == {"evalsha": 3}
    before = redis_calls(redis_db)
    answer = await verify(stub, wrong_code(interakt.received[-1].code))
    assert answer.outcome == otp_pb2.VERIFY_OUTCOME_WRONG_CODE
    assert round_trips_since(redis_db, before) == {"evalsha": 1}


async def test_one_caller_with_interakt_answering_429_makes_no_more_requests_than_its_budgets(
    make_service: MakeService, interakt: FakeInterakt, redis_db: redis.Redis
) -> None:
    """Each request made to Interakt counts, retries included, whatever it answered."""
    stub = await make_service(caller_sends_per_minute=10, interakt_sends_per_minute=20)
    limited = Answer(429, {"result": False, "message": "Rate limit exceeded for this resource"})
    interakt.answer(*[limited] * 200)
    phones = [f"+9170038487{i:02d}" for i in range(40)]
    results = await asyncio.gather(
        *(stub.SendOtp(otp_pb2.SendOtpRequest(phone_number=p), timeout=10) for p in phones),
        return_exceptions=True,
    )
    assert all(isinstance(result, grpc.aio.AioRpcError) for result in results)
    assert len(interakt.received) <= 10
    assert redis_db.zcard("otp:{senders}:caller-sends:tests") <= 10
    other = await make_service(
        caller_sends_per_minute=100, interakt_sends_per_minute=20, client_tokens=(("other", TOKEN),)
    )
    interakt.answer(*[limited] * 200)
    await asyncio.gather(
        *(other.SendOtp(otp_pb2.SendOtpRequest(phone_number=p), timeout=10) for p in phones),
        return_exceptions=True,
    )
    # The account's budget bounds every caller's requests together.
    assert len(interakt.received) <= 20


async def test_a_number_interakt_refuses_gets_no_more_requests_than_its_cap(
    make_service: MakeService, interakt: FakeInterakt
) -> None:
    stub = await make_service(resend_cooldown_seconds=0, max_sends_per_hour=5)
    interakt.answer(*[refusal(NOT_A_CONTACT)] * 40)
    for _ in range(40):
        with pytest.raises(grpc.aio.AioRpcError):
            await send(stub, PHONE)
    assert len(interakt.received) == 5
