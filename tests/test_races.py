"""Concurrency: the limits hold under concurrent calls and across replicas sharing one Redis."""

from __future__ import annotations

import asyncio
from collections import Counter

import grpc
import pytest
import redis
from otp.v1 import otp_pb2

from tests.conftest import PHONE, MakeService, send, verify, wrong_code
from tests.fake_interakt import FakeInterakt

# The rules hold on every Redis deployment: one node, a Cluster, Sentinel's primary.
pytestmark = pytest.mark.redis_backends

CALLS = 50


async def test_concurrent_correct_verifies_succeed_exactly_once(
    make_service: MakeService, interakt: FakeInterakt
) -> None:
    replicas = [await make_service() for _ in range(2)]
    await send(replicas[0])
    code = interakt.received[0].code
    results = await asyncio.gather(*(verify(replicas[i % 2], code) for i in range(CALLS)))
    outcomes = Counter(result.outcome for result in results)
    assert outcomes == {
        otp_pb2.VERIFY_OUTCOME_VERIFIED: 1,
        otp_pb2.VERIFY_OUTCOME_NO_ACTIVE_CODE: CALLS - 1,
    }
    assert sum(result.verified for result in results) == 1


async def test_concurrent_wrong_codes_hold_the_budget_exactly(
    make_service: MakeService, interakt: FakeInterakt
) -> None:
    replicas = [await make_service(max_attempts=5) for _ in range(2)]
    await send(replicas[0])
    code = interakt.received[0].code
    results = await asyncio.gather(
        *(verify(replicas[i % 2], wrong_code(code)) for i in range(CALLS))
    )
    wrong = [
        r.attempts_remaining for r in results if r.outcome == otp_pb2.VERIFY_OUTCOME_WRONG_CODE
    ]
    assert sorted(wrong) == [0, 1, 2, 3, 4]
    locked = [r for r in results if r.outcome == otp_pb2.VERIFY_OUTCOME_TOO_MANY_ATTEMPTS]
    assert len(locked) == CALLS - 5
    assert (await verify(replicas[0], code)).outcome == otp_pb2.VERIFY_OUTCOME_TOO_MANY_ATTEMPTS


async def test_concurrent_right_and_wrong_codes_never_exceed_the_budget(
    make_service: MakeService, interakt: FakeInterakt
) -> None:
    stub = await make_service(max_attempts=3)
    await send(stub)
    code = interakt.received[0].code
    guesses = [wrong_code(code)] * 10 + [code]
    results = await asyncio.gather(*(verify(stub, guess) for guess in guesses))
    outcomes = Counter(result.outcome for result in results)
    # The right code is either within the budget (verified) or after it (locked); never both.
    assert outcomes[otp_pb2.VERIFY_OUTCOME_VERIFIED] <= 1
    assert outcomes[otp_pb2.VERIFY_OUTCOME_WRONG_CODE] <= 3
    wrong = outcomes[otp_pb2.VERIFY_OUTCOME_WRONG_CODE]
    if outcomes[otp_pb2.VERIFY_OUTCOME_VERIFIED]:
        # Verified within the budget: the guesses before it counted, the rest found no code.
        assert wrong <= 2
        assert outcomes[otp_pb2.VERIFY_OUTCOME_NO_ACTIVE_CODE] == len(guesses) - 1 - wrong
    else:
        # The budget ran out first: exactly three guesses counted, everything after was locked.
        assert wrong == 3
        assert outcomes[otp_pb2.VERIFY_OUTCOME_TOO_MANY_ATTEMPTS] == len(guesses) - 3


async def test_concurrent_sends_pass_the_cooldown_once(
    make_service: MakeService, interakt: FakeInterakt, redis_db: redis.Redis
) -> None:
    replicas = [await make_service(resend_cooldown_seconds=30) for _ in range(2)]
    results = await asyncio.gather(
        *(send(replicas[i % 2]) for i in range(20)), return_exceptions=True
    )
    sent = [r for r in results if isinstance(r, otp_pb2.SendOtpResponse)]
    refused = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(sent) == 1
    assert len(refused) == 19
    assert {r.code() for r in refused} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert len(interakt.received) == 1
    assert redis_db.zcard(f"otp:{{{PHONE}}}:s") == 1


async def test_concurrent_sends_respect_the_hourly_cap(
    make_service: MakeService, interakt: FakeInterakt
) -> None:
    stub = await make_service(resend_cooldown_seconds=0, max_sends_per_hour=4)
    results = await asyncio.gather(*(send(stub) for _ in range(20)), return_exceptions=True)
    assert sum(isinstance(r, otp_pb2.SendOtpResponse) for r in results) == 4
    assert len(interakt.received) == 4
    # Every code sent is live, and each of them verifies (consuming all).
    assert (await verify(stub, interakt.received[-1].code)).verified
