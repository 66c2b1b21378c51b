"""A send whose request reached Interakt without its answer is in doubt: its code stays, and
SendOtp answers before the caller's deadline whatever Interakt does."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
import redis
from otp.v1 import otp_pb2

from tests.conftest import (
    PHONE,
    WEBHOOK_SECRET,
    MakeGateway,
    MakeService,
    eventually,
    retry_delay,
    verify,
)
from tests.fake_interakt import Answer, FakeInterakt, Queued, accepted
from tests.test_error_details import error_info


def send_request(phone: str = PHONE, key: str = "") -> otp_pb2.SendOtpRequest:
    return otp_pb2.SendOtpRequest(phone_number=phone, idempotency_key=key)


async def test_interakt_answering_after_the_budget_leaves_the_code_usable_and_the_key_answered(
    make_gateway: MakeGateway, interakt: FakeInterakt, redis_db: redis.Redis
) -> None:
    gateway = await make_gateway(interakt_timeout_seconds=2)
    interakt.answer(accepted("msg-late", delay=2.5))
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await gateway.stub.SendOtp(send_request(key="key-1"), timeout=10)
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE, failed.value.details()
    assert error_info(failed.value).reason == "DELIVERY_IN_DOUBT"
    assert "may still arrive" in (failed.value.details() or "")
    # Told to wait until a new code may be sent: the number's cooldown (30 s by default).
    assert 29 <= retry_delay(failed.value) <= 30
    [message] = interakt.received

    # A repeat with the key sends nothing more: it is told the same.
    with pytest.raises(grpc.aio.AioRpcError) as repeated:
        await gateway.stub.SendOtp(send_request(key="key-1"), timeout=10)
    assert error_info(repeated.value).reason == "DELIVERY_IN_DOUBT"
    assert len(interakt.received) == 1

    # Interakt's report, matched by the send's callback data, tells the truth.
    status = await gateway.stub.GetOtpStatus(
        otp_pb2.GetOtpStatusRequest(phone_number=PHONE), timeout=10
    )
    assert status.state == otp_pb2.DELIVERY_STATE_QUEUED
    assert status.channel == otp_pb2.CHANNEL_TEXT
    interakt.send_reports_to(gateway.webhook_url, WEBHOOK_SECRET)
    late = Queued("msg-late", "+91", PHONE[3:], message.body["callbackData"])
    assert await interakt.report(late, "delivered") == 200

    async def delivered() -> bool:
        status = await gateway.stub.GetOtpStatus(
            otp_pb2.GetOtpStatusRequest(phone_number=PHONE), timeout=10
        )
        return status.state == otp_pb2.DELIVERY_STATE_DELIVERED and status.message_id == "msg-late"

    await eventually(delivered)
    # The code it carried verifies, once.
    assert (await verify(gateway.stub, message.code)).verified
    assert not (await verify(gateway.stub, message.code)).verified


@pytest.mark.parametrize("deadline", [1, 3, 10])
async def test_a_hanging_interakt_is_answered_unavailable_before_the_callers_deadline(
    make_service: MakeService, interakt: FakeInterakt, redis_db: redis.Redis, deadline: float
) -> None:
    # Interakt's own budget beyond every deadline: only the caller's can end the call.
    stub = await make_service(interakt_timeout_seconds=60)
    never = asyncio.Event()
    interakt.answer(Answer(body={"result": True, "id": "never"}, hold=never))
    try:
        started = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await stub.SendOtp(send_request(), timeout=deadline)
        took = time.monotonic() - started
    finally:
        never.set()
    # The service's own answer, not gRPC's DEADLINE_EXCEEDED: it came before the deadline.
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE, failed.value.details()
    assert error_info(failed.value).reason == "DELIVERY_IN_DOUBT"
    assert retry_delay(failed.value) >= 1
    assert took < deadline
    # What the answer promises is in Redis already: the code stays, the send is counted.
    assert redis_db.hget(f"otp:{{{PHONE}}}:d", "ch") is not None
    assert (await verify(stub, interakt.received[0].code)).verified
