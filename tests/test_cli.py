"""The ``otp-service`` command as an operator runs it: a real process, a real port."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from otp.v1 import otp_pb2, otp_pb2_grpc

from otp_service import ConfigError, Settings
from otp_service.embedded_redis import free_port
from tests.conftest import PHONE

OTP_SERVICE = str(Path(sys.executable).with_name("otp-service"))
# The child never inherits a developer's own configuration.
CLEAN_ENV = {
    k: v for k, v in os.environ.items() if not k.startswith(("OTP_", "INTERAKT_", "REDIS_"))
}
VALID = {
    "INTERAKT_API_KEY": "ZmFrZS1pbnRlcmFrdC1rZXk=",
    "OTP_SECRET": "a-production-secret-0123456789",
    "OTP_CLIENT_TOKENS": "billing:a-billing-token-0123456789",
}


def run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [OTP_SERVICE, "serve", *args],
        env={**CLEAN_ENV, **env},
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_defaults_match_the_readme() -> None:
    settings = Settings.from_env(VALID)
    assert settings.redis_url == "redis://127.0.0.1:6379/0"
    assert settings.interakt_base_url == "https://api.interakt.ai/v1/public"
    assert settings.template_name is None
    assert settings.template_language == "en"
    assert settings.grpc_address == "0.0.0.0:50051"
    assert (settings.code_length, settings.ttl_seconds, settings.max_attempts) == (6, 600, 5)
    assert (settings.resend_cooldown_seconds, settings.max_sends_per_hour) == (30, 5)
    assert settings.brand == "MinServe"
    assert VALID["OTP_SECRET"] not in repr(settings)
    assert VALID["INTERAKT_API_KEY"] not in repr(settings)
    assert "a-billing-token" not in repr(settings)


def test_every_problem_is_reported_at_once() -> None:
    env = {
        "OTP_SECRET": "short",
        "REDIS_URL": "http://localhost",
        "OTP_CODE_LENGTH": "3",
        "OTP_TTL_SECONDS": "ten",
        "OTP_GRPC_ADDRESS": "nowhere",
        "INTERAKT_BASE_URL": "api.interakt.ai",
    }
    with pytest.raises(ConfigError) as failed:
        Settings.from_env(env)
    named = [problem.split(":")[0] for problem in failed.value.problems]
    assert named == [
        "REDIS_URL",
        "INTERAKT_API_KEY",
        "OTP_SECRET",
        "INTERAKT_BASE_URL",
        "OTP_TTL_SECONDS",
        "OTP_CLIENT_TOKENS / OTP_CLIENT_TOKENS_FILE",
        "OTP_GRPC_ADDRESS",
        "OTP_CODE_LENGTH",
    ]
    assert "short" not in str(failed.value)


def test_production_without_configuration_exits_2_before_listening() -> None:
    port = free_port()
    finished = run({"OTP_GRPC_ADDRESS": f"127.0.0.1:{port}"})
    assert finished.returncode == 2
    lines = finished.stderr.strip().splitlines()
    assert lines == [
        "otp-service: configuration error: INTERAKT_API_KEY: required in production mode",
        "otp-service: configuration error: OTP_SECRET: required in production mode",
        "otp-service: configuration error: OTP_CLIENT_TOKENS / OTP_CLIENT_TOKENS_FILE: at least "
        "one caller token is required in production mode (OTP_AUTH=none turns caller "
        "authentication off)",
    ]


def test_busy_port_is_one_clear_line() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        finished = run({**VALID, "OTP_GRPC_ADDRESS": f"127.0.0.1:{port}", "OTP_HTTP_ADDRESS": ""})
    assert finished.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in finished.stderr
    assert "Traceback" not in finished.stderr


@pytest.fixture
def dev_server() -> Iterator[tuple[int, subprocess.Popen[str]]]:
    """``otp-service serve --dev`` with no configuration: private Redis, codes in the log."""
    port = free_port()
    process = subprocess.Popen(
        [OTP_SERVICE, "serve", "--dev"],
        env={
            **CLEAN_ENV,
            "OTP_GRPC_ADDRESS": f"127.0.0.1:{port}",
            "OTP_HTTP_ADDRESS": "127.0.0.1:0",
        },
        stdout=subprocess.PIPE,
        text=True,
    )
    yield port, process
    if process.poll() is None:
        process.kill()
        process.wait()
    assert process.stdout is not None
    process.stdout.close()


def read_until(process: subprocess.Popen[str], pattern: str) -> re.Match[str]:
    assert process.stdout is not None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        found = re.search(pattern, line)
        if found:
            return found
    raise AssertionError(f"the server never logged {pattern!r}")


def test_dev_server_sends_and_verifies_with_no_configuration(
    dev_server: tuple[int, subprocess.Popen[str]],
) -> None:
    port, process = dev_server
    read_until(process, "DEV MODE: started a private redis-server")
    read_until(process, "listening on")
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = otp_pb2_grpc.OtpServiceStub(channel)
        # The dev token is the one the README's examples use.
        auth = (("authorization", "Bearer dev"),)
        sent = stub.SendOtp(otp_pb2.SendOtpRequest(phone_number=PHONE), timeout=10, metadata=auth)
        assert sent.channel == otp_pb2.CHANNEL_LOG
        code = read_until(process, rf"NOT SENT: code for \{PHONE} is (\d+)").group(1)
        request = otp_pb2.VerifyOtpRequest(phone_number=PHONE, otp_code=code)
        assert stub.VerifyOtp(request, timeout=10, metadata=auth).verified
        assert not stub.VerifyOtp(request, timeout=10, metadata=auth).verified
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 0
