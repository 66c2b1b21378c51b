"""Health that follows Redis, the HTTP side's settings, real processes stopped by SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import aiohttp
import grpc
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc
from otp.v1 import otp_pb2, otp_pb2_grpc

from otp_service import ConfigError, Settings
from otp_service.connections.embedded_redis import EmbeddedRedis, free_port
from otp_service.server import SERVICE_NAME
from tests.conftest import (
    CALLER,
    PATIENCE_SECONDS,
    PHONE,
    SECRET,
    TOKEN,
    WEBHOOK_SECRET,
    Bearer,
    Gateway,
    MakeGateway,
    delta,
    digest,
    eventually,
    scrape,
)
from tests.fake_interakt import API_KEY, Answer, FakeInterakt
from tests.test_error_details import error_info

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


@pytest.mark.parametrize(
    ("url", "cause"),
    [
        ("redis+cluster://:{password}@127.0.0.1:{port}", "not a Redis Cluster"),
        ("redis://:wrong-{password}@127.0.0.1:{port}/0", "authentication refused"),
        ("redis://:{password}@127.0.0.1:{free}/0", "connection refused"),
    ],
    ids=["cluster URL, one Redis", "wrong password", "refused port"],
)
async def test_a_redis_that_is_not_what_the_url_says_is_not_serving_and_says_why(
    url: str, cause: str, interakt: FakeInterakt, http: aiohttp.ClientSession
) -> None:
    """Every call fails fast with UNAVAILABLE, the probes say so, one line names the cause and
    where (not the password), and SIGTERM still stops it cleanly."""
    password = "redis-password-0123456789"
    with EmbeddedRedis(options=["--requirepass", password], password=password) as redis_server:
        env = {"REDIS_URL": url.format(password=password, port=redis_server.port, free=free_port())}
        async with served(redis_server, interakt, **env) as server:
            check = health_pb2.HealthCheckRequest(service=SERVICE_NAME)

            async def not_serving() -> bool:
                return (await server.health.Check(check)).status == NOT_SERVING

            await eventually(not_serving)
            assert await http_status(http, server.base_url + "/readyz") == 503
            for call in (
                server.stub.SendOtp(otp_pb2.SendOtpRequest(phone_number=PHONE), timeout=10),
                server.stub.VerifyOtp(
                    otp_pb2.VerifyOtpRequest(phone_number=PHONE, otp_code="123456"), timeout=10
                ),
            ):
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await call
                assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
                # Nothing reached Redis: a verify does not say it may have counted.
                assert refused.value.details() == "storage is unavailable, try again shortly"
        status, out, err = await server.exited()
    assert status == 0, err
    assert "Traceback" not in out + err
    assert password not in out + err
    lines = [json.loads(line) for line in out.splitlines()]
    [down] = [line for line in lines if line["event"] == "redis_down"]
    assert down["level"] == "ERROR"
    assert cause in down["message"]
    assert "127.0.0.1:" in down["message"]
    events = {line["event"] for line in lines}
    assert "send_withdraw_failed" not in events
    assert "redis_command_failed" in events  # the calls' own failures say why too
    assert not [line for line in lines if line["level"] == "ERROR" and line is not down]


# --- settings ----------------------------------------------------------------------------------

PRODUCTION = {
    "INTERAKT_API_KEY": API_KEY,
    "INTERAKT_CHANNEL": "text",
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


# What each started process writes: into files, not pipes, which a busy server would fill up
# (and then block on) while the test is not reading them.
_OUTPUT: dict[int, tuple[IO[bytes], IO[bytes]]] = {}


async def start_process(*args: str, env: dict[str, str]) -> asyncio.subprocess.Process:
    out, err = tempfile.TemporaryFile(), tempfile.TemporaryFile()  # noqa: SIM115 - closed on stop
    process = await asyncio.create_subprocess_exec(
        OTP_SERVICE,
        *args,
        env={"PATH": os.environ.get("PATH", ""), **env},
        stdin=asyncio.subprocess.DEVNULL,
        stdout=out,
        stderr=err,
    )
    _OUTPUT[process.pid] = (out, err)
    return process


async def stop_process(
    process: asyncio.subprocess.Process, *, terminate: bool = True
) -> tuple[int, str, str]:
    """SIGTERM it (a second one changes nothing), then the exit status and what it wrote."""
    if terminate:
        process.send_signal(signal.SIGTERM)
    async with asyncio.timeout(PATIENCE_SECONDS):
        await process.wait()
    written = []
    for file in _OUTPUT.pop(process.pid):
        file.seek(0)
        written.append(file.read().decode())
        file.close()
    return process.returncode or 0, *written


@dataclass
class Served:
    """``otp-service serve`` in production mode against the test Redis and the fake Interakt,
    and a gRPC channel to it that sends the test caller's token."""

    process: asyncio.subprocess.Process
    base_url: str  # its HTTP side
    stub: otp_pb2_grpc.OtpServiceStub
    health: Any
    signalled: bool = False
    _exit: tuple[int, str, str] | None = None

    def sigterm(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        self.signalled = True

    async def exited(self) -> tuple[int, str, str]:
        """Its exit status, stdout and stderr once it ends; a SIGTERM first if none was sent.

        Only one SIGTERM: a second one landing after the event loop closed would kill it.
        """
        if self._exit is None:
            self._exit = await stop_process(self.process, terminate=not self.signalled)
        return self._exit


@contextlib.asynccontextmanager
async def served(
    redis_server: EmbeddedRedis, interakt: FakeInterakt, **settings: str
) -> AsyncIterator[Served]:
    """The server, started with ``settings`` (environment variables) and serving."""
    grpc_port, http_port = free_port(), free_port()
    env = {
        "REDIS_URL": redis_server.url,
        "INTERAKT_API_KEY": API_KEY,
        "INTERAKT_CHANNEL": "text",
        "INTERAKT_BASE_URL": interakt.base_url,
        "OTP_SECRET": SECRET.decode(),
        "OTP_CLIENT_TOKENS": f"{CALLER}:{TOKEN}",
        "OTP_GRPC_ADDRESS": f"127.0.0.1:{grpc_port}",
        "OTP_HTTP_ADDRESS": f"127.0.0.1:{http_port}",
        **settings,
    }
    process = await start_process("serve", env=env)
    server: Served | None = None
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
            server = Served(process, f"http://127.0.0.1:{http_port}", stub, health)
            yield server
    finally:
        if server is not None:
            await server.exited()
        else:
            await stop_process(process)


async def test_sigterm_drains_in_flight_rpcs_then_exits_0(
    redis_db: object,
    redis_server: EmbeddedRedis,
    interakt: FakeInterakt,
    http: aiohttp.ClientSession,
) -> None:
    async with served(redis_server, interakt) as server:
        release = asyncio.Event()
        phones = [f"+9170038485{i}" for i in range(10, 15)]  # not PHONE: REST sends to it
        interakt.answer(
            *[
                Answer(body={"result": True, "message": "queued", "id": f"held-{i}"}, hold=release)
                for i in range(len(phones) + 1)
            ]
        )
        rpcs = [
            asyncio.ensure_future(
                server.stub.SendOtp(otp_pb2.SendOtpRequest(phone_number=phone), timeout=30)
            )
            for phone in phones
        ]
        rest = asyncio.create_task(
            http.post(server.base_url + "/api/v1/auth/send-otp", json={"phone_number": PHONE})
        )

        async def all_in_flight() -> bool:
            return len(interakt.received) == len(phones) + 1

        await eventually(all_in_flight)
        server.sigterm()

        async def new_calls_refused() -> bool:
            # No shutdown delay: the drain begins at once, so the ports take no new work.
            try:
                await server.stub.VerifyOtp(otp_pb2.VerifyOtpRequest(phone_number=PHONE), timeout=5)
            except grpc.aio.AioRpcError as exc:
                return exc.code() == grpc.StatusCode.UNAVAILABLE
            return False

        await eventually(new_calls_refused)  # while the calls in flight are still held
        with pytest.raises(aiohttp.ClientConnectionError):
            await http_status(http, server.base_url + "/readyz")
        assert not any(rpc.done() for rpc in rpcs)
        release.set()
        answers = await asyncio.gather(*rpcs)
        async with await rest as response:
            assert response.status == 200
            rest_id = (await response.json())["message_id"]
    # Every call that was in flight got its answer from the provider.
    ids = {answer.message_id for answer in answers} | {rest_id}
    assert ids == {f"held-{i}" for i in range(len(phones) + 1)}
    status, out, err = await server.exited()
    assert status == 0, err
    lines = [json.loads(line) for line in out.splitlines()]  # production logs: JSON only
    events = [line["event"] for line in lines]
    # The six sends finished during the drain, and all of them OK.
    shutting_down = events.index("shutting_down")
    sends = [line for line in lines[shutting_down:] if line.get("rpc") == "SendOtp"]
    assert [line["status"] for line in sends] == ["OK"] * 6
    assert events[-1] == "stopped"


async def test_shutdown_delay_keeps_both_ports_serving_while_unready(
    redis_db: object,
    redis_server: EmbeddedRedis,
    interakt: FakeInterakt,
    http: aiohttp.ClientSession,
) -> None:
    request = otp_pb2.VerifyOtpRequest(phone_number=PHONE, otp_code="123456")
    # Each call's status, and whether readiness had already been seen off when it was made.
    answers: list[tuple[str, bool]] = []
    unready_seen = False
    async with served(redis_server, interakt, OTP_SHUTDOWN_DELAY_SECONDS="3") as server:

        async def keep_calling() -> None:
            """A client that calls without pause until the port is gone."""
            while True:
                seen = unready_seen
                try:
                    await server.stub.VerifyOtp(request, timeout=PATIENCE_SECONDS)
                except grpc.aio.AioRpcError as exc:
                    answers.append((exc.code().name, seen))
                    if exc.code() == grpc.StatusCode.UNAVAILABLE:
                        return
                else:
                    answers.append(("OK", seen))

        caller = asyncio.create_task(keep_calling())

        async def calling() -> bool:
            return len(answers) >= 3

        await eventually(calling)
        server.sigterm()

        async def not_ready() -> bool:
            return await http_status(http, server.base_url + "/readyz") == 503

        await eventually(not_ready)
        health = await server.health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME))
        assert health.status == NOT_SERVING
        unready_seen = True

        async def served_while_unready() -> bool:
            return sum(1 for answer in answers if answer == ("OK", True)) >= 3

        await eventually(served_while_unready)
        # The JSON routes answer too: not connection refused.
        async with http.post(
            server.base_url + "/api/v1/auth/verify-otp",
            json={"phone_number": PHONE, "otp_code": "123456"},
        ) as response:
            assert (await response.json())["outcome"] == "VERIFY_OUTCOME_NO_ACTIVE_CODE"
        # Then the drain: the port closes, and the client's calls fail over to UNAVAILABLE.
        async with asyncio.timeout(PATIENCE_SECONDS):
            await caller
    status, out, err = await server.exited()
    assert status == 0, err
    # Every call succeeded until the port closed; then they failed (one that raced the close
    # may have been cancelled), and the client saw the port gone.
    codes = [code for code, _ in answers]
    closed = codes.index(next(code for code in codes if code != "OK"))
    assert set(codes[closed:]) <= {"CANCELLED", "UNAVAILABLE"}
    assert codes[-1] == "UNAVAILABLE"
    lines = [json.loads(line) for line in out.splitlines()]
    events = [line["event"] for line in lines]
    shutting_down, draining = events.index("shutting_down"), events.index("draining")
    assert shutting_down < draining < events.index("stopped")
    # Between the signal and the drain, calls were served (the delay), all of them OK.
    answered = [line["status"] for line in lines[shutting_down:draining] if line["event"] == "rpc"]
    assert len(answered) >= 3
    assert set(answered) == {"OK"}


async def test_a_call_longer_than_the_grace_is_cut_at_the_grace(
    redis_db: object,
    redis_server: EmbeddedRedis,
    interakt: FakeInterakt,
    http: aiohttp.ClientSession,
) -> None:
    never = asyncio.Event()  # Interakt holds both sends until the end of the test
    interakt.answer(*[Answer(body={"result": True, "id": "late"}, hold=never)] * 2)
    # Interakt's budget far beyond the grace: only the grace can end these calls.
    settings = {"OTP_SHUTDOWN_GRACE_SECONDS": "1", "INTERAKT_TIMEOUT_SECONDS": "60"}
    try:
        async with served(redis_server, interakt, **settings) as server:
            rpc = asyncio.ensure_future(
                server.stub.SendOtp(
                    otp_pb2.SendOtpRequest(phone_number="+917003848510"), timeout=60
                )
            )
            rest = asyncio.create_task(
                http.post(server.base_url + "/api/v1/auth/send-otp", json={"phone_number": PHONE})
            )

            async def both_held() -> bool:
                return len(interakt.received) == 2

            await eventually(both_held)
            server.sigterm()
            # Both callers are told, within the grace, that the server is stopping.
            with pytest.raises(grpc.aio.AioRpcError) as cut:
                await rpc
            assert cut.value.code() == grpc.StatusCode.UNAVAILABLE
            assert error_info(cut.value).reason == "SERVER_SHUTTING_DOWN"
            async with await rest as response:
                assert response.status == 503
                reply = await response.json()
            assert reply["code"] == grpc.StatusCode.UNAVAILABLE.value[0]
            assert reply["details"][0]["reason"] == "SERVER_SHUTTING_DOWN"
            # The process ends on its own though Interakt still holds both calls.
            status, out, err = await server.exited()
            assert not never.is_set()
    finally:
        never.set()
    assert status == 0, err
    rpcs = [json.loads(line) for line in out.splitlines() if '"event": "rpc"' in line]
    assert sorted((line["transport"], line["status"]) for line in rpcs) == [
        ("grpc", "UNAVAILABLE"),
        ("http", "UNAVAILABLE"),
    ]


async def test_sigterm_mid_send_keeps_the_code_of_a_message_interakt_holds(
    redis_db: redis.Redis, redis_server: EmbeddedRedis, interakt: FakeInterakt
) -> None:
    """Cut at the grace while Interakt holds its message, the send is in doubt: the message may
    still arrive, so its code stays."""
    never = asyncio.Event()
    interakt.answer(Answer(body={"result": True, "id": "late"}, hold=never))
    settings = {"OTP_SHUTDOWN_GRACE_SECONDS": "1", "INTERAKT_TIMEOUT_SECONDS": "60"}
    phone = "+917003848511"
    try:
        async with served(redis_server, interakt, **settings) as server:
            rpc = asyncio.ensure_future(
                server.stub.SendOtp(otp_pb2.SendOtpRequest(phone_number=phone), timeout=60)
            )

            async def held() -> bool:
                return len(interakt.received) == 1

            await eventually(held)
            server.sigterm()
            status, _, err = await server.exited()
            with pytest.raises(grpc.aio.AioRpcError):
                await rpc
    finally:
        never.set()
    assert status == 0, err
    code = interakt.received[0].code
    assert redis_db.hexists(f"otp:{{{phone}}}:c", digest(phone, code)[:32])
    # Recorded as in doubt before the process ended: Interakt's report will find it.
    assert redis_db.hget(f"otp:{{{phone}}}:d", "ch") is not None


async def test_probes_stay_open_when_metrics_need_a_token(
    redis_db: object,
    redis_server: EmbeddedRedis,
    interakt: FakeInterakt,
) -> None:
    async with served(redis_server, interakt, OTP_METRICS_AUTH="true") as server:
        async with aiohttp.ClientSession() as anonymous:
            # A kubelet has no token: both probes answer it.
            assert await http_status(anonymous, server.base_url + "/healthz") == 200
            assert await http_status(anonymous, server.base_url + "/readyz") == 200
            for path in ("/metrics", "/openapi.json"):
                assert await http_status(anonymous, server.base_url + path) == 401
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKEN}"}) as ops:
            _, samples = await scrape(ops, server.base_url)
    status, _, err = await server.exited()
    assert status == 0, err
    [build] = [labels for (name, labels) in samples if name == "otp_service_build_info"]
    assert dict(build) == {
        "version": "1.0.0",
        "commit": git_commit(),
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
    }


async def test_the_webhook_is_off_without_a_secret_and_a_line_says_so(
    redis_db: object,
    redis_server: EmbeddedRedis,
    interakt: FakeInterakt,
) -> None:
    """And Text chosen instead of a template (INTERAKT_CHANNEL=text) is a WARNING too."""
    template = {"INTERAKT_CHANNEL": "template", "INTERAKT_TEMPLATE_NAME": "Auth"}
    async with (
        served(redis_server, interakt) as off,
        served(redis_server, interakt, INTERAKT_WEBHOOK_SECRET=WEBHOOK_SECRET, **template) as on,
        aiohttp.ClientSession() as interakt_side,  # no caller token: Interakt has none
    ):
        webhook = "/webhooks/interakt"
        async with interakt_side.post(off.base_url + webhook, data=b"{}") as answer:
            assert answer.status == 404
        async with interakt_side.post(on.base_url + webhook, data=b"{}") as answer:
            assert answer.status == 401  # on, and the body is not signed
    logged = []
    for server in (off, on):
        status, out, err = await server.exited()
        assert status == 0, err
        logged.append([json.loads(line) for line in out.splitlines()])
    [said] = [line for line in logged[0] if line["event"] == "webhook_off"]
    assert said["level"] == "WARNING"
    assert said["message"].startswith("POST /webhooks/interakt is off (no INTERAKT_WEBHOOK_SECRET)")
    assert not [line for line in logged[1] if line["event"] == "webhook_off"]
    assert WEBHOOK_SECRET not in json.dumps(logged[1])
    [text] = [line for line in logged[0] if line["event"] == "text_channel"]
    assert text["level"] == "WARNING"
    assert "wrote to the business in the last 24 hours" in text["message"]
    assert not [line for line in logged[1] if line["event"] == "text_channel"]


def git_commit() -> str:
    """The commit the build-info series should name: this checkout's, if git can tell."""
    try:
        done = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return done.stdout.strip()


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
        _, samples = await scrape(http, base_url)
    finally:
        status, out, err = await stop_process(process)
    assert status == 0, err
    assert json.loads(out.splitlines()[-1])["event"] == "stopped"
    # Its own series (the HTTP side's, the build's), none of the service's that it does not run.
    families = {name for name, _ in samples}
    assert (
        samples[
            (
                "http_server_requests_total",
                frozenset({("route", "/api/v1/auth/send-otp"), ("code", "200")}),
            )
        ]
        == 1
    )
    assert "otp_service_build_info" in families
    assert "process_cpu_seconds_total" in families
    assert not {name for name in families if name.startswith(("grpc_server_", "otp_"))} - {
        "otp_service_build_info"
    }


async def ready_gateway_process(
    backend: Gateway, http: aiohttp.ClientSession, **env: str
) -> tuple[asyncio.subprocess.Process, str]:
    """``otp-service gateway`` for ``backend``'s gRPC port, with ``env``, once /readyz is 200;
    the process and its base URL."""
    http_port = free_port()
    process = await start_process(
        "gateway",
        f"--target=127.0.0.1:{backend.grpc_port}",
        env={"OTP_HTTP_ADDRESS": f"127.0.0.1:{http_port}", **env},
    )
    base_url = f"http://127.0.0.1:{http_port}"

    async def ready() -> bool:
        try:
            return await http_status(http, base_url + "/readyz") == 200
        except aiohttp.ClientConnectionError:
            return False

    try:
        await eventually(ready)
    except BaseException:
        await stop_process(process)
        raise
    return process, base_url


async def test_gateway_command_is_unready_but_serving_during_the_shutdown_delay(
    make_gateway: MakeGateway, http: aiohttp.ClientSession
) -> None:
    backend = await make_gateway()
    process, base_url = await ready_gateway_process(backend, http, OTP_SHUTDOWN_DELAY_SECONDS="3")
    try:
        process.send_signal(signal.SIGTERM)

        async def not_ready() -> bool:
            return await http_status(http, base_url + "/readyz") == 503

        await eventually(not_ready)
        # Still serving: the load balancer may route a call here until it sees the 503.
        assert await http_status(http, base_url + "/healthz") == 200
        async with http.post(
            base_url + "/api/v1/auth/verify-otp", json={"phone_number": PHONE, "otp_code": "1"}
        ) as response:
            assert response.status == 400
    finally:
        status, _, err = await stop_process(process, terminate=False)
    assert status == 0, err


async def test_gateway_command_answers_a_call_longer_than_the_grace(
    make_gateway: MakeGateway, http: aiohttp.ClientSession, interakt: FakeInterakt
) -> None:
    """The remote server is still sending when the gateway's grace ends: its caller is told
    UNAVAILABLE (SERVER_SHUTTING_DOWN), as the server itself would tell it, not dropped."""
    backend = await make_gateway()
    never = asyncio.Event()
    interakt.answer(Answer(body={"result": True, "id": "late"}, hold=never))
    process, base_url = await ready_gateway_process(backend, http, OTP_SHUTDOWN_GRACE_SECONDS="1")
    try:
        rest = asyncio.create_task(
            http.post(base_url + "/api/v1/auth/send-otp", json={"phone_number": PHONE})
        )

        async def held() -> bool:
            return len(interakt.received) == 1

        await eventually(held)
        process.send_signal(signal.SIGTERM)
        async with await rest as response:
            assert response.status == 503
            reply = await response.json()
        assert reply["details"][0]["reason"] == "SERVER_SHUTTING_DOWN"
    finally:
        never.set()
        status, _, err = await stop_process(process, terminate=False)
    assert status == 0, err


async def test_gateway_without_an_address_is_a_config_error() -> None:
    process = await start_process("gateway", "--target=127.0.0.1:1", env={"OTP_HTTP_ADDRESS": ""})
    status, _, err = await stop_process(process, terminate=False)
    assert status == 2
    assert "OTP_HTTP_ADDRESS" in err
