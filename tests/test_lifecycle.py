"""Health that follows Redis, the HTTP side's settings, real processes stopped by SIGTERM."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from otp.v1 import otp_pb2, otp_pb2_grpc

from otp_service import ConfigError, Settings
from otp_service.embedded_redis import EmbeddedRedis, free_port
from otp_service.server import SERVICE_NAME
from tests.conftest import (
    CALLER,
    PATIENCE_SECONDS,
    PHONE,
    SECRET,
    TOKEN,
    Bearer,
    MakeGateway,
    delta,
    eventually,
    scrape,
)
from tests.fake_interakt import API_KEY, Answer, FakeInterakt

OTP_SERVICE = str(Path(sys.executable).parent / "otp-service")
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def http_status(http: aiohttp.ClientSession, url: str) -> int:
    async with http.get(url) as response:
        assert response.content_type == "application/json"
        return response.status


async def test_health_follows_redis_and_rpcs_fail_fast_without_it(
    make_gateway: MakeGateway, http: aiohttp.ClientSession, private_redis: EmbeddedRedis
) -> None:
    gateway = await make_gateway(redis_url=private_redis.url)
    channel = grpc.aio.insecure_channel(
        f"127.0.0.1:{gateway.grpc_port}", interceptors=[Bearer(TOKEN)]
    )
    health: Any = health_pb2_grpc.HealthStub(channel)
    watch = health.Watch(health_pb2.HealthCheckRequest(service=SERVICE_NAME))

    async def overall() -> int:
        answer = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        return int(answer.status)

    try:
        assert (await watch.read()).status == SERVING
        assert await http_status(http, gateway.url + "/readyz") == 200
        _, metrics_before = await scrape(http, gateway.url)

        await asyncio.to_thread(private_redis.stop)
        async with asyncio.timeout(PATIENCE_SECONDS):
            assert (await watch.read()).status == NOT_SERVING
        assert await overall() == NOT_SERVING
        assert await http_status(http, gateway.url + "/readyz") == 503
        assert await http_status(http, gateway.url + "/healthz") == 200  # alive all the same
        # A deadline far away: the answer is UNAVAILABLE from the service, not a timeout.
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await gateway.stub.VerifyOtp(
                otp_pb2.VerifyOtpRequest(phone_number=PHONE, otp_code="123456"), timeout=60
            )
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        async with http.post(
            gateway.url + "/api/v1/auth/send-otp", json={"phone_number": PHONE}
        ) as response:
            assert response.status == 503
        _, metrics_after = await scrape(http, gateway.url)
        assert delta(metrics_before, metrics_after, "otp_redis_errors_total") >= 2

        await asyncio.to_thread(private_redis.start)
        async with asyncio.timeout(PATIENCE_SECONDS):
            assert (await watch.read()).status == SERVING
        assert await overall() == SERVING
        assert await http_status(http, gateway.url + "/readyz") == 200
        answer = await gateway.stub.VerifyOtp(
            otp_pb2.VerifyOtpRequest(phone_number=PHONE, otp_code="123456"), timeout=10
        )
        assert answer.outcome == otp_pb2.VERIFY_OUTCOME_NO_ACTIVE_CODE
        async with http.post(
            gateway.url + "/api/v1/auth/verify-otp",
            json={"phone_number": PHONE, "otp_code": "123456"},
        ) as response:
            assert (await response.json())["outcome"] == "VERIFY_OUTCOME_NO_ACTIVE_CODE"
    finally:
        watch.cancel()
        await channel.close()


# --- settings ----------------------------------------------------------------------------------

PRODUCTION = {
    "INTERAKT_API_KEY": API_KEY,
    "OTP_SECRET": SECRET.decode(),
    "OTP_CLIENT_TOKENS": f"{CALLER}:{TOKEN}",
}


def test_http_settings() -> None:
    default = Settings.from_env(PRODUCTION)
    assert default.http_address == "0.0.0.0:8080"
    assert default.shutdown_grace_seconds == 10
    assert Settings.from_env({**PRODUCTION, "OTP_HTTP_ADDRESS": ""}).http_address == ""
    custom = Settings.from_env(
        {**PRODUCTION, "OTP_HTTP_ADDRESS": "127.0.0.1:9000", "OTP_SHUTDOWN_GRACE_SECONDS": "2.5"}
    )
    assert (custom.http_address, custom.shutdown_grace_seconds) == ("127.0.0.1:9000", 2.5)
    with pytest.raises(ConfigError) as bad:
        Settings.from_env(
            {**PRODUCTION, "OTP_HTTP_ADDRESS": "8080", "OTP_SHUTDOWN_GRACE_SECONDS": "-1"}
        )
    assert bad.value.problems == [
        "OTP_HTTP_ADDRESS: expected host:port, got '8080'",
        "OTP_SHUTDOWN_GRACE_SECONDS: must be between 0 and 300 (got -1.0)",
    ]
    # The gateway holds no secrets, so it needs none.
    assert Settings.from_env({}, gateway_only=True).http_address == "0.0.0.0:8080"


# --- real processes ----------------------------------------------------------------------------


async def start_process(*args: str, env: dict[str, str]) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        OTP_SERVICE,
        *args,
        env={"PATH": os.environ.get("PATH", ""), **env},
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def stop_process(
    process: asyncio.subprocess.Process, *, terminate: bool = True
) -> tuple[int, str, str]:
    """SIGTERM it (a second one changes nothing), then the exit status and what it wrote."""
    if terminate:
        process.send_signal(signal.SIGTERM)
    async with asyncio.timeout(PATIENCE_SECONDS):
        out, err = await process.communicate()
    return process.returncode or 0, out.decode(), err.decode()


async def test_sigterm_drains_in_flight_rpcs_then_exits_0(
    redis_db: object,
    redis_server: EmbeddedRedis,
    interakt: FakeInterakt,
    http: aiohttp.ClientSession,
) -> None:
    grpc_port, http_port = free_port(), free_port()
    process = await start_process(
        "serve",
        env={
            "REDIS_URL": redis_server.url,
            "INTERAKT_API_KEY": API_KEY,
            "INTERAKT_BASE_URL": interakt.base_url,
            "OTP_SECRET": SECRET.decode(),
            "OTP_CLIENT_TOKENS": f"{CALLER}:{TOKEN}",
            "OTP_GRPC_ADDRESS": f"127.0.0.1:{grpc_port}",
            "OTP_HTTP_ADDRESS": f"127.0.0.1:{http_port}",
        },
    )
    base_url = f"http://127.0.0.1:{http_port}"
    signalled = False
    try:
        async with grpc.aio.insecure_channel(
            f"127.0.0.1:{grpc_port}", interceptors=[Bearer(TOKEN)]
        ) as channel:
            health: Any = health_pb2_grpc.HealthStub(channel)
            await health.Check(
                health_pb2.HealthCheckRequest(service=SERVICE_NAME),
                wait_for_ready=True,
                timeout=PATIENCE_SECONDS,
            )
            stub = otp_pb2_grpc.OtpServiceStub(channel)
            release = asyncio.Event()
            phones = [f"+9170038485{i}" for i in range(10, 15)]  # not PHONE: REST sends to it
            interakt.answer(
                *[
                    Answer(
                        body={"result": True, "message": "queued", "id": f"held-{i}"}, hold=release
                    )
                    for i in range(len(phones) + 1)
                ]
            )
            rpcs = [
                asyncio.ensure_future(
                    stub.SendOtp(otp_pb2.SendOtpRequest(phone_number=phone), timeout=30)
                )
                for phone in phones
            ]
            rest = asyncio.create_task(
                http.post(base_url + "/api/v1/auth/send-otp", json={"phone_number": PHONE})
            )

            async def all_in_flight() -> bool:
                return len(interakt.received) == len(phones) + 1

            await eventually(all_in_flight)
            process.send_signal(signal.SIGTERM)
            signalled = True

            async def not_ready() -> bool:
                return await http_status(http, base_url + "/readyz") == 503

            await eventually(not_ready)  # readiness is off while the calls are still held
            assert not any(rpc.done() for rpc in rpcs)
            release.set()
            answers = await asyncio.gather(*rpcs)
            async with await rest as response:
                assert response.status == 200
                rest_id = (await response.json())["message_id"]
        # Every call that was in flight got its answer from the provider.
        ids = {answer.message_id for answer in answers} | {rest_id}
        assert ids == {f"held-{i}" for i in range(len(phones) + 1)}
    finally:
        # Only one SIGTERM: a second one that lands after the event loop closed would kill it.
        status, out, err = await stop_process(process, terminate=not signalled)
    assert status == 0, err
    lines = [json.loads(line) for line in out.splitlines()]  # production logs: JSON only
    events = [line["event"] for line in lines]
    # The six calls finished during the drain, and all of them OK.
    shutting_down = events.index(next(e for e in events if e.startswith("shutting down")))
    assert [line["status"] for line in lines[shutting_down:] if line["event"] == "rpc"] == [
        "OK"
    ] * 6
    assert events[-1] == "stopped"


async def test_gateway_command_fronts_a_remote_server(
    make_gateway: MakeGateway, http: aiohttp.ClientSession, interakt: FakeInterakt
) -> None:
    backend = await make_gateway()
    http_port = free_port()
    # No secrets in its environment: the gateway needs none.
    process = await start_process(
        "gateway",
        f"--target=127.0.0.1:{backend.grpc_port}",
        env={"OTP_HTTP_ADDRESS": f"127.0.0.1:{http_port}"},
    )
    base_url = f"http://127.0.0.1:{http_port}"
    try:

        async def ready() -> bool:
            try:
                return await http_status(http, base_url + "/readyz") == 200
            except aiohttp.ClientConnectionError:
                return False

        await eventually(ready)
        async with http.post(
            base_url + "/api/v1/auth/send-otp",
            json={"phone_number": PHONE},
            headers={"X-Request-Id": "through-the-gateway"},
        ) as response:
            assert response.status == 200
            assert response.headers["X-Request-Id"] == "through-the-gateway"
        async with http.post(
            base_url + "/api/v1/auth/verify-otp",
            json={"phone_number": PHONE, "otp_code": interakt.received[0].code},
        ) as response:
            assert (await response.json())["verified"] is True
    finally:
        status, out, err = await stop_process(process)
    assert status == 0, err
    assert json.loads(out.splitlines()[-1])["event"] == "stopped"


async def test_gateway_without_an_address_is_a_config_error() -> None:
    process = await start_process("gateway", "--target=127.0.0.1:1", env={"OTP_HTTP_ADDRESS": ""})
    status, _, err = await stop_process(process, terminate=False)
    assert status == 2
    assert "OTP_HTTP_ADDRESS" in err
