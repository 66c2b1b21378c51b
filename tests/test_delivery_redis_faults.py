"""Delivery while Redis cannot answer: Interakt's reports are answered within its limit and
applied once Redis is back (or logged as lost at shutdown), and a sent message is answered and
recorded later. Each test stops a Redis of its own (SIGSTOP), so these run on one Redis only;
the rules themselves run on every deployment (tests/test_delivery_status.py)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
from collections.abc import Iterator
from typing import Any

import aiohttp
import grpc
import pytest
import redis
from otp.v1 import otp_pb2
from prometheus_client import REGISTRY

from otp_service.connections.embedded_redis import EmbeddedRedis
from tests.conftest import (
    PATIENCE_SECONDS,
    PHONE,
    WEBHOOK_SECRET,
    Gateway,
    MakeGateway,
    eventually,
)
from tests.fake_interakt import FakeInterakt, Queued, accepted, report_body, sign
from tests.test_delivery_status import reporting, sent_message, state_becomes, status
from tests.test_idempotency import received


@contextlib.contextmanager
def paused(server: EmbeddedRedis) -> Iterator[None]:
    """The redis-server process stopped (SIGSTOP) inside: every command waits, however long.
    (CLIENT PAUSE ALL cannot be ended early: it holds CLIENT UNPAUSE too.)"""
    os.kill(server.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(server.pid, signal.SIGCONT)


async def reported_on(
    make_gateway: MakeGateway, server: EmbeddedRedis, interakt: FakeInterakt, **settings: Any
) -> tuple[Gateway, Queued]:
    """A gateway on ``server`` whose reports the fake Interakt posts, and a message it sent."""
    gateway = reporting(await make_gateway(redis_url=server.url, **settings), interakt)
    return gateway, await sent_message(gateway, interakt)


async def test_reports_are_answered_while_redis_is_stopped_and_applied_once_it_is_back(
    make_gateway: MakeGateway, private_redis: EmbeddedRedis, interakt: FakeInterakt
) -> None:
    gateway, message = await reported_on(
        make_gateway, private_redis, interakt, redis_timeout_seconds=0.2
    )
    errors = redis_errors()
    with paused(private_redis):
        # Answered while Redis cannot answer anything: the report waits in the queue.
        async with asyncio.timeout(PATIENCE_SECONDS):
            assert await interakt.report(message, "delivered") == 200
            assert await interakt.report(message, "sent") == 200

        # Stopped for longer than its timeout: each report's first try failed, and waits to be
        # tried again.
        async def both_failed() -> bool:
            return redis_errors() >= errors + 2

        await eventually(both_failed)
    await state_becomes(gateway.stub, otp_pb2.DELIVERY_STATE_DELIVERED)


def redis_errors() -> float:
    return REGISTRY.get_sample_value("otp_redis_errors_total") or 0.0


async def test_a_send_whose_record_redis_did_not_take_is_answered_and_recorded_later(
    make_gateway: MakeGateway, private_redis: EmbeddedRedis, interakt: FakeInterakt
) -> None:
    """Interakt took the message, then Redis hung: the caller still gets its answer (the code
    is in Redis and on its way), and the message id is recorded once Redis is back."""
    gateway = await make_gateway(redis_url=private_redis.url, redis_timeout_seconds=0.3)
    hold = asyncio.Event()
    interakt.answer(accepted("msg-held", hold=hold))
    sending = asyncio.ensure_future(
        gateway.stub.SendOtp(
            otp_pb2.SendOtpRequest(phone_number=PHONE, idempotency_key="key-1"), timeout=30
        )
    )
    await eventually(received(interakt, 1))
    with paused(private_redis):
        hold.set()
        sent = await sending
    assert sent.message_id == "msg-held"

    async def recorded() -> bool:
        return (await status(gateway.stub)).message_id == "msg-held"

    await eventually(recorded)
    # And the key's first answer was recorded too: a repeat gets it.
    again = otp_pb2.SendOtpRequest(phone_number=PHONE, idempotency_key="key-1")
    assert await gateway.stub.SendOtp(again, timeout=10) == sent
    assert len(interakt.received) == 1


async def test_shutdown_drains_the_reports_waiting_for_redis(
    make_gateway: MakeGateway, private_redis: EmbeddedRedis, interakt: FakeInterakt
) -> None:
    gateway, message = await reported_on(
        make_gateway, private_redis, interakt, shutdown_grace_seconds=30.0
    )
    with paused(private_redis):
        assert await interakt.report(message, "read") == 200
        closing = asyncio.create_task(gateway.http.close())

        async def stopped_listening() -> bool:
            try:
                await interakt.report(message, "read")
            except aiohttp.ClientConnectionError:
                return True
            return False

        await eventually(stopped_listening)
        # Requests are done with; the report still waits for Redis rather than being dropped.
        assert not closing.done()
    await closing
    db = redis.Redis.from_url(private_redis.url)
    assert db.hget(f"otp:{{{PHONE}}}:d", "st") == str(otp_pb2.DELIVERY_STATE_READ).encode()
    db.close()


async def test_reports_redis_never_took_before_shutdown_are_logged_as_lost(
    make_gateway: MakeGateway,
    private_redis: EmbeddedRedis,
    interakt: FakeInterakt,
    caplog: pytest.LogCaptureFixture,
) -> None:
    gateway, message = await reported_on(
        make_gateway, private_redis, interakt, shutdown_grace_seconds=0.5
    )
    with paused(private_redis):
        assert await interakt.report(message, "read") == 200
        assert await interakt.report(message, "delivered") == 200
        await gateway.http.close()
    [lost] = [r for r in caplog.records if getattr(r, "event", "") == "delivery_reports_lost"]
    assert lost.levelname == "ERROR"
    assert lost.count == 2  # type: ignore[attr-defined]


async def test_a_full_queue_answers_503_so_interakt_sends_it_again(
    make_gateway: MakeGateway,
    private_redis: EmbeddedRedis,
    interakt: FakeInterakt,
    http: aiohttp.ClientSession,
) -> None:
    gateway, message = await reported_on(make_gateway, private_redis, interakt, webhook_capacity=2)
    refused = {"result": "refused"}
    before = REGISTRY.get_sample_value("otp_delivery_reports_total", refused) or 0.0
    with paused(private_redis):
        # Eight workers take one each, then two wait in the queue; the next is refused.
        answers = [await interakt.report(message, "sent") for _ in range(8 + 2)]
        assert answers == [200] * 10
        body = json.dumps(report_body(message, "read")).encode()
        headers = {"Interakt-Signature": sign(body, WEBHOOK_SECRET)}
        async with http.post(gateway.webhook_url, data=body, headers=headers) as answer:
            assert answer.status == 503
            assert answer.headers["Retry-After"] == "10"
            reply = await answer.json()
        assert reply["code"] == grpc.StatusCode.UNAVAILABLE.value[0]
        assert "send it again later" in reply["message"]
        assert REGISTRY.get_sample_value("otp_delivery_reports_total", refused) == before + 1
    await state_becomes(gateway.stub, otp_pb2.DELIVERY_STATE_SENT)
    assert await interakt.report(message, "read") == 200  # Interakt's redelivery
    await state_becomes(gateway.stub, otp_pb2.DELIVERY_STATE_READ)
