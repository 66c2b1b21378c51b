"""Caller authentication through the real server: tokens, rotation, open probes, start-up rules."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import grpc
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from otp.v1 import otp_pb2, otp_pb2_grpc
from prometheus_client import REGISTRY

from otp_service import ConfigError, Settings
from otp_service.auth import Callers
from otp_service.config import DEV_TOKEN
from otp_service.gateway import HttpServer, LocalBackend
from tests.conftest import PHONE, TOKEN, MakeServer
from tests.fake_interakt import FakeInterakt

OTHER_TOKEN = "another-caller-token-abcdefgh"
STATIC_TOKEN = "a-configured-token-0123456789"

OpenChannel = Callable[..., Awaitable[grpc.aio.Channel]]


@pytest.fixture
async def plain_channel(make_server: MakeServer) -> AsyncIterator[OpenChannel]:
    """Channels without a default token, to servers started with settings overrides."""
    channels: list[grpc.aio.Channel] = []

    async def open_channel(**overrides: object) -> grpc.aio.Channel:
        server = await make_server(**overrides)
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
        channels.append(channel)
        return channel

    yield open_channel
    for channel in channels:
        await channel.close()


def failures(reason: str) -> float:
    return REGISTRY.get_sample_value("otp_auth_failures_total", {"reason": reason}) or 0.0


async def verify_as(
    channel: grpc.aio.Channel, authorization: str | None
) -> otp_pb2.VerifyOtpResponse:
    metadata = () if authorization is None else (("authorization", authorization),)
    return await otp_pb2_grpc.OtpServiceStub(channel).VerifyOtp(
        otp_pb2.VerifyOtpRequest(phone_number=PHONE, otp_code="123456"),
        metadata=metadata,
        timeout=10,
    )


@pytest.mark.parametrize(
    ("authorization", "reason"),
    [
        (None, "missing"),
        ("", "malformed"),
        (f"Basic {TOKEN}", "malformed"),
        ("Bearer ", "malformed"),
        ("Bearer wrong-token-0123456789", "unknown"),
        (f"Bearer {TOKEN}x", "unknown"),
        (f"Bearer {TOKEN[:-1]}", "unknown"),
    ],
)
async def test_calls_without_a_valid_token_are_unauthenticated_and_counted(
    plain_channel: OpenChannel,
    redis_db: redis.Redis,
    authorization: str | None,
    reason: str,
) -> None:
    channel = await plain_channel()
    before = failures(reason)
    for call in (
        verify_as(channel, authorization),
        otp_pb2_grpc.OtpServiceStub(channel).SendOtp(
            otp_pb2.SendOtpRequest(phone_number=PHONE),
            metadata=() if authorization is None else (("authorization", authorization),),
            timeout=10,
        ),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await call
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # The same words whatever was wrong: no hint which part to fix.
        assert refused.value.details() == (
            "a valid caller token is required: authorization: Bearer <token>"
        )
    assert failures(reason) == before + 2
    assert redis_db.keys() == []


async def test_a_valid_token_names_the_caller(
    plain_channel: OpenChannel, redis_db: redis.Redis
) -> None:
    channel = await plain_channel(client_tokens=(("billing", TOKEN), ("signup", OTHER_TOKEN)))
    answer = await verify_as(channel, f"Bearer {OTHER_TOKEN}")
    assert answer.outcome == otp_pb2.VERIFY_OUTCOME_NO_ACTIVE_CODE
    await otp_pb2_grpc.OtpServiceStub(channel).SendOtp(
        otp_pb2.SendOtpRequest(phone_number=PHONE),
        metadata=(("authorization", f"bearer {OTHER_TOKEN}"),),
        timeout=10,
    )
    # The caller's send budget is kept under the name its token maps to.
    assert redis_db.exists("otp:{senders}:caller-sends:signup")
    assert not redis_db.exists("otp:{senders}:caller-sends:billing")


async def test_with_auth_off_calls_are_served_and_share_one_caller_budget(
    make_server: MakeServer, interakt: FakeInterakt
) -> None:
    server = await make_server(auth_required=False, client_tokens=(), caller_sends_per_minute=2)
    target = f"127.0.0.1:{server.port}"
    async with (
        grpc.aio.insecure_channel(target) as anonymous,
        grpc.aio.insecure_channel(target) as other,
    ):
        clients = [
            (otp_pb2_grpc.OtpServiceStub(anonymous), ()),
            # A token is not looked at: it names no caller, so it buys no budget of its own.
            (otp_pb2_grpc.OtpServiceStub(other), (("authorization", f"Bearer {OTHER_TOKEN}"),)),
        ]
        for (stub, metadata), phone in zip(
            clients, ("+917003848502", "+917003848503"), strict=True
        ):
            await stub.SendOtp(
                otp_pb2.SendOtpRequest(phone_number=phone), metadata=metadata, timeout=10
            )
        answer = await verify_as(anonymous, None)
        assert answer.outcome == otp_pb2.VERIFY_OUTCOME_NO_ACTIVE_CODE
        for stub, metadata in clients:
            before = caller_refusals()
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.SendOtp(
                    otp_pb2.SendOtpRequest(phone_number=PHONE), metadata=metadata, timeout=10
                )
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert refused.value.details() == "caller: at most 2 sends a minute"
            assert caller_refusals() == before + 1
    assert len(interakt.received) == 2


def caller_refusals() -> float:
    return REGISTRY.get_sample_value("otp_limit_refusals_total", {"kind": "caller"}) or 0.0


async def test_health_and_reflection_stay_open(
    plain_channel: OpenChannel,
) -> None:
    channel = await plain_channel()
    health = await health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service="otp.v1.OtpService"), timeout=10
    )
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    services = await list_services(channel)
    assert "otp.v1.OtpService" in services


async def test_reflection_can_be_switched_off(
    plain_channel: OpenChannel,
) -> None:
    channel = await plain_channel(reflection=False)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await list_services(channel)
    assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED
    health = await health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(), timeout=10
    )
    assert health.status == health_pb2.HealthCheckResponse.SERVING


async def list_services(channel: grpc.aio.Channel) -> list[str]:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    call = stub.ServerReflectionInfo(timeout=10)
    await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
    await call.done_writing()
    async for answer in call:
        return [service.name for service in answer.list_services_response.service]
    raise AssertionError("no reflection answer")


def write_tokens(path: Path, text: str | bytes, mtime_ns: int) -> None:
    if isinstance(text, str):
        text = text.encode()
    path.write_bytes(text)
    # An explicit mtime: a rewrite within the file system's timestamp granularity still counts.
    os.utime(path, ns=(mtime_ns, mtime_ns))


async def serve_billing_from_a_file(
    plain_channel: OpenChannel, tokens: Path, client_tokens: tuple[tuple[str, str], ...] = ()
) -> grpc.aio.Channel:
    """A channel to a server whose tokens file ``tokens`` holds billing's TOKEN, accepted."""
    write_tokens(tokens, f"# one a line\nbilling:{TOKEN}\n", 1_000_000_000_000_000_000)
    channel = await plain_channel(client_tokens=client_tokens, client_tokens_file=str(tokens))
    await verify_as(channel, f"Bearer {TOKEN}")
    return channel


async def test_a_rotated_token_file_takes_effect_without_a_restart(
    plain_channel: OpenChannel, tmp_path: Path
) -> None:
    tokens = tmp_path / "tokens"
    channel = await serve_billing_from_a_file(plain_channel, tokens)
    write_tokens(tokens, f"billing:{OTHER_TOKEN}\n", 1_000_000_001_000_000_000)
    await eventually(channel, OTHER_TOKEN, accepted=True)
    await refused(channel, TOKEN)


async def test_a_token_removed_from_a_partly_malformed_file_is_revoked(
    plain_channel: OpenChannel, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Only the bad lines are skipped: a bad edit cannot keep a revoked token alive."""
    caplog.set_level(logging.ERROR, logger="otp_service.auth")
    tokens = tmp_path / "tokens"
    channel = await serve_billing_from_a_file(plain_channel, tokens)
    swapped = "swapped-token-0123456789"
    lines = [
        "# billing's token is revoked",
        f"signup:{OTHER_TOKEN}",
        "billing without a colon",
        f"{swapped}:billing",  # token and name the wrong way round
        "latin1:token-caf\xe9-0123456789",  # not UTF-8
    ]
    write_tokens(tokens, "\n".join(lines).encode("latin-1"), 1_000_000_001_000_000_000)
    await eventually(channel, OTHER_TOKEN, accepted=True)
    await refused(channel, TOKEN)
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    for line in (3, 4, 5):
        assert any(f"line {line}: " in error for error in errors), errors
    # A bad line is named by its number only: it may hold a token.
    assert not any("without a colon" in e or swapped in e or "caf" in e for e in errors)


async def test_a_deleted_tokens_file_accepts_none_of_its_tokens_until_it_is_back(
    plain_channel: OpenChannel, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="otp_service.auth")
    tokens = tmp_path / "tokens"
    channel = await serve_billing_from_a_file(
        plain_channel, tokens, client_tokens=(("static", STATIC_TOKEN),)
    )
    tokens.unlink()
    await eventually(channel, TOKEN, accepted=False)
    # The configured tokens do not depend on the file.
    await verify_as(channel, f"Bearer {STATIC_TOKEN}")
    # Said again at each check while the file is missing, not once and then silence.
    for _ in range(200):
        if len(cannot_read(caplog)) >= 2:
            break
        await refused(channel, TOKEN)
        await asyncio.sleep(0.05)
    assert len(cannot_read(caplog)) >= 2

    write_tokens(tokens, f"billing:{TOKEN}\n", 1_000_000_000_000_000_000)
    await eventually(channel, TOKEN, accepted=True)


def cannot_read(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [
        record
        for record in caplog.records
        if record.levelno == logging.ERROR
        and "none of its tokens is accepted" in record.getMessage()
    ]


async def refused(channel: grpc.aio.Channel, token: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as refusal:
        await verify_as(channel, f"Bearer {token}")
    assert refusal.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def eventually(channel: grpc.aio.Channel, token: str, *, accepted: bool) -> None:
    """Wait for the server to see a change of the file (it looks about once a second)."""
    for _ in range(200):
        try:
            await verify_as(channel, f"Bearer {token}")
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.UNAUTHENTICATED:
                raise
            if not accepted:
                return
        else:
            if accepted:
                return
        await asyncio.sleep(0.05)
    raise AssertionError(f"the token was never {'accepted' if accepted else 'refused'}")


def test_the_token_file_is_looked_at_no_more_than_once_a_second(tmp_path: Path) -> None:
    now = [100.0]
    tokens = tmp_path / "tokens"
    write_tokens(tokens, f"billing:{TOKEN}\n", 1_000_000_000_000_000_000)
    callers = Callers((("static", OTHER_TOKEN),), str(tokens), clock=lambda: now[0])
    assert callers.lookup(TOKEN) == "billing"
    assert callers.lookup(OTHER_TOKEN) == "static"
    assert callers.lookup("x" * 20) is None

    write_tokens(tokens, "signup:a-brand-new-token-0123\n", 1_000_000_001_000_000_000)
    now[0] += 0.5
    assert callers.lookup(TOKEN) == "billing"
    now[0] += 0.5
    assert callers.lookup(TOKEN) is None
    assert callers.lookup("a-brand-new-token-0123") == "signup"


def test_an_unreadable_token_file_is_reported_once_a_check_not_once_a_call(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="otp_service.auth")
    now = [100.0]
    tokens = tmp_path / "tokens"
    write_tokens(tokens, f"billing:{TOKEN}\n", 1_000_000_000_000_000_000)
    callers = Callers((("static", OTHER_TOKEN),), str(tokens), clock=lambda: now[0])
    tokens.unlink()
    tokens.mkdir()  # there, but not a file that can be read
    now[0] += 1
    for _ in range(100):
        assert callers.lookup(TOKEN) is None
    assert callers.lookup(OTHER_TOKEN) == "static"
    assert len(cannot_read(caplog)) == 1
    now[0] += 1
    assert callers.lookup(TOKEN) is None
    assert len(cannot_read(caplog)) == 2

    tokens.rmdir()
    write_tokens(tokens, f"billing:{TOKEN}\n", 1_000_000_000_000_000_000)
    now[0] += 1
    assert callers.lookup(TOKEN) == "billing"
    assert len(cannot_read(caplog)) == 2


def test_a_malformed_tokens_file_is_refused_at_start_up(tmp_path: Path) -> None:
    """Strict at start-up, while someone watches the deployment; skipped lines while running."""
    tokens = tmp_path / "tokens"
    tokens.write_text(f"billing:{TOKEN}\n{OTHER_TOKEN}\n")
    with pytest.raises(ConfigError) as failed:
        Settings.from_env({"OTP_CLIENT_TOKENS_FILE": str(tokens)}, dev=True)
    assert failed.value.problems == [
        "OTP_CLIENT_TOKENS_FILE: line 2: expected name:token, the name of letters, digits, "
        "'.', '_', '-'"
    ]


def test_production_needs_a_caller_token_unless_auth_is_off() -> None:
    env = {"INTERAKT_API_KEY": "k", "INTERAKT_CHANNEL": "text", "OTP_SECRET": "s" * 16}
    with pytest.raises(ConfigError) as refused:
        Settings.from_env(env)
    assert any("at least one caller token" in p for p in refused.value.problems)

    assert not Settings.from_env({**env, "OTP_AUTH": "none"}).auth_required
    configured = Settings.from_env(
        {**env, "OTP_CLIENT_TOKENS": f"billing:{TOKEN},signup:{OTHER_TOKEN}"}
    )
    assert configured.client_tokens == (("billing", TOKEN), ("signup", OTHER_TOKEN))
    assert TOKEN not in repr(configured)
    # Development mode accepts the fixed dev token when none is configured.
    assert Settings.from_env({}, dev=True).client_tokens == (("dev", DEV_TOKEN),)


@pytest.mark.parametrize(
    ("env", "problem"),
    [
        ({"OTP_CLIENT_TOKENS": "billing"}, "OTP_CLIENT_TOKENS: entry 1: expected name:token"),
        ({"OTP_CLIENT_TOKENS": "billing:short"}, "OTP_CLIENT_TOKENS: entry 1: the token"),
        (
            {"OTP_CLIENT_TOKENS": f"a:{TOKEN},b:{TOKEN}"},
            "OTP_CLIENT_TOKENS: entry 2: the same token is given twice",
        ),
        # The token where the name belongs: not echoed as the caller's name.
        ({"OTP_CLIENT_TOKENS": f"{TOKEN}:billing"}, "OTP_CLIENT_TOKENS: entry 1: the token"),
        ({"OTP_CLIENT_TOKENS_FILE": "/nonexistent"}, "OTP_CLIENT_TOKENS_FILE: cannot read"),
        ({"OTP_AUTH": "maybe"}, "OTP_AUTH: must be 'token' or 'none'"),
        ({"OTP_REFLECTION": "perhaps"}, "OTP_REFLECTION: must be true or false"),
        ({"OTP_TLS_CERT": "/etc/hostname"}, "OTP_TLS_CERT, OTP_TLS_KEY: set both or neither"),
        ({"OTP_TLS_KEY": "/nonexistent"}, "OTP_TLS_KEY: cannot read '/nonexistent'"),
        ({"OTP_TLS_CLIENT_CA": "/etc/hostname"}, "OTP_TLS_CLIENT_CA: needs OTP_TLS_CERT"),
        ({"OTP_ALLOWED_COUNTRIES": "91,999"}, "OTP_ALLOWED_COUNTRIES: expected calling codes"),
    ],
)
def test_bad_security_settings_are_named(env: dict[str, str], problem: str) -> None:
    with pytest.raises(ConfigError) as refused:
        Settings.from_env({"OTP_CLIENT_TOKENS": f"billing:{TOKEN}", **env}, dev=True)
    assert any(p.startswith(problem) for p in refused.value.problems), refused.value.problems
    # A problem names the entry, never the token.
    assert TOKEN not in str(refused.value)


def test_production_without_tokens_exits_2() -> None:
    env = {
        "PATH": os.environ["PATH"],
        "INTERAKT_API_KEY": "k",
        "INTERAKT_CHANNEL": "text",
        "OTP_SECRET": "s" * 16,
    }
    done = subprocess.run(
        [sys.executable, "-m", "otp_service", "serve"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert "at least one caller token is required" in done.stderr


def test_auth_none_warns_at_start(redis_server: object) -> None:
    env = {
        "PATH": os.environ["PATH"],
        "INTERAKT_API_KEY": "k",
        "INTERAKT_CHANNEL": "text",
        "OTP_SECRET": "s" * 16,
        "OTP_AUTH": "none",
        "OTP_GRPC_ADDRESS": "127.0.0.1:0",
        "OTP_HTTP_ADDRESS": "",
        "REDIS_URL": redis_server.url,  # type: ignore[attr-defined]
    }
    with subprocess.Popen(
        [sys.executable, "-m", "otp_service", "serve"],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    ) as process:
        assert process.stdout is not None
        # Stops a server that never logs the warning, so the test fails instead of hanging.
        watchdog = threading.Timer(30, process.kill)
        watchdog.start()
        lines = []
        for line in process.stdout:
            lines.append(line)
            if "OTP_AUTH=none" in line:
                break
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
        watchdog.cancel()
    assert any("WARNING" in line and "caller authentication is OFF" in line for line in lines)


async def test_metrics_and_openapi_can_require_a_caller_token(make_server: MakeServer) -> None:
    server = await make_server()
    callers = Callers((("ops", "ops-token-0123456789"),))
    backend = LocalBackend(server.behaviors, server.health)
    http = await HttpServer.start("127.0.0.1:0", backend, shutdown_timeout=1, callers=callers)
    base = f"http://127.0.0.1:{http.port}"
    try:
        async with aiohttp.ClientSession() as session:
            for path in ("/metrics", "/openapi.json"):
                async with session.get(base + path) as refused:
                    assert refused.status == 401
                    body = await refused.json()
                    assert body["code"] == grpc.StatusCode.UNAUTHENTICATED.value[0]
                headers = {"Authorization": "Bearer ops-token-0123456789"}
                async with session.get(base + path, headers=headers) as allowed:
                    assert allowed.status == 200
            # The probes stay open.
            async with session.get(base + "/healthz") as probe:
                assert probe.status == 200
    finally:
        await http.close()


def test_metrics_auth_needs_tokens_to_check() -> None:
    with pytest.raises(ConfigError) as failed:
        Settings.from_env({"OTP_METRICS_AUTH": "true", "OTP_AUTH": "none"}, dev=True)
    assert any("OTP_METRICS_AUTH" in problem for problem in failed.value.problems)
    with pytest.raises(ConfigError) as gateway:
        Settings.from_env({"OTP_METRICS_AUTH": "true"}, gateway_only=True)
    assert any("OTP_METRICS_AUTH" in problem for problem in gateway.value.problems)
    assert Settings.from_env({"OTP_METRICS_AUTH": "true"}, dev=True).metrics_auth
