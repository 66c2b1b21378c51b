"""The Python client (clients/python): typed results and errors, deadlines, TLS, the CLI."""

from __future__ import annotations

import asyncio
import datetime
import re
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis
from otp.v1 import otp_pb2
from otp_client import (
    DEFAULT_TIMEOUT,
    AsyncOtpClient,
    Channel,
    DeliveryRefused,
    DeliveryState,
    InvalidInput,
    NotAllowed,
    NotFound,
    OtpClient,
    OtpError,
    RateLimited,
    Tls,
    Unauthenticated,
    Unavailable,
    VerifyOutcome,
)
from prometheus_client import REGISTRY

from otp_service.connections.embedded_redis import free_port
from otp_service.errors import SendInProgress
from otp_service.servicer import Behavior, OtpServicer, abort, add_to_server, wrap_methods
from tests.conftest import PHONE, TOKEN, MakeServer, SilentRedis, wrong_code
from tests.fake_interakt import NOT_A_CONTACT, Answer, FakeInterakt, refusal
from tests.test_cli import CLEAN_ENV
from tests.test_tls import Authority

OTP_CLIENT = str(Path(sys.executable).with_name("otp-client"))
TEST_NUMBER, TEST_CODE = "+919999900001", "246810"

Connect = Callable[..., Awaitable[AsyncOtpClient]]


@pytest.fixture
async def connect(make_server: MakeServer) -> AsyncIterator[Connect]:
    """Start a server with settings ``overrides``; an AsyncOtpClient to it."""
    clients: list[AsyncOtpClient] = []

    async def open_client(
        token: str = TOKEN, client_timeout: float = 10.0, **overrides: object
    ) -> AsyncOtpClient:
        server = await make_server(**overrides)
        client = AsyncOtpClient(f"127.0.0.1:{server.port}", token, timeout=client_timeout)
        clients.append(client)
        return client

    yield open_client
    for client in clients:
        await client.close()


async def test_send_and_verify_give_typed_results(connect: Connect, interakt: FakeInterakt) -> None:
    client = await connect()
    sent = await client.send_otp(PHONE)
    assert sent.channel is Channel.TEXT
    assert sent.resend_after_seconds == 30
    assert sent.message_id == "msg-1"
    now = datetime.datetime.now(datetime.UTC)
    assert now < sent.expires_at <= now + datetime.timedelta(seconds=601)
    code = interakt.received[0].code
    wrong = await client.verify_otp(PHONE, wrong_code(code))
    assert (wrong.outcome, wrong.attempts_remaining, wrong.verified) == (
        VerifyOutcome.WRONG_CODE,
        4,
        False,
    )
    assert (await client.verify_otp(PHONE, code)).verified


async def test_each_refusal_is_its_own_exception_with_the_details(
    connect: Connect, interakt: FakeInterakt
) -> None:
    client = await connect(allowed_countries=frozenset({"91"}))
    with pytest.raises(InvalidInput) as invalid:
        await client.verify_otp(PHONE, "12a456")
    assert (invalid.value.field, invalid.value.problem) == (
        "otp_code",
        "must contain only the digits 0-9",
    )
    assert invalid.value.reason == "INVALID_CODE"

    with pytest.raises(NotAllowed) as country:
        await client.send_otp("+14155552671")
    assert country.value.reason == "COUNTRY_NOT_SERVED"
    assert country.value.metadata["country_code"] == "+1"

    await client.send_otp(PHONE)
    with pytest.raises(RateLimited) as limited:
        await client.send_otp(PHONE)
    assert limited.value.reason == "RESEND_COOLDOWN"
    assert 1 <= limited.value.retry_after <= 30
    assert limited.value.message == "phone_number: a code was sent moments ago"

    interakt.answer(refusal(NOT_A_CONTACT))
    with pytest.raises(DeliveryRefused) as refused:
        await client.send_otp("+917003848502")
    assert refused.value.reason == "RECIPIENT_NOT_A_CONTACT"

    # Three failures open the circuit breaker: the client's retry is refused for longer than
    # its deadline, so it gives up with that reason.
    failing = await connect(breaker_failures=3)
    interakt.answer(*[Answer(503, None)] * 3)
    with pytest.raises(Unavailable) as unavailable:
        await failing.send_otp("+917003848503")
    assert unavailable.value.reason == "PROVIDER_CIRCUIT_OPEN"
    assert unavailable.value.retry_after is not None
    assert unavailable.value.retry_after > 10
    assert len(interakt.received) == 5  # two above, three here: the retry sent nothing

    stranger = await connect(token="not-a-known-token-0123")
    with pytest.raises(Unauthenticated) as unknown:
        await stranger.verify_otp(PHONE, "123456")
    assert unknown.value.reason == "CALLER_NOT_AUTHENTICATED"
    assert isinstance(unknown.value, OtpError)


async def test_every_call_has_a_deadline_the_call_may_override(
    connect: Connect, silent_redis: SilentRedis
) -> None:
    # A hung Redis: the server answers only after its own 1 s Redis timeout.
    client = await connect(
        client_timeout=0.3, redis_url=silent_redis.url, redis_timeout_seconds=1.0
    )
    with pytest.raises(Unavailable) as default:
        await client.verify_otp(PHONE, "123456")
    assert default.value.code.name == "DEADLINE_EXCEEDED"
    assert default.value.reason == ""
    with pytest.raises(Unavailable) as longer:
        await client.verify_otp(PHONE, "123456", timeout=10)
    assert longer.value.reason == "STORE_UNAVAILABLE"


async def test_a_failed_verify_is_not_retried(
    connect: Connect, silent_redis: SilentRedis, redis_db: redis.Redis
) -> None:
    client = await connect(redis_url=silent_redis.url, redis_timeout_seconds=0.2)
    # Counted as a call starts, so it is counted by the time the caller has its answer.
    started = {
        "grpc_type": "unary",
        "grpc_service": "otp.v1.OtpService",
        "grpc_method": "VerifyOtp",
    }
    before = REGISTRY.get_sample_value("grpc_server_started_total", started) or 0.0
    with pytest.raises(Unavailable) as failed:
        await client.verify_otp(PHONE, "123456")
    assert failed.value.reason == "STORE_UNAVAILABLE"
    assert REGISTRY.get_sample_value("grpc_server_started_total", started) == before + 1


async def test_the_blocking_client_speaks_tls_and_mutual_tls(
    make_server: MakeServer, tmp_path: Path
) -> None:
    ca = Authority("client test CA")
    server_pair, client_pair = (
        ca.issue("otp-service", server=True),
        ca.issue("billing", server=False),
    )
    for name, content in (("key", server_pair.key), ("crt", server_pair.cert), ("ca", ca.cert)):
        (tmp_path / name).write_bytes(content)
    files = {"tls_cert": str(tmp_path / "crt"), "tls_key": str(tmp_path / "key")}
    tls = await make_server(**files)
    mtls = await make_server(**files, tls_client_ca=str(tmp_path / "ca"))

    def verify(port: int, credentials: Tls) -> VerifyOutcome:
        with OtpClient(f"localhost:{port}", TOKEN, tls=credentials) as client:
            return client.verify_otp(PHONE, "123456").outcome

    trust = Tls(root_certificates=ca.cert)
    mutual = Tls(ca.cert, certificate_chain=client_pair.cert, private_key=client_pair.key)
    no_code = VerifyOutcome.NO_ACTIVE_CODE
    assert await asyncio.to_thread(verify, tls.port, trust) is no_code
    assert await asyncio.to_thread(verify, mtls.port, mutual) is no_code
    with pytest.raises(Unavailable):
        await asyncio.to_thread(verify, mtls.port, trust)


async def test_send_is_retried_on_unavailable_with_one_key_and_sent_once(
    connect: Connect, interakt: FakeInterakt
) -> None:
    client = await connect()
    started = {"grpc_type": "unary", "grpc_service": "otp.v1.OtpService", "grpc_method": "SendOtp"}
    before = REGISTRY.get_sample_value("grpc_server_started_total", started) or 0.0
    # Interakt fails the first try (the server's own retries too); the client tries again.
    interakt.answer(*[Answer(503, None)] * 3)
    sent = await client.send_otp(PHONE)
    assert REGISTRY.get_sample_value("grpc_server_started_total", started) == before + 2
    assert len(interakt.received) == 4
    assert sent.message_id == interakt.queued[0].id
    keys = {message.body.get("callbackData") for message in interakt.received}
    assert len(keys) == 2  # each try of the server is a send of its own
    # A repeat with the key of a send that answered gets that answer, and nothing is sent.
    again = await client.send_otp("+917003848502", idempotency_key="my-key")
    assert await client.send_otp("+917003848502", idempotency_key="my-key") == again
    assert len(interakt.received) == 5


async def test_status_gives_a_typed_result_and_not_found(
    connect: Connect, interakt: FakeInterakt
) -> None:
    client = await connect()
    with pytest.raises(NotFound) as missing:
        await client.get_otp_status(PHONE)
    assert missing.value.reason == "NO_CODE_SENT"
    sent = await client.send_otp(PHONE)
    status = await client.get_otp_status(PHONE)
    assert (status.state, status.channel, status.message_id) == (
        DeliveryState.QUEUED,
        Channel.TEXT,
        sent.message_id,
    )
    assert (status.verified, status.failure_reason, status.expires_at) == (
        False,
        "",
        sent.expires_at,
    )
    assert status.resend_after_seconds == 30  # the cooldown's 30 s, less a moment, rounded up
    assert (await client.verify_otp(PHONE, interakt.received[0].code)).verified
    assert (await client.get_otp_status(PHONE)).verified


def test_enums_follow_the_proto() -> None:
    channels = otp_pb2.Channel.items()
    assert {c.name: c.value for c in Channel} == {
        n.removeprefix("CHANNEL_"): v for n, v in channels
    }
    states = otp_pb2.DeliveryState.items()
    assert {s.name: s.value for s in DeliveryState} == {
        n.removeprefix("DELIVERY_STATE_"): v for n, v in states
    }
    outcomes = otp_pb2.VerifyOutcome.items()
    assert {o.name: o.value for o in VerifyOutcome} == {
        n.removeprefix("VERIFY_OUTCOME_"): v for n, v in outcomes
    }


def test_a_token_is_required() -> None:
    with pytest.raises(ValueError, match="token"):
        OtpClient("localhost:1", "")


def otp_client(*args: str, target: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**CLEAN_ENV, "OTP_TOKEN": TOKEN}
    if target is not None:
        env["OTP_TARGET"] = target
    return subprocess.run([OTP_CLIENT, *args], env=env, capture_output=True, text=True, timeout=60)


async def test_the_cli_exits_0_only_for_a_sent_or_verified_code(make_server: MakeServer) -> None:
    server = await make_server(test_numbers=((TEST_NUMBER, TEST_CODE),))
    target = f"127.0.0.1:{server.port}"

    async def run(*args: str, target: str | None = target) -> tuple[int, str, str]:
        done = await asyncio.to_thread(otp_client, *args, target=target)
        assert "Traceback" not in done.stderr
        return done.returncode, done.stdout.strip(), done.stderr.strip()

    code, out, _ = await run("send", TEST_NUMBER)
    assert code == 0
    assert out.startswith("sent (test): valid until ")
    assert out.endswith("resend allowed in 30 s")
    assert await run("verify", TEST_NUMBER, "111111") == (
        1,
        "not verified: wrong code: 4 attempts left",
        "",
    )
    assert await run("verify", TEST_NUMBER, TEST_CODE) == (0, "verified", "")
    code, out, _ = await run("status", TEST_NUMBER)
    assert code == 0
    assert re.fullmatch(r"queued via test; verified; valid until \S+; resend allowed in \d+ s", out)
    code, out, err = await run("status", PHONE)
    assert (code, out) == (1, "")
    assert err.startswith("otp-client: NO_CODE_SENT: phone_number: no code of this number")
    code, out, err = await run("send", TEST_NUMBER)
    assert (code, out) == (1, "")
    assert re.fullmatch(
        r"otp-client: RESEND_COOLDOWN: phone_number: a code was sent moments ago "
        r"\(retry in \d+ s\)",
        err,
    )
    assert await run("verify", TEST_NUMBER, "12") == (
        1,
        "",
        "otp-client: INVALID_CODE: otp_code: must be exactly 6 digits",
    )
    code, _, err = await run("--timeout", "2", "send", PHONE, target=f"127.0.0.1:{free_port()}")
    assert code == 1
    assert err.startswith("otp-client: UNAVAILABLE: ")
    assert len(err.splitlines()) == 1
    code, _, err = await run("send", TEST_NUMBER, target=None)
    assert code == 2
    assert err.endswith("otp-client: error: --target or $OTP_TARGET is required")


async def test_a_send_in_doubt_is_retried_with_its_key_and_sent_once(
    connect: Connect, interakt: FakeInterakt
) -> None:
    """Interakt answers after the send's budget: the client's retries with the same key are
    answered DELIVERY_IN_DOUBT again, and no second message goes out."""
    client = await connect(interakt_timeout_seconds=0.5, resend_cooldown_seconds=0)
    started = {"grpc_type": "unary", "grpc_service": "otp.v1.OtpService", "grpc_method": "SendOtp"}
    before = REGISTRY.get_sample_value("grpc_server_started_total", started) or 0.0
    interakt.answer(Answer(body={"result": True, "id": "late"}, delay=1.0))
    with pytest.raises(Unavailable) as in_doubt:
        await client.send_otp(PHONE)
    assert in_doubt.value.reason == "DELIVERY_IN_DOUBT"
    # Retried (the delay was 1 s), with the key: the service sent nothing more.
    assert REGISTRY.get_sample_value("grpc_server_started_total", started) == before + 3
    assert len(interakt.received) == 1


@dataclass
class Seen:
    """A call as the server saw it: the method, the send's key, the seconds its deadline left."""

    rpc: str
    idempotency_key: str
    time_remaining: float


Watch = Callable[..., Awaitable[tuple[str, list[Seen]]]]


@pytest.fixture
async def watched(make_server: MakeServer) -> AsyncIterator[Watch]:
    """A real server whose calls are recorded; the first ``refuse`` SendOtp calls are answered
    SEND_IN_PROGRESS (the send with the key still running), as a retried send may be."""
    servers: list[grpc.aio.Server] = []

    async def start(refuse: int = 0) -> tuple[str, list[Seen]]:
        seen: list[Seen] = []

        def record(rpc: str, behavior: Behavior) -> Behavior:
            async def recorded(request: Any, ctx: grpc.aio.ServicerContext[Any, Any]) -> Any:
                key = getattr(request, "idempotency_key", "")
                seen.append(Seen(rpc, key, ctx.time_remaining() or 0.0))
                if rpc == "SendOtp" and len(seen) <= refuse:
                    await abort(ctx, SendInProgress("a send with this key is running", 0.1))
                return await behavior(request, ctx)

            return recorded

        server = grpc.aio.server()
        service = (await make_server()).service
        add_to_server(wrap_methods(OtpServicer(service), [record]), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        servers.append(server)
        return f"127.0.0.1:{port}", seen

    yield start
    for server in servers:
        await server.stop(None)


async def test_every_try_of_a_send_carries_its_one_key(
    watched: Watch, interakt: FakeInterakt
) -> None:
    """A retry after SEND_IN_PROGRESS asks for the first send's answer: with another key it
    would send a second code."""
    target, seen = await watched(refuse=1)
    async with AsyncOtpClient(target, TOKEN) as client:
        await client.send_otp(PHONE)
    with OtpClient(target, TOKEN) as blocking:
        await asyncio.to_thread(blocking.send_otp, "+917003848502")
    assert [call.rpc for call in seen] == ["SendOtp"] * 3
    assert seen[0].idempotency_key == seen[1].idempotency_key != ""
    assert seen[2].idempotency_key not in ("", seen[0].idempotency_key)
    assert len(interakt.received) == 2


async def test_the_blocking_client_gives_every_call_its_deadline(
    watched: Watch, interakt: FakeInterakt
) -> None:
    target, seen = await watched()

    def calls() -> None:
        with OtpClient(target, TOKEN) as client:
            client.send_otp(PHONE)
            client.verify_otp(PHONE, "000000")
            client.get_otp_status(PHONE)
        with OtpClient(target, TOKEN, timeout=3) as client:
            client.verify_otp(PHONE, "000000")
            client.get_otp_status(PHONE, timeout=5)

    await asyncio.to_thread(calls)
    # As the server sees it: within a moment of what the client set.
    deadlines = [(call.rpc, round(call.time_remaining)) for call in seen]
    assert deadlines == [
        ("SendOtp", DEFAULT_TIMEOUT),
        ("VerifyOtp", DEFAULT_TIMEOUT),
        ("GetOtpStatus", DEFAULT_TIMEOUT),
        ("VerifyOtp", 3),
        ("GetOtpStatus", 5),
    ]
