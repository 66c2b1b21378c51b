"""otp.admin.v1.AdminService and `otp-service admin`: a support desk shows, unlocks and cancels
a number's codes, on a surface apart from the callers' (its own tokens)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import grpc
import pytest
import redis
from otp.admin.v1 import admin_pb2, admin_pb2_grpc
from otp.v1 import otp_pb2

from otp_service import Settings, cli
from otp_service.config import ConfigError
from tests.conftest import (
    PHONE,
    TOKEN,
    Gateway,
    MakeGateway,
    age,
    code_sent_to,
    delta,
    digest,
    eventually,
    scrape,
    send,
    status_of,
    verify,
    wrong_code,
)
from tests.fake_interakt import FakeInterakt

# Every script touches one number's hash slot: the actions work on a Cluster and behind Sentinel.
pytestmark = pytest.mark.redis_backends

ADMIN = "support-desk"
ADMIN_TOKEN = "admin-token-0123456789abcdef"
WRONG_CODES_PER_HOUR = 3


def admin_tokens_in(directory: Path) -> Path:
    """An OTP_ADMIN_TOKENS_FILE naming ADMIN, in ``directory``."""
    path = directory / "admin-tokens"
    path.write_text(f"# support\n{ADMIN}:{ADMIN_TOKEN}\n")
    return path


@pytest.fixture
def admin_tokens(tmp_path: Path) -> Path:
    return admin_tokens_in(tmp_path)


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    """What the admin command reads the admin's token from."""
    path = tmp_path / "my-token"
    path.write_text(ADMIN_TOKEN + "\n")
    return path


@pytest.fixture
async def gateway(make_gateway: MakeGateway, admin_tokens: Path) -> Gateway:
    return await make_gateway(
        admin_tokens_file=str(admin_tokens),
        max_failed_verifies_per_hour=WRONG_CODES_PER_HOUR,
    )


@pytest.fixture
async def admin(gateway: Gateway) -> AsyncIterator[admin_pb2_grpc.AdminServiceStub]:
    """A stub that sends the admin's token."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.grpc_port}") as channel:
        yield admin_pb2_grpc.AdminServiceStub(channel)


def as_admin(token: str = ADMIN_TOKEN) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


async def state(
    admin: admin_pb2_grpc.AdminServiceStub, phone: str = PHONE
) -> admin_pb2.GetNumberStateResponse:
    return await admin.GetNumberState(
        admin_pb2.GetNumberStateRequest(phone_number=phone), metadata=as_admin(), timeout=10
    )


async def run_admin(
    gateway: Gateway, token_file: Path, *args: str, capsys: pytest.CaptureFixture[str]
) -> tuple[int, str, str]:
    """``otp-service admin ARGS`` against the gateway's server: exit status, stdout, stderr."""
    target = f"127.0.0.1:{gateway.grpc_port}"
    argv = ["admin", *args, "--target", target, "--token-file", str(token_file)]
    status = await asyncio.to_thread(cli.main, argv)
    out, err = capsys.readouterr()
    return status, out, err


async def lock_out(gateway: Gateway, interakt: FakeInterakt) -> str:
    """Send a code and type wrong ones until the number is locked; the code."""
    await send(gateway.stub)
    code = code_sent_to(interakt, PHONE)
    for _ in range(WRONG_CODES_PER_HOUR):
        await verify(gateway.stub, wrong_code(code))
    with pytest.raises(grpc.aio.AioRpcError) as locked:
        await verify(gateway.stub, code)
    assert locked.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    return code


async def support_actions(port: int, phone: str = PHONE) -> None:
    """Each AdminService call once, as the admin (test_cluster checks the scripts they run)."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = admin_pb2_grpc.AdminServiceStub(channel)
        for method, request_type in (
            ("GetNumberState", admin_pb2.GetNumberStateRequest),
            ("UnlockNumber", admin_pb2.UnlockNumberRequest),
            ("CancelCodes", admin_pb2.CancelCodesRequest),
        ):
            request = request_type(phone_number=phone)
            await getattr(stub, method)(request, metadata=as_admin(), timeout=10)


async def test_an_admin_unlocks_a_locked_out_number_with_one_command(
    gateway: Gateway,
    interakt: FakeInterakt,
    redis_db: redis.Redis,
    token_file: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    http: aiohttp.ClientSession,
) -> None:
    await lock_out(gateway, interakt)
    # Past the resend cooldown, as for a user who typed wrong codes for a while: still locked.
    age(redis_db, f"otp:{{{PHONE}}}:s", 60)
    assert await status_of(send(gateway.stub)) == grpc.StatusCode.RESOURCE_EXHAUSTED
    _, before = await scrape(http, gateway.url)
    caplog.set_level(logging.INFO, logger="otp_service.admin")

    status, out, err = await run_admin(gateway, token_file, "unlock", PHONE, capsys=capsys)

    assert (status, err) == (0, "")
    assert json.loads(out) == {"wrong_codes_cleared": 3, "attempts_cleared": 3}
    await send(gateway.stub)
    assert (await verify(gateway.stub, code_sent_to(interakt, PHONE))).verified
    [logged] = [r for r in caplog.records if getattr(r, "event", "") == "admin_action"]
    assert logged.admin == ADMIN  # type: ignore[attr-defined]
    assert logged.action == "unlock"  # type: ignore[attr-defined]
    assert PHONE not in logged.getMessage()
    _, after = await scrape(http, gateway.url)
    assert delta(before, after, "otp_admin_actions_total", action="unlock") == 1


async def test_show_tells_codes_attempts_sends_waits_and_delivery_never_a_code(
    gateway: Gateway,
    interakt: FakeInterakt,
    admin: admin_pb2_grpc.AdminServiceStub,
    token_file: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    empty = await state(admin)
    assert empty == admin_pb2.GetNumberStateResponse(
        max_attempts=Settings().max_attempts,
        max_sends_per_hour=Settings().max_sends_per_hour,
        max_wrong_codes_per_hour=WRONG_CODES_PER_HOUR,
    )
    sent = await send(gateway.stub)
    code = code_sent_to(interakt, PHONE)
    await verify(gateway.stub, wrong_code(code))

    shown = await state(admin)
    assert (shown.live_codes, shown.attempts_used, shown.sends_in_window) == (1, 1, 1)
    assert shown.wrong_codes_in_window == 1
    assert shown.codes_expire_at == sent.expires_at
    assert 0 < shown.cooldown_seconds <= Settings().resend_cooldown_seconds
    assert (shown.locked_seconds, shown.hourly_cap_seconds) == (0, 0)
    assert shown.latest_delivery.state == otp_pb2.DELIVERY_STATE_QUEUED
    assert shown.latest_delivery.channel == otp_pb2.CHANNEL_TEXT
    assert shown.latest_delivery.message_id == sent.message_id
    wire = shown.SerializeToString()
    assert code.encode() not in wire
    assert digest(PHONE, code)[:32].encode() not in wire

    status, out, _ = await run_admin(gateway, token_file, "show", PHONE, capsys=capsys)
    assert status == 0
    assert json.loads(out)["latest_delivery"]["message_id"] == sent.message_id
    assert code not in out


async def test_cancel_deletes_the_live_codes(
    gateway: Gateway,
    interakt: FakeInterakt,
    admin: admin_pb2_grpc.AdminServiceStub,
) -> None:
    await send(gateway.stub)
    code = code_sent_to(interakt, PHONE)
    answer = await admin.CancelCodes(
        admin_pb2.CancelCodesRequest(phone_number=PHONE), metadata=as_admin(), timeout=10
    )
    assert answer.codes_cancelled == 1
    assert (await verify(gateway.stub, code)).outcome == otp_pb2.VERIFY_OUTCOME_NO_ACTIVE_CODE
    status = gateway.stub.GetOtpStatus(otp_pb2.GetOtpStatusRequest(phone_number=PHONE), timeout=10)
    assert await status_of(status) == grpc.StatusCode.NOT_FOUND
    assert (await state(admin)).live_codes == 0


ADMIN_CALLS = (
    ("GetNumberState", admin_pb2.GetNumberStateRequest(phone_number=PHONE)),
    ("UnlockNumber", admin_pb2.UnlockNumberRequest(phone_number=PHONE)),
    ("CancelCodes", admin_pb2.CancelCodesRequest(phone_number=PHONE)),
)


async def test_a_caller_token_reaches_no_admin_call_and_an_admin_token_no_otp_call(
    gateway: Gateway,
    interakt: FakeInterakt,
    admin: admin_pb2_grpc.AdminServiceStub,
    redis_db: redis.Redis,
) -> None:
    await send(gateway.stub)
    code = code_sent_to(interakt, PHONE)
    for method, request in ADMIN_CALLS:
        for metadata in (as_admin(TOKEN), as_admin("nothing-of-the-kind-0123"), ()):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await getattr(admin, method)(request, metadata=metadata, timeout=10)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED, method
            assert "admin token" in (refused.value.details() or "")
    assert (await state(admin)).live_codes == 1  # nothing was cancelled
    otp_calls = (
        gateway.stub.SendOtp(otp_pb2.SendOtpRequest(phone_number=PHONE), metadata=as_admin()),
        gateway.stub.VerifyOtp(
            otp_pb2.VerifyOtpRequest(phone_number=PHONE, otp_code=code), metadata=as_admin()
        ),
        gateway.stub.GetOtpStatus(
            otp_pb2.GetOtpStatusRequest(phone_number=PHONE), metadata=as_admin()
        ),
    )
    for call in otp_calls:
        assert await status_of(call) == grpc.StatusCode.UNAUTHENTICATED
    assert (await verify(gateway.stub, code)).verified  # the admin's verify changed nothing


async def test_the_admin_command_says_a_refusal_on_stderr(
    gateway: Gateway, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    caller_token = tmp_path / "caller-token"
    caller_token.write_text(TOKEN)
    status, out, err = await run_admin(gateway, caller_token, "unlock", PHONE, capsys=capsys)
    assert (status, out) == (1, "")
    assert err.startswith("otp-service admin: UNAUTHENTICATED: a valid admin token is required")


async def test_a_bad_number_is_invalid_argument_and_changes_nothing(
    admin: admin_pb2_grpc.AdminServiceStub, redis_db: redis.Redis
) -> None:
    for method, _ in ADMIN_CALLS:
        request = getattr(admin_pb2, f"{method}Request")(phone_number="7003848501")
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await getattr(admin, method)(request, metadata=as_admin(), timeout=10)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "phone_number" in (refused.value.details() or "")
    assert redis_db.dbsize() == 0


async def test_without_admin_tokens_there_is_no_admin_service(make_gateway: MakeGateway) -> None:
    gateway = await make_gateway()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.grpc_port}") as channel:
        stub = admin_pb2_grpc.AdminServiceStub(channel)
        call = stub.GetNumberState(
            admin_pb2.GetNumberStateRequest(phone_number=PHONE), metadata=as_admin(), timeout=10
        )
        assert await status_of(call) == grpc.StatusCode.UNIMPLEMENTED


def test_an_admin_token_that_is_a_caller_token_too_is_a_configuration_error(
    tmp_path: Path,
) -> None:
    admins = tmp_path / "admins"
    admins.write_text(f"{ADMIN}:{TOKEN}\n")
    env = {"OTP_CLIENT_TOKENS": f"billing:{TOKEN}", "OTP_ADMIN_TOKENS_FILE": str(admins)}
    with pytest.raises(ConfigError) as refused:
        Settings.from_env(env, dev=True)
    assert refused.value.problems == [
        "OTP_ADMIN_TOKENS_FILE: 1 token(s) are caller tokens too; an admin token must be its own"
    ]
    assert TOKEN not in str(refused.value.problems)


async def test_the_admin_tokens_file_is_re_read_while_running(
    admin: admin_pb2_grpc.AdminServiceStub, admin_tokens: Path
) -> None:
    new_token = "another-admin-token-0123456789"
    fresh = admin_tokens.with_suffix(".new")
    fresh.write_text(f"night-shift:{new_token}\n")
    os.replace(fresh, admin_tokens)
    request = admin_pb2.GetNumberStateRequest(phone_number=PHONE)

    async def accepted() -> bool:
        call = admin.GetNumberState(request, metadata=as_admin(new_token), timeout=10)
        return await status_of(call) == grpc.StatusCode.OK

    await eventually(accepted)
    revoked = admin.GetNumberState(request, metadata=as_admin(), timeout=10)
    assert await status_of(revoked) == grpc.StatusCode.UNAUTHENTICATED
