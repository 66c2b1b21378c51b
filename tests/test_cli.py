"""The ``otp-service`` command as an operator runs it: a real process, a real port."""

from __future__ import annotations

import logging
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
from otp_service.connections.embedded_redis import free_port
from tests.conftest import PHONE

OTP_SERVICE = str(Path(sys.executable).with_name("otp-service"))
# The child never inherits a developer's own configuration.
CLEAN_ENV = {
    k: v for k, v in os.environ.items() if not k.startswith(("OTP_", "INTERAKT_", "REDIS_"))
}
VALID = {
    "INTERAKT_API_KEY": "ZmFrZS1pbnRlcmFrdC1rZXk=",
    "INTERAKT_TEMPLATE_NAME": "Auth",
    "OTP_SECRET": "a-production-secret-0123456789",
    "OTP_CLIENT_TOKENS": "billing:a-billing-token-0123456789",
}


def run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """``otp-service serve ARGS`` with ``env``."""
    return command(env, "serve", *args)


def command(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """``otp-service ARGS`` with ``env``, to its end."""
    return subprocess.run(
        [OTP_SERVICE, *args],
        env={**CLEAN_ENV, **env},
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_defaults_match_the_readme() -> None:
    settings = Settings.from_env(VALID)
    assert settings.redis_url == "redis://127.0.0.1:6379/0"
    assert settings.interakt_base_url == "https://api.interakt.ai/v1/public"
    assert (settings.interakt_channel, settings.template_name) == ("template", "Auth")
    assert (settings.template_language, settings.template_languages) == ("en", ())
    assert settings.template_button
    assert settings.status_readers == frozenset()
    assert settings.grpc_address == "0.0.0.0:50051"
    assert (settings.code_length, settings.ttl_seconds, settings.max_attempts) == (6, 600, 5)
    assert (settings.resend_cooldown_seconds, settings.max_sends_per_hour) == (30, 5)
    assert settings.brand == "MinServe"
    assert VALID["OTP_SECRET"] not in repr(settings)
    assert VALID["INTERAKT_API_KEY"] not in repr(settings)
    assert "a-billing-token" not in repr(settings)


def test_delivery_settings() -> None:
    settings = Settings.from_env(VALID)
    assert (settings.interakt_webhook_secret, settings.breaker_failures) == ("", 5)
    assert settings.breaker_cooloff_seconds == 30
    secret = "a-webhook-secret-0123456789"
    custom = Settings.from_env(
        {
            **VALID,
            "INTERAKT_WEBHOOK_SECRET": secret,
            "INTERAKT_BREAKER_FAILURES": "3",
            "INTERAKT_BREAKER_COOLOFF_SECONDS": "2.5",
        }
    )
    assert (custom.interakt_webhook_secret, custom.breaker_failures) == (secret, 3)
    assert custom.breaker_cooloff_seconds == 2.5
    assert secret not in repr(custom)
    with pytest.raises(ConfigError) as bad:
        Settings.from_env(
            {
                **VALID,
                "INTERAKT_WEBHOOK_SECRET": "short-secret",
                "INTERAKT_BREAKER_FAILURES": "0",
                "INTERAKT_BREAKER_COOLOFF_SECONDS": "0",
            }
        )
    assert bad.value.problems == [
        "INTERAKT_WEBHOOK_SECRET: must be at least 16 characters",
        "INTERAKT_BREAKER_FAILURES: must be between 1 and 1000 (got 0)",
        "INTERAKT_BREAKER_COOLOFF_SECONDS: must be between 0.1 and 3600 (got 0.0)",
    ]
    assert "short-secret" not in str(bad.value)


def test_template_settings() -> None:
    """Production sends an authentication template; Text must be chosen (INTERAKT_CHANNEL)."""
    custom = Settings.from_env(
        {
            **VALID,
            "INTERAKT_TEMPLATE_LANGUAGE": "en_US",
            "INTERAKT_TEMPLATE_LANGUAGES": "91:hi, +44:en_GB,",
            "INTERAKT_TEMPLATE_BUTTON": "false",
            "OTP_STATUS_READERS": "support, audit",
        }
    )
    assert custom.template_language == "en_US"
    assert custom.template_languages == (("91", "hi"), ("44", "en_GB"))
    assert not custom.template_button
    assert custom.status_readers == {"support", "audit"}
    without = {k: v for k, v in VALID.items() if k != "INTERAKT_TEMPLATE_NAME"}
    text = Settings.from_env({**without, "INTERAKT_CHANNEL": "Text"})
    assert (text.interakt_channel, text.template_name) == ("text", None)
    assert Settings.from_env({}, dev=True).template_name is None  # dev writes codes to its log
    with pytest.raises(ConfigError) as bad:
        Settings.from_env(
            {
                **VALID,
                "INTERAKT_CHANNEL": "text",
                "INTERAKT_TEMPLATE_LANGUAGE": "en-US",
                "INTERAKT_TEMPLATE_LANGUAGES": "91:hi,91:en,999:en,44:english,:hi",
                "OTP_STATUS_READERS": "a b",
            }
        )
    assert bad.value.problems == [
        "INTERAKT_TEMPLATE_NAME: set, but INTERAKT_CHANNEL=text sends no template; unset one of "
        "them",
        "INTERAKT_TEMPLATE_LANGUAGE: 'en-US' is not one of WhatsApp's template languages (such "
        "as en, en_US, hi, pt_BR: docs/interakt.md)",
        "INTERAKT_TEMPLATE_LANGUAGES: entry 2: +91 is given twice",
        "INTERAKT_TEMPLATE_LANGUAGES: entry 3: expected callingcode:language, such as 91:hi",
        "INTERAKT_TEMPLATE_LANGUAGES: entry 4: 'english' is not one of WhatsApp's template "
        "languages (such as en, en_US, hi, pt_BR: docs/interakt.md)",
        "INTERAKT_TEMPLATE_LANGUAGES: entry 5: expected callingcode:language, such as 91:hi",
        "OTP_STATUS_READERS: expected caller names (as in OTP_CLIENT_TOKENS), comma-separated",
    ]
    with pytest.raises(ConfigError) as bad:
        Settings.from_env({**without, "INTERAKT_CHANNEL": "sms"})
    assert bad.value.problems == ["INTERAKT_CHANNEL: must be 'template' or 'text' (got 'sms')"]


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
        "INTERAKT_TEMPLATE_NAME",
        "INTERAKT_BASE_URL",
        "OTP_TTL_SECONDS",
        "OTP_CLIENT_TOKENS / OTP_CLIENT_TOKENS_FILE",
        "OTP_GRPC_ADDRESS",
        "OTP_CODE_LENGTH",
    ]
    assert "short" not in str(failed.value)


def test_the_secret_needs_16_characters() -> None:
    with pytest.raises(ConfigError) as short:
        Settings.from_env({**VALID, "OTP_SECRET": "s" * 15})
    assert short.value.problems == ["OTP_SECRET: must be at least 16 characters"]
    assert Settings.from_env({**VALID, "OTP_SECRET": "s" * 16}).otp_secret == b"s" * 16


@pytest.mark.parametrize(
    "url",
    ["http://127.0.0.1:8000/v1", "http://127.9.9.9/v1", "http://[::1]:80", "http://localhost"],
)
def test_plain_http_to_interakt_is_allowed_to_loopback_only(url: str) -> None:
    """A local egress proxy or sidecar may take it in clear; nothing else may."""
    assert Settings.from_env({**VALID, "INTERAKT_BASE_URL": url}).interakt_base_url == url


@pytest.mark.parametrize(
    "url", ["http://api.interakt.ai/v1/public", "http://10.0.0.8/v1", "http://128.0.0.1"]
)
def test_plain_http_to_interakt_is_refused_in_production(url: str) -> None:
    with pytest.raises(ConfigError) as refused:
        Settings.from_env({**VALID, "INTERAKT_BASE_URL": url})
    assert refused.value.problems == [
        f"INTERAKT_BASE_URL: must be https:// in production (got {url!r}); http:// is allowed "
        "only to a loopback address (127.0.0.0/8, ::1, localhost)"
    ]
    # Development mode may post anywhere (it sends nothing but to a fake).
    assert Settings.from_env({"INTERAKT_BASE_URL": url}, dev=True).interakt_base_url == url


def test_production_without_configuration_exits_2_before_listening() -> None:
    port = free_port()
    finished = run({"OTP_GRPC_ADDRESS": f"127.0.0.1:{port}"})
    assert finished.returncode == 2
    lines = finished.stderr.strip().splitlines()
    assert lines == [
        "otp-service: configuration error: INTERAKT_API_KEY: required in production mode",
        "otp-service: configuration error: OTP_SECRET: required in production mode",
        "otp-service: configuration error: INTERAKT_TEMPLATE_NAME: required in production mode "
        "(an approved authentication template, docs/interakt.md), unless INTERAKT_CHANNEL=text "
        "is chosen",
        "otp-service: configuration error: OTP_CLIENT_TOKENS / OTP_CLIENT_TOKENS_FILE: at least "
        "one caller token is required in production mode (OTP_AUTH=none turns caller "
        "authentication off)",
    ]


@pytest.mark.parametrize("host", ["127.0.0.1", "0.0.0.0"])  # noqa: S104 (the default's host)
@pytest.mark.parametrize("busy", ["OTP_GRPC_ADDRESS", "OTP_HTTP_ADDRESS"])
def test_busy_port_is_one_clear_line_naming_the_setting_and_exit_2(busy: str, host: str) -> None:
    with socket.socket() as taken:
        taken.bind((host, 0))
        taken.listen()
        port = taken.getsockname()[1]
        addresses = {"OTP_GRPC_ADDRESS": "127.0.0.1:0", "OTP_HTTP_ADDRESS": "127.0.0.1:0"}
        finished = run({**VALID, **addresses, busy: f"{host}:{port}"})
    assert finished.returncode == 2
    side = "gRPC" if busy == "OTP_GRPC_ADDRESS" else "HTTP"
    # Only our line: not gRPC's raw `add_port.cc` lines before it (one per address family), nor
    # a trace.
    assert finished.stderr.splitlines() == [
        f"otp-service: cannot listen on {host}:{port} ({side}): Address already in use; "
        f"set {busy} to a free address"
    ]


def test_unknown_variables_stop_production_and_warn_in_development(
    caplog: pytest.LogCaptureFixture,
) -> None:
    typos = {"OTP_MAX_ATTEMPT": "3", "INTERAKT_APIKEY": "k", "REDIS_TIMEOUT": "2"}
    # What Kubernetes injects for a Service named "redis" in the namespace is not ours.
    kubernetes = {
        "REDIS_SERVICE_HOST": "10.0.0.7",
        "REDIS_SERVICE_PORT": "6379",
        "REDIS_SERVICE_PORT_REDIS": "6379",
        "REDIS_PORT": "tcp://10.0.0.7:6379",
        "REDIS_PORT_6379_TCP": "tcp://10.0.0.7:6379",
        "REDIS_PORT_6379_TCP_ADDR": "10.0.0.7",
        "REDIS_PORT_6379_TCP_PROTO": "tcp",
        "REDIS_PORT_6379_TCP_PORT": "6379",
        "OTP_SERVICE_SERVICE_HOST": "10.0.0.8",
    }
    finished = run({**VALID, **typos, **kubernetes, "OTP_MAX_ATTEMPTS": "4"})
    assert finished.returncode == 2
    assert finished.stderr.splitlines() == [
        f"otp-service: configuration error: {name}: not a variable otp-service reads (a typo?)"
        for name in sorted(typos)
    ]
    # Development mode says so and starts all the same.
    with caplog.at_level(logging.WARNING, logger="otp_service.config"):
        assert Settings.from_env({**typos, **kubernetes}, dev=True).dev
    assert [(r.levelname, r.event, r.getMessage()) for r in caplog.records] == [
        (
            "WARNING",
            "config_unknown_variable",
            f"{name}: not a variable otp-service reads (a typo?)",
        )
        for name in sorted(typos)
    ]


def test_every_documented_variable_is_a_known_one() -> None:
    """Each variable the README's configuration table names is read (not taken for a typo)."""
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    table = readme.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    names = set(re.findall(r"`((?:OTP|INTERAKT|REDIS)_[A-Z_]+)`", table))
    assert len(names) > 25
    with pytest.raises(ConfigError) as failed:
        Settings.from_env(dict.fromkeys(names, "?"))
    assert not [p for p in failed.value.problems if "not a variable" in p]


# Where the dev_server fixture listens: what `otp-service dev report` reads to reach it.
DEV_ADDRESSES = {"OTP_GRPC_ADDRESS": f"127.0.0.1:{free_port()}"}
DEV_ADDRESSES["OTP_HTTP_ADDRESS"] = f"127.0.0.1:{free_port()}"


@pytest.fixture
def dev_server() -> Iterator[tuple[int, subprocess.Popen[str]]]:
    """``otp-service serve --dev`` with no configuration: private Redis, codes in the log."""
    port = int(DEV_ADDRESSES["OTP_GRPC_ADDRESS"].rpartition(":")[2])
    process = subprocess.Popen(
        [OTP_SERVICE, "serve", "--dev"],
        env={**CLEAN_ENV, **DEV_ADDRESSES},
        stdout=subprocess.PIPE,
        text=True,
    )
    yield port, process
    # SIGTERM, as a supervisor would: the server stops its private Redis on the way out, which
    # a SIGKILL would leave running (one more redis-server on the machine after every run).
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
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


def test_dev_report_walks_a_dev_message_through_its_states(
    dev_server: tuple[int, subprocess.Popen[str]],
) -> None:
    port, process = dev_server
    read_until(process, "listening on .* \\(HTTP")
    auth = (("authorization", "Bearer dev"),)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = otp_pb2_grpc.OtpServiceStub(channel)
        sent = stub.SendOtp(otp_pb2.SendOtpRequest(phone_number=PHONE), timeout=10, metadata=auth)
        # The dev sender gives each message an id, as Interakt does, for reports to find it.
        assert sent.message_id.startswith("dev-")
        for state in ("sent", "delivered", "read"):
            done = command(DEV_ADDRESSES, "dev", "report", PHONE, state)
            assert (done.returncode, done.stderr) == (0, "")
            assert done.stdout == (
                f"reported {state} on message {sent.message_id}; "
                f"GetOtpStatus says {state.upper()}\n"
            )
        status = stub.GetOtpStatus(
            otp_pb2.GetOtpStatusRequest(phone_number=PHONE), timeout=10, metadata=auth
        )
        assert status.state == otp_pb2.DELIVERY_STATE_READ

        other = "+917003848502"
        stub.SendOtp(otp_pb2.SendOtpRequest(phone_number=other), timeout=10, metadata=auth)
        failed = command(DEV_ADDRESSES, "dev", "report", other, "failed", "--error-code", "131026")
        assert failed.returncode == 0, failed.stderr
        assert failed.stdout.endswith("GetOtpStatus says FAILED (NOT_ON_WHATSAPP)\n")

    # A number with no live code: nothing to report on, said in one line.
    nothing = command(DEV_ADDRESSES, "dev", "report", "+917003848503", "delivered")
    assert nothing.returncode == 1
    assert nothing.stderr.startswith("otp-service: GetOtpStatus: NOT_FOUND: ")
    assert nothing.stderr.count("\n") == 1
