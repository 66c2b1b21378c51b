"""Withdrawals of failed sends during a Redis outage are bounded: a number of them wait, the
rest are given up and counted, and a command that never reached Redis needs none."""

from __future__ import annotations

import asyncio

import grpc
import pytest
import redis
from otp.v1 import otp_pb2
from prometheus_client import REGISTRY

from otp_service.connections.embedded_redis import EmbeddedRedis, free_port
from otp_service.store import redis_store as store
from tests.conftest import MakeService, eventually, send
from tests.test_delivery_redis_faults import paused

WAITING = "otp_send_withdrawals_waiting"
GIVEN_UP = "otp_send_withdrawals_given_up_total"
PHONES = [f"+9170038488{i:02d}" for i in range(80)]


def sample(name: str) -> float:
    return REGISTRY.get_sample_value(name) or 0.0


async def send_all(stub: object, phones: list[str]) -> list[object]:
    return await asyncio.gather(
        *(
            stub.SendOtp(otp_pb2.SendOtpRequest(phone_number=phone), timeout=10)  # type: ignore[attr-defined]
            for phone in phones
        ),
        return_exceptions=True,
    )


async def test_a_hung_redis_leaves_a_bounded_number_of_withdrawals_and_tombstones(
    make_service: MakeService,
    private_redis: EmbeddedRedis,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(store, "MAX_WAITING_WITHDRAWALS", 20)
    db = redis.Redis(port=private_redis.port)
    # A Redis timeout long enough for all 80 sends to be written to the one connection before the
    # first of them times out (which drops it: a send after that would find no connection, never
    # reach Redis, and need no withdrawal), even on a loaded machine.
    stub = await make_service(redis_url=private_redis.url, redis_timeout_seconds=1.5)
    await send(stub, "+917003848999")  # connected, scripts loaded: the late commands run
    waiting, given_up = sample(WAITING), sample(GIVEN_UP)
    with paused(private_redis):
        results = await send_all(stub, PHONES)
        assert all(
            isinstance(r, grpc.aio.AioRpcError) and r.code() == grpc.StatusCode.UNAVAILABLE
            for r in results
        )
        # Every send's command went unanswered: 20 withdrawals wait, the other 60 are given up.
        # Each is settled after its caller's answer (a first try takes a Redis timeout), so the
        # count is awaited, never more than that.

        async def settled() -> bool:
            counts = (sample(WAITING) - waiting, sample(GIVEN_UP) - given_up)
            assert counts[0] <= 20, counts
            assert counts[1] <= 60, counts
            return counts == (20, 60)

        await eventually(settled)
        # One line says so, not one per send.
        said = [r for r in caplog.records if getattr(r, "event", "") == "send_withdraw_failed"]
        assert len(said) == 1

    async def drained() -> bool:
        return sample(WAITING) == waiting

    await eventually(drained)
    # Only the withdrawals that waited wrote a tombstone (for the send's late command).
    assert len(db.keys("otp:*:withdrawn:*")) <= 20
    assert sample(GIVEN_UP) - given_up == 60
    db.close()


async def test_a_refused_connection_leaves_nothing_to_withdraw(make_service: MakeService) -> None:
    stub = await make_service(redis_url=f"redis://127.0.0.1:{free_port()}/0")
    waiting, given_up = sample(WAITING), sample(GIVEN_UP)
    results = await send_all(stub, PHONES[:20])
    assert all(
        isinstance(r, grpc.aio.AioRpcError) and r.code() == grpc.StatusCode.UNAVAILABLE
        for r in results
    )
    # No command reached Redis: there is nothing to take back, nor any tombstone to write.
    assert (sample(WAITING), sample(GIVEN_UP)) == (waiting, given_up)
