"""The metrics an operator reads (docs/operations.md): conversion by caller and country,
deliveries by state and channel, time to delivery, codes expired unused. Bounded labels only."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
import redis
from otp.v1 import otp_pb2

from otp_service.connections.embedded_redis import EmbeddedRedis
from tests.conftest import (
    CALLER,
    PHONE,
    Gateway,
    MakeGateway,
    delta,
    eventually,
    scrape,
    send,
    verify,
    wrong_code,
)
from tests.fake_interakt import FakeInterakt
from tests.test_delivery_status import _age_cooldown, reporting, state_becomes

UK_PHONE = "+447911123456"


@pytest.fixture
async def gateway(make_gateway: MakeGateway, interakt: FakeInterakt) -> Gateway:
    return reporting(await make_gateway(allowed_countries=frozenset({"91"})), interakt)


async def test_sends_and_verifies_are_counted_by_caller_and_country(
    gateway: Gateway, interakt: FakeInterakt, http: aiohttp.ClientSession
) -> None:
    _, before = await scrape(http, gateway.url)
    await send(gateway.stub)
    code = interakt.received[-1].code
    assert (await verify(gateway.stub, wrong_code(code))).outcome == (
        otp_pb2.VERIFY_OUTCOME_WRONG_CODE
    )
    assert (await verify(gateway.stub, code)).verified
    # A verify is not refused for its country: a number outside OTP_ALLOWED_COUNTRIES is "other".
    await verify(gateway.stub, "123456", UK_PHONE)
    text, after = await scrape(http, gateway.url)

    assert delta(before, after, "otp_codes_sent_total", caller=CALLER, country="91") == 1
    for country, outcome in (("91", "wrong_code"), ("91", "verified"), ("other", "no_active_code")):
        labels = {"caller": CALLER, "country": country, "outcome": outcome}
        assert delta(before, after, "otp_verifies_total", **labels) == 1
    assert delta(before, after, "otp_verifies_total", caller=CALLER, country="44") == 0
    assert PHONE[1:] not in text


async def test_deliveries_are_counted_by_state_and_channel_with_the_time_since_the_send(
    gateway: Gateway, interakt: FakeInterakt, http: aiohttp.ClientSession
) -> None:
    _, before = await scrape(http, gateway.url)
    await send(gateway.stub)
    message = interakt.queued[-1]
    for status, state in (
        ("sent", otp_pb2.DELIVERY_STATE_SENT),
        ("delivered", otp_pb2.DELIVERY_STATE_DELIVERED),
        ("delivered", otp_pb2.DELIVERY_STATE_DELIVERED),  # a redelivery: not counted again
        ("read", otp_pb2.DELIVERY_STATE_READ),
    ):
        assert await interakt.report(message, status) == 200
        await state_becomes(gateway.stub, state)

    async def counted() -> bool:
        _, after = await scrape(http, gateway.url)
        return delta(before, after, "otp_delivery_reports_total", result="unchanged") == 1

    await eventually(counted)
    _, after = await scrape(http, gateway.url)
    for state in ("sent", "delivered", "read"):
        assert delta(before, after, "otp_deliveries_total", state=state, channel="text") == 1
    for state in ("delivered", "read"):
        assert delta(before, after, "otp_delivery_seconds_count", state=state) == 1
        seconds = delta(before, after, "otp_delivery_seconds_sum", state=state)
        # Measured from the send's own time in Redis: positive, and well within the test.
        assert 0 <= seconds < 60
    assert delta(before, after, "otp_delivery_seconds_count", state="sent") == 0


async def test_a_failed_delivery_is_counted_without_a_time(
    gateway: Gateway, interakt: FakeInterakt, http: aiohttp.ClientSession
) -> None:
    _, before = await scrape(http, gateway.url)
    await send(gateway.stub)
    assert await interakt.report(interakt.queued[-1], "failed", reason="not on WhatsApp") == 200
    await state_becomes(gateway.stub, otp_pb2.DELIVERY_STATE_FAILED)
    _, after = await scrape(http, gateway.url)
    assert delta(before, after, "otp_deliveries_total", state="failed", channel="text") == 1
    assert delta(before, after, "otp_delivery_seconds_count", state="failed") == 0


async def test_codes_that_expired_unused_are_counted_at_the_next_send(
    gateway: Gateway, interakt: FakeInterakt, http: aiohttp.ClientSession, redis_db: redis.Redis
) -> None:
    _, before = await scrape(http, gateway.url)
    await send(gateway.stub)
    await _age_cooldown(redis_db)
    await send(gateway.stub)
    await _age_cooldown(redis_db)
    _, after = await scrape(http, gateway.url)
    assert delta(before, after, "otp_codes_expired_unused_total") == 0
    # Both codes' lifetimes end (the hash lives on, as it does while a newer code is live).
    codes = f"otp:{{{PHONE}}}:c"
    for field in redis_db.hkeys(codes):
        if field != b"n":
            redis_db.hset(codes, field, 1)
    await send(gateway.stub)
    _, after = await scrape(http, gateway.url)
    assert delta(before, after, "otp_codes_expired_unused_total") == 2


async def test_redis_health_and_readiness_changes_are_exported(
    make_gateway: MakeGateway, http: aiohttp.ClientSession, private_redis: EmbeddedRedis
) -> None:
    gateway = await make_gateway(redis_url=private_redis.url, interakt_sends_per_minute=42)

    async def sample(name: str) -> float:
        _, samples = await scrape(http, gateway.url)
        return samples.get((name, frozenset()), -1.0)

    async def redis_up(value: float) -> bool:
        return await sample("otp_redis_up") == value

    await eventually(lambda: redis_up(1))
    assert await sample("otp_account_sends_per_minute_limit") == 42
    assert await sample("otp_redis_ping_seconds_count") >= 1
    changes = await sample("otp_readiness_changes_total")

    await asyncio.to_thread(private_redis.stop)
    await eventually(lambda: redis_up(0))
    await asyncio.to_thread(private_redis.start)
    await eventually(lambda: redis_up(1))
    assert await sample("otp_readiness_changes_total") == changes + 2
