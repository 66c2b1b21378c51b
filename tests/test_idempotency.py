"""Idempotent sends (SendOtpRequest.idempotency_key) through the running server."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import grpc
import pytest
import redis
from otp.v1 import otp_pb2, otp_pb2_grpc

from tests.conftest import (
    PHONE,
    TOKEN,
    Bearer,
    MakeServer,
    MakeService,
    assert_no_code_but_counted,
    eventually,
    redis_snapshot,
    verify,
)
from tests.fake_interakt import Answer, FakeInterakt, accepted, refusal
from tests.test_abuse_limits import redis_calls, round_trips_since
from tests.test_error_details import details, error_info, kinds, refused

# The rules hold on every Redis deployment: one node, a Cluster, Sentinel's primary.
pytestmark = pytest.mark.redis_backends

OTHER_PHONE = "+917003848502"


def received(interakt: FakeInterakt, count: int) -> Callable[[], Awaitable[bool]]:
    """A check for ``eventually``: the fake has received ``count`` messages."""

    async def check() -> bool:
        return len(interakt.received) >= count

    return check


def scripts_run(db: redis.Redis, count: int) -> Callable[[], Awaitable[bool]]:
    """A check for ``eventually``: the server has run ``count`` scripts more than it had now
    (each call's store steps, and each ask for a first send's answer, run one)."""
    before = redis_calls(db)

    async def check() -> bool:
        return round_trips_since(db, before).get("evalsha", 0) >= count

    return check


def send_with(
    stub: otp_pb2_grpc.OtpServiceStub, key: str, phone: str = PHONE, timeout: float = 10
) -> grpc.aio.UnaryUnaryCall:  # type: ignore[type-arg]
    request = otp_pb2.SendOtpRequest(phone_number=phone, idempotency_key=key)
    return stub.SendOtp(request, timeout=timeout)


async def test_a_repeat_answers_what_the_first_answered_and_sends_nothing(
    make_service: MakeService, interakt: FakeInterakt, redis_db: redis.Redis
) -> None:
    stub = await make_service()
    first = await send_with(stub, "key-1")
    before = redis_calls(redis_db)
    again = await send_with(stub, "key-1")
    assert again == first
    assert len(interakt.received) == 1
    # One round trip, and nothing counted: the caller's budget is untouched.
    assert round_trips_since(redis_db, before) == {"evalsha": 1}
    assert redis_db.zcard("otp:{senders}:caller-sends:tests") == 1
    # Another key is another send: held in the cooldown like any.
    error = await refused(send_with(stub, "key-2"), grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert error_info(error).reason == "RESEND_COOLDOWN"
    assert (await verify(stub, interakt.received[0].code)).verified


async def test_the_same_key_for_another_number_is_invalid_and_changes_nothing(
    make_service: MakeService, interakt: FakeInterakt, redis_db: redis.Redis
) -> None:
    stub = await make_service()
    await send_with(stub, "key-1")
    snapshot = redis_snapshot(redis_db)
    error = await refused(send_with(stub, "key-1", OTHER_PHONE), grpc.StatusCode.INVALID_ARGUMENT)
    info = error_info(error)
    assert (info.reason, dict(info.metadata)) == (
        "IDEMPOTENCY_KEY_REUSED",
        {"field": "idempotency_key"},
    )
    assert kinds(error) == ["ErrorInfo", "BadRequest"]
    assert details(error)[1].field_violations[0].field == "idempotency_key"
    assert (error.details() or "").startswith("idempotency_key: ")
    assert len(interakt.received) == 1
    assert redis_snapshot(redis_db) == snapshot
    await send_with(stub, "key-2", OTHER_PHONE)  # with its own key it is sent


@pytest.mark.parametrize(
    "key",
    [
        pytest.param("k" * 129, id="too-long"),
        pytest.param("tab\there", id="not-printable"),
        pytest.param("clé", id="not-ascii"),
    ],
)
async def test_a_malformed_key_is_invalid_and_changes_nothing(
    make_service: MakeService, interakt: FakeInterakt, redis_db: redis.Redis, key: str
) -> None:
    stub = await make_service()
    error = await refused(send_with(stub, key), grpc.StatusCode.INVALID_ARGUMENT)
    info = error_info(error)
    assert (info.reason, dict(info.metadata)) == (
        "INVALID_IDEMPOTENCY_KEY",
        {"field": "idempotency_key"},
    )
    assert kinds(error) == ["ErrorInfo", "BadRequest"]
    assert interakt.received == []
    assert redis_db.keys() == []
    await send_with(stub, "k" * 128)  # the longest key there may be


async def test_concurrent_repeats_send_exactly_once_and_all_get_its_answer(
    make_service: MakeService, interakt: FakeInterakt, redis_db: redis.Redis
) -> None:
    stub = await make_service()
    hold = asyncio.Event()
    interakt.answer(accepted("msg-held", hold=hold))
    running = scripts_run(redis_db, 10 + 1)
    calls = [asyncio.ensure_future(send_with(stub, "key-1")) for _ in range(10)]
    # All ten have reached Redis (the first has also counted its send) while the first is
    # still waiting for Interakt (its request may still be on its way there).
    await eventually(running)
    await eventually(received(interakt, 1))
    hold.set()
    answers = await asyncio.gather(*calls)
    assert len(interakt.received) == 1
    assert {answer.message_id for answer in answers} == {"msg-held"}
    assert all(answer == answers[0] for answer in answers)


async def test_a_repeat_waits_within_its_own_deadline_then_retries_get_the_answer(
    make_service: MakeService, interakt: FakeInterakt
) -> None:
    stub = await make_service()
    hold = asyncio.Event()
    interakt.answer(accepted("msg-held", hold=hold))
    first = asyncio.ensure_future(send_with(stub, "key-1"))
    await eventually(received(interakt, 1))
    with pytest.raises(grpc.aio.AioRpcError) as waited:
        await send_with(stub, "key-1", timeout=1)
    # The server answers just before the deadline; a busy machine may let the deadline win.
    assert waited.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    if waited.value.code() == grpc.StatusCode.UNAVAILABLE:
        assert error_info(waited.value).reason == "SEND_IN_PROGRESS"
        assert "RetryInfo" in kinds(waited.value)
    hold.set()
    answer = await first
    assert await send_with(stub, "key-1") == answer
    assert len(interakt.received) == 1


async def test_a_key_whose_send_failed_may_be_used_again(
    make_service: MakeService, interakt: FakeInterakt, redis_db: redis.Redis
) -> None:
    stub = await make_service(resend_cooldown_seconds=0)
    interakt.answer(refusal("Something new"))
    await refused(send_with(stub, "key-1"), grpc.StatusCode.FAILED_PRECONDITION)
    assert_no_code_but_counted(redis_db)
    assert redis_db.keys("otp:*:k:*") == []  # the key too is free again, at once
    sent = await send_with(stub, "key-1")
    assert len(interakt.received) == 2
    assert await send_with(stub, "key-1") == sent


async def test_a_repeat_waiting_on_a_send_that_fails_sends_in_its_place(
    make_service: MakeService, interakt: FakeInterakt, redis_db: redis.Redis
) -> None:
    stub = await make_service(resend_cooldown_seconds=0)
    hold = asyncio.Event()
    interakt.answer(Answer(400, {"result": False, "message": "Something new"}, hold=hold))
    first = asyncio.ensure_future(send_with(stub, "key-1"))
    await eventually(received(interakt, 1))
    # The repeat found the key held, and asked for the first answer at least once.
    waiting = scripts_run(redis_db, 2)
    repeat = asyncio.ensure_future(send_with(stub, "key-1"))
    await eventually(waiting)
    hold.set()
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await first
    assert failed.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    answer = await repeat
    assert len(interakt.received) == 2
    assert answer.message_id == interakt.queued[-1].id


async def test_keys_belong_to_the_calling_service(
    make_server: MakeServer, interakt: FakeInterakt
) -> None:
    other_token = "other-caller-token-0123456789"
    server = await make_server(client_tokens=(("tests", TOKEN), ("other", other_token)))
    async with (
        grpc.aio.insecure_channel(f"127.0.0.1:{server.port}", interceptors=[Bearer(TOKEN)]) as a,
        grpc.aio.insecure_channel(
            f"127.0.0.1:{server.port}", interceptors=[Bearer(other_token)]
        ) as b,
    ):
        await send_with(otp_pb2_grpc.OtpServiceStub(a), "shared-key")
        # Not the first caller's answer: a send of its own, held in the number's cooldown.
        error = await refused(
            send_with(otp_pb2_grpc.OtpServiceStub(b), "shared-key"),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
        )
        assert error_info(error).reason == "RESEND_COOLDOWN"
        # Nor may it take the key for another number: it is not its key.
        await send_with(otp_pb2_grpc.OtpServiceStub(b), "shared-key", OTHER_PHONE)
    assert len(interakt.received) == 2


async def test_the_key_is_kept_while_the_code_lives(
    make_service: MakeService, interakt: FakeInterakt, redis_db: redis.Redis
) -> None:
    stub = await make_service(resend_cooldown_seconds=0)
    first = await send_with(stub, "key-1")
    # The code expires, and the key's records with it (as its TTL would).
    for key in redis_db.keys("otp:*:k:*") + redis_db.keys(f"otp:{{{PHONE}}}:[cd]"):
        redis_db.delete(key)
    again = await send_with(stub, "key-1")
    assert again.message_id != first.message_id
    assert len(interakt.received) == 2


async def test_a_claim_whose_send_never_answered_lapses(
    make_service: MakeService, interakt: FakeInterakt, redis_db: redis.Redis
) -> None:
    """A send whose process died holds its key only for as long as any send can take."""
    stub = await make_service(resend_cooldown_seconds=0)
    await send_with(stub, "key-1")
    [claim] = redis_db.keys(f"otp:{{{PHONE}}}:k:*")
    # As the dead send left it: claimed, never answered.
    redis_db.hdel(claim, "done", "ch", "msg")
    with pytest.raises(grpc.aio.AioRpcError) as waiting:
        await send_with(stub, "key-1", timeout=1)
    assert waiting.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    assert len(interakt.received) == 1
    # Claimed longer ago than a send can take (moved into the past, as the clock would).
    at = int(redis_db.hget(claim, "at") or 0)
    redis_db.hset(claim, "at", at - 60_000)
    taken_over = await send_with(stub, "key-1")
    assert len(interakt.received) == 2
    assert taken_over.message_id == interakt.queued[-1].id
