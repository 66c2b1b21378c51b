"""Test numbers (OTP_TEST_NUMBERS): a fixed code, never sent to Interakt, every other rule kept."""

from __future__ import annotations

import logging
import subprocess

import grpc
import pytest
import redis
from otp.v1 import otp_pb2
from prometheus_client import REGISTRY

from otp_service import ConfigError, Settings
from otp_service.connections.embedded_redis import free_port
from tests.conftest import PHONE, MakeService, send, verify
from tests.fake_interakt import FakeInterakt
from tests.test_cli import CLEAN_ENV, OTP_SERVICE, VALID, read_until

TEST_NUMBER = "+919999900001"
TEST_CODE = "246810"
TEST_NUMBERS = ((TEST_NUMBER, TEST_CODE),)


def uses(rpc: str, number: str = TEST_NUMBER) -> float:
    labels = {"rpc": rpc, "number": number}
    return REGISTRY.get_sample_value("otp_test_number_uses_total", labels) or 0.0


async def test_a_test_number_gets_its_fixed_code_without_interakt(
    make_service: MakeService,
    interakt: FakeInterakt,
    redis_db: redis.Redis,
    caplog: pytest.LogCaptureFixture,
) -> None:
    stub = await make_service(test_numbers=TEST_NUMBERS)
    sends, verifies = uses("SendOtp"), uses("VerifyOtp")
    caplog.set_level(logging.WARNING, logger="otp_service.otp")
    sent = await send(stub, TEST_NUMBER)
    assert (sent.channel, sent.message_id) == (otp_pb2.CHANNEL_TEST, "")
    assert sent.resend_after_seconds == 30
    assert interakt.received == []
    assert (await verify(stub, TEST_CODE, TEST_NUMBER)).verified
    assert (uses("SendOtp"), uses("VerifyOtp")) == (sends + 1, verifies + 1)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        "test number +919999900001 used by SendOtp: its code is fixed and never sent",
        "test number +919999900001 used by VerifyOtp: its code is fixed and never sent",
    ]
    # It costs the caller's budget but nothing of the Interakt account's.
    assert redis_db.zcard("otp:{senders}:caller-sends:tests") == 1
    assert redis_db.zcard("otp:{senders}:account-sends") == 0
    # Other numbers are sent as always.
    assert (await send(stub, PHONE)).channel == otp_pb2.CHANNEL_TEXT
    assert len(interakt.received) == 1


async def test_attempts_and_cooldown_hold_for_a_test_number(
    make_service: MakeService, interakt: FakeInterakt
) -> None:
    stub = await make_service(test_numbers=TEST_NUMBERS, max_attempts=2)
    await send(stub, TEST_NUMBER)
    wrong = await verify(stub, "111111", TEST_NUMBER)
    assert (wrong.outcome, wrong.attempts_remaining) == (otp_pb2.VERIFY_OUTCOME_WRONG_CODE, 1)
    await verify(stub, "111111", TEST_NUMBER)
    locked = await verify(stub, TEST_CODE, TEST_NUMBER)
    assert locked.outcome == otp_pb2.VERIFY_OUTCOME_TOO_MANY_ATTEMPTS
    with pytest.raises(grpc.aio.AioRpcError) as cooldown:
        await send(stub, TEST_NUMBER)
    assert cooldown.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert cooldown.value.details() == "phone_number: a code was sent moments ago"
    assert interakt.received == []


async def test_the_caller_budget_holds_for_test_numbers(
    make_service: MakeService, interakt: FakeInterakt
) -> None:
    other = "+919999900002"
    stub = await make_service(
        test_numbers=(*TEST_NUMBERS, (other, TEST_CODE)), caller_sends_per_minute=1
    )
    await send(stub, TEST_NUMBER)
    with pytest.raises(grpc.aio.AioRpcError) as caller:
        await send(stub, other)
    assert caller.value.details() == "caller: at most 1 sends a minute"


async def test_allowed_countries_hold_for_test_numbers(
    make_service: MakeService, interakt: FakeInterakt
) -> None:
    stub = await make_service(
        test_numbers=(("+14155552671", TEST_CODE),), allowed_countries=frozenset({"91"})
    )
    with pytest.raises(grpc.aio.AioRpcError) as country:
        await send(stub, "+14155552671")
    assert country.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_a_spent_account_budget_does_not_stop_test_numbers(
    make_service: MakeService, interakt: FakeInterakt
) -> None:
    stub = await make_service(test_numbers=TEST_NUMBERS, interakt_sends_per_minute=1)
    await send(stub, PHONE)
    with pytest.raises(grpc.aio.AioRpcError) as spent:
        await send(stub, "+917003848502")
    assert spent.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert (await send(stub, TEST_NUMBER)).channel == otp_pb2.CHANNEL_TEST
    # Only the first number's message reached Interakt.
    assert len(interakt.received) == 1


def test_test_numbers_are_read_normalised() -> None:
    settings = Settings.from_env(
        {
            **VALID,
            "OTP_TEST_NUMBERS": "+919999900001:246810, +91 99999-00002 : 135790,",
            "OTP_ALLOW_TEST_NUMBERS": "true",
        }
    )
    assert settings.test_numbers == (
        ("+919999900001", "246810"),
        ("+919999900002", "135790"),
    )
    assert Settings.from_env(VALID).test_numbers == ()


def test_bad_test_numbers_are_named_at_start() -> None:
    env = {
        **VALID,
        "OTP_ALLOW_TEST_NUMBERS": "true",
        "OTP_CODE_LENGTH": "6",
        "OTP_TEST_NUMBERS": "919999900001:246810,+919999900002:2468,+919999900003,"
        "+919999900004:24681a,+919999900005:135790,+919999900005:246810",
    }
    with pytest.raises(ConfigError) as failed:
        Settings.from_env(env)
    assert failed.value.problems == [
        "OTP_TEST_NUMBERS: entry 1: expected +number:code; the number must be in E.164 form: "
        "a leading + and country code, then digits",
        "OTP_TEST_NUMBERS: entry 2 (+919999900002): the code must be 6 digits",
        "OTP_TEST_NUMBERS: entry 3 (+919999900003): the code must be 6 digits",
        "OTP_TEST_NUMBERS: entry 4 (+919999900004): the code must be 6 digits",
        "OTP_TEST_NUMBERS: entry 6 (+919999900005): the number is given twice",
    ]
    # A code follows OTP_CODE_LENGTH.
    eight = {**env, "OTP_CODE_LENGTH": "8", "OTP_TEST_NUMBERS": "+919999900001:12345678"}
    assert Settings.from_env(eight).test_numbers == (("+919999900001", "12345678"),)


def test_production_refuses_test_numbers_unless_allowed() -> None:
    env = {**VALID, "OTP_TEST_NUMBERS": "+919999900001:246810"}
    with pytest.raises(ConfigError) as refused:
        Settings.from_env(env)
    assert refused.value.problems == [
        "OTP_TEST_NUMBERS: test numbers have fixed codes anyone may use; production refuses "
        "them unless OTP_ALLOW_TEST_NUMBERS=true"
    ]
    with pytest.raises(ConfigError):
        Settings.from_env({**env, "OTP_ALLOW_TEST_NUMBERS": "false"})
    allowed = Settings.from_env({**env, "OTP_ALLOW_TEST_NUMBERS": "true"})
    assert allowed.test_numbers == (("+919999900001", "246810"),)
    # Development mode (make run) needs no flag.
    assert Settings.from_env(env, dev=True).test_numbers == allowed.test_numbers


def test_the_server_warns_at_start_which_test_numbers_it_has() -> None:
    process = subprocess.Popen(
        [OTP_SERVICE, "serve", "--dev"],
        env={
            **CLEAN_ENV,
            "OTP_GRPC_ADDRESS": f"127.0.0.1:{free_port()}",
            "OTP_HTTP_ADDRESS": "",
            "OTP_TEST_NUMBERS": "+919999900001:246810,+919999900002:135790",
        },
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    try:
        read_until(process, "listening on")
    finally:
        process.terminate()
        process.wait(timeout=30)
        # The start-up warnings follow "listening on"; the rest of the log comes out at exit.
        rest = process.stdout.read()
        process.stdout.close()
    (line,) = (line for line in rest.splitlines() if "OTP_TEST_NUMBERS" in line)
    assert "WARNING" in line
    assert "2 test numbers configured (+919999900001, +919999900002)" in line
