"""Infrastructure faults and operator surfaces: Redis trouble, health, reflection."""

from __future__ import annotations

import socket
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from otp.v1 import otp_pb2
from prometheus_client import REGISTRY

from otp_service.connections.embedded_redis import EmbeddedRedis, free_port
from otp_service.connections.redis_backends import RedisTarget, described
from otp_service.store import describe, not_run
from tests.conftest import (
    CALLER,
    PATIENCE_SECONDS,
    PHONE,
    MakeServer,
    MakeService,
    SilentRedis,
    send,
    verify,
)
from tests.fake_interakt import FakeInterakt
from tests.test_no_leaks import everything_in

PYPROJECT = Path(__file__).parent.parent / "pyproject.toml"


async def assert_unavailable(call: object) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await call  # type: ignore[misc]
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
    details = failed.value.details() or ""
    assert "storage is unavailable" in details
    assert "Traceback" not in details


async def test_redis_down_is_unavailable(make_service: MakeService, interakt: FakeInterakt) -> None:
    stub = await make_service(redis_url=f"redis://127.0.0.1:{free_port()}/0")
    await assert_unavailable(send(stub))
    await assert_unavailable(verify(stub, "123456"))
    assert interakt.received == []


async def test_hung_redis_is_unavailable_before_the_callers_deadline(
    make_service: MakeService, interakt: FakeInterakt, silent_redis: SilentRedis
) -> None:
    stub = await make_service(redis_url=silent_redis.url, redis_timeout_seconds=0.2)
    # The caller allows 10 s; the service answers UNAVAILABLE itself instead of running it out.
    await assert_unavailable(send(stub))
    await assert_unavailable(verify(stub, "123456"))
    assert interakt.received == []


async def test_service_recovers_when_redis_comes_back(
    make_service: MakeService, interakt: FakeInterakt
) -> None:
    with EmbeddedRedis() as private:
        stub = await make_service(redis_url=private.url)
        await send(stub)
        private.stop()
        await assert_unavailable(verify(stub, interakt.received[0].code))
        private.start()
        # The restart lost the code (no persistence), but the pooled connections recover.
        result = await verify(stub, interakt.received[0].code)
        assert result.outcome == otp_pb2.VERIFY_OUTCOME_NO_ACTIVE_CODE
        await send(stub)
        assert (await verify(stub, interakt.received[1].code)).verified


async def test_scripts_reload_after_script_flush(
    make_service: MakeService, interakt: FakeInterakt, redis_db: redis.Redis
) -> None:
    stub = await make_service(resend_cooldown_seconds=0)
    await send(stub)
    redis_db.script_flush()
    await send(stub)
    redis_db.script_flush()
    assert (await verify(stub, interakt.received[0].code)).verified


async def test_keys_share_a_hash_tag_and_expire(
    make_service: MakeService, redis_db: redis.Redis
) -> None:
    stub = await make_service()
    await stub.SendOtp(otp_pb2.SendOtpRequest(phone_number=PHONE, idempotency_key="k"), timeout=10)
    keys = sorted(key.decode() for key in redis_db.scan_iter())
    # A number's keys share its hash tag; the send budgets shared by all numbers share another
    # (and an idempotency key, which names one number, has a record in each).
    key_id = keys[2].rpartition(":")[2]
    assert keys == [
        f"otp:{{{PHONE}}}:c",
        f"otp:{{{PHONE}}}:d",
        f"otp:{{{PHONE}}}:k:{key_id}",
        f"otp:{{{PHONE}}}:s",
        "otp:{senders}:account-sends",
        f"otp:{{senders}}:caller-sends:{CALLER}",
        f"otp:{{senders}}:k:{key_id}",
    ]
    for key in keys:
        assert redis_db.pttl(key) > 0


async def test_health_and_reflection(make_server: MakeServer) -> None:
    """What grpcurl and orchestrators need, with no proto files at hand."""
    server = await make_server()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "otp.v1.OtpService"):
            request = health_pb2.HealthCheckRequest(service=service)
            answer = await health.Check(request, timeout=5)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        names: set[str] = set()
        async for response in reflection.ServerReflectionInfo(iter([request])):
            names |= {s.name for s in response.list_services_response.service}
        assert {"otp.v1.OtpService", "grpc.health.v1.Health"} <= names


def test_a_hung_test_fails_within_its_timeout(tmp_path: Path) -> None:
    """pyproject's per-test timeout turns a hang (an await that never returns) into a failure."""
    (tmp_path / "test_hang.py").write_text(
        "import asyncio\n\n\nasync def test_hangs() -> None:\n    await asyncio.Event().wait()\n"
    )
    finished = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:randomly",
            "-p",
            "no:cacheprovider",
            "-c",
            str(PYPROJECT),
            "--rootdir",
            str(tmp_path),
            "-o",
            "timeout=2",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=PATIENCE_SECONDS * 4,  # the hang, were the timeout not there
        check=False,
    )
    assert finished.returncode == 1, finished.stdout
    assert "Timeout (>2.0s)" in finished.stdout
    assert "1 failed" in finished.stdout


def test_the_suite_has_a_default_timeout() -> None:
    options = tomllib.loads(PYPROJECT.read_text())["tool"]["pytest"]["ini_options"]
    assert options["timeout"] >= 30


async def test_why_redis_fails_calls_is_logged_at_most_every_few_seconds(
    make_service: MakeService, interakt: FakeInterakt, caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port()
    stub = await make_service(redis_url=f"redis://:a-redis-password@127.0.0.1:{port}/0")
    errors = REGISTRY.get_sample_value("otp_redis_errors_total") or 0.0
    for _ in range(5):
        await assert_unavailable(verify(stub, "123456"))
    assert REGISTRY.get_sample_value("otp_redis_errors_total") == errors + 5
    [line] = [r for r in caplog.records if getattr(r, "event", "") == "redis_command_failed"]
    assert line.levelname == "WARNING"
    assert line.getMessage().startswith(
        f"redis at redis://127.0.0.1:{port}/0 failed a command: connection refused: "
    )
    assert "a-redis-password" not in everything_in(caplog.records)


def test_an_unknown_host_is_named_and_nothing_ran() -> None:
    """As redis-py raises it when the host's name does not resolve (no lookup made here)."""
    message = "Error -2 connecting to redis.nowhere:6379. Name or service not known."
    error = redis.ConnectionError(message)
    error.__cause__ = socket.gaierror(-2, "Name or service not known")
    assert describe(error) == f"unknown host: {message}"
    assert not_run(error)


def test_where_redis_is_is_named_without_credentials() -> None:
    def where(url: str, **sentinels: Any) -> str:
        return described(RedisTarget(url=url, timeout=1, **sentinels))

    assert where("rediss://user:secret@redis.internal:6380/2") == "rediss://redis.internal:6380/2"
    assert where("redis+cluster://:secret@h1:7000,h2:7001") == "redis+cluster://h1:7000,h2:7001"
    assert (
        where("redis://:secret@/0", sentinels=(("s1", 26379), ("s2", 26379)), sentinel_master="otp")
        == "the primary 'otp' of the sentinels s1:26379,s2:26379"
    )
