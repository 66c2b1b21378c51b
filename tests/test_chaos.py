"""The fault suite: faults in Redis, in the network to it, in Interakt and in the service itself,
each with an assertion about what was lost. The long ones run in `make chaos` (marker `chaos`).

What every fault must leave, once it is over:
- every call ended with a right answer or UNAVAILABLE, before its deadline (never a hang);
- a send answered OK left a code that verifies once; a send that failed before reaching
  Interakt left nothing, not even a count against the limits or a delivery record saying its
  message is queued (the withdrawal of tests/test_redis_faults.py, at scale); one Interakt
  answered left no code but stays counted; one in doubt (DELIVERY_IN_DOUBT) left its code;
- a verify that was answered used the code or counted the attempt exactly as it said; one that
  was UNAVAILABLE may have run, so its code is either used or still usable, nothing else;
- the service holds no connection it gave up on.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import redis
from aiohttp import web
from grpc_health.v1 import health_pb2, health_pb2_grpc
from otp.v1 import otp_pb2, otp_pb2_grpc

from otp_service.connections.embedded_redis import EmbeddedRedis, free_port
from otp_service.server import SERVICE_NAME
from otp_service.store import redis_store as store
from tests.conftest import (
    CALLER,
    PATIENCE_SECONDS,
    SECRET,
    TOKEN,
    Bearer,
    MakeService,
    code_sent_to,
    eventually,
    status_of,
    verify,
    wrong_code,
)
from tests.fake_interakt import (
    API_KEY,
    NOT_A_CONTACT,
    RATE_LIMITED,
    Answer,
    FakeInterakt,
    accepted,
)
from tests.redis_proxy import RedisProxy
from tests.test_delivery_redis_faults import paused
from tests.test_error_details import error_info
from tests.test_withdrawals import GIVEN_UP as WITHDRAWALS_GIVEN_UP
from tests.test_withdrawals import WAITING as WITHDRAWALS_WAITING
from tests.test_withdrawals import sample

OK, UNAVAILABLE = grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE
CALLER_SENDS = f"otp:{{senders}}:caller-sends:{CALLER}"
ACCOUNT_SENDS = "otp:{senders}:account-sends"
# Redis answers within this, or the call is UNAVAILABLE; callers allow far longer.
REDIS_TIMEOUT = 0.3
CALLER_DEADLINE = 10.0
# Each fault test runs for tens of seconds under load: a hang fails after this (pyproject's
# default timeout is for the normal suite).
CHAOS_TIMEOUT_SECONDS = 300


def numbers(start: int, count: int) -> list[str]:
    return [f"+91700{n:07d}" for n in range(start, start + count)]


@dataclass
class Cycle:
    """One number's send and the verify of its code, as the caller saw them."""

    phone: str
    send: grpc.StatusCode
    code: str = ""
    verify: grpc.StatusCode | None = None
    verified: bool = False


async def run_cycle(stub: otp_pb2_grpc.OtpServiceStub, interakt: FakeInterakt, phone: str) -> Cycle:
    request = otp_pb2.SendOtpRequest(phone_number=phone)
    cycle = Cycle(phone, await status_of(stub.SendOtp(request, timeout=CALLER_DEADLINE)))
    if cycle.send != OK:
        return cycle
    cycle.code = code_sent_to(interakt, phone)
    check = otp_pb2.VerifyOtpRequest(phone_number=phone, otp_code=cycle.code)
    try:
        cycle.verified = (await stub.VerifyOtp(check, timeout=CALLER_DEADLINE)).verified
        cycle.verify = OK
    except grpc.aio.AioRpcError as error:
        cycle.verify = error.code()
    return cycle


async def storm(
    stub: otp_pb2_grpc.OtpServiceStub, interakt: FakeInterakt, phones: list[str]
) -> list[Cycle]:
    return list(await asyncio.gather(*(run_cycle(stub, interakt, p) for p in phones)))


def left_by_send(db: redis.Redis, phone: str) -> list[str]:
    """What the one send to ``phone`` left: its code, its count against the number's limits,
    its delivery record (a status saying QUEUED), the record it replaced."""
    keys = [f"otp:{{{phone}}}:{kind}" for kind in ("c", "s", "d", "d:prev")]
    return [key for key in keys if db.exists(key)]


async def assert_nothing_lost(
    cycles: list[Cycle], stub: otp_pb2_grpc.OtpServiceStub, db: redis.Redis
) -> None:
    """What every fault must leave, once Redis answers again (see the module docstring)."""
    for cycle in cycles:
        assert cycle.send in (OK, UNAVAILABLE), cycle
        assert cycle.verify in (None, OK, UNAVAILABLE), cycle
        assert cycle.verify != OK or cycle.verified, f"the right code did not verify: {cycle}"
    sent = [c for c in cycles if c.send == OK]
    failed = [c for c in cycles if c.send != OK]

    async def failed_sends_withdrawn() -> bool:
        counted = db.zcard(CALLER_SENDS) == db.zcard(ACCOUNT_SENDS) == len(sent)
        return counted and not any(left_by_send(db, c.phone) for c in failed)

    await eventually(failed_sends_withdrawn)
    for cycle in sent:
        again = await verify(stub, cycle.code, cycle.phone)
        if cycle.verify == OK:
            assert again.outcome == otp_pb2.VERIFY_OUTCOME_NO_ACTIVE_CODE, cycle
        else:  # the verify may have run: the code is used, or still good; never anything else
            assert again.outcome in (
                otp_pb2.VERIFY_OUTCOME_VERIFIED,
                otp_pb2.VERIFY_OUTCOME_NO_ACTIVE_CODE,
            ), cycle


def serves_again(
    stub: otp_pb2_grpc.OtpServiceStub, interakt: FakeInterakt, cycles: list[Cycle], start: int
) -> Callable[[], Awaitable[bool]]:
    """Whether a send and a verify on new numbers from ``start`` succeed now; each try joins
    ``cycles``, for the audit."""
    fresh = iter(numbers(start, 1_000))

    async def check() -> bool:
        cycles.append(await run_cycle(stub, interakt, next(fresh)))
        return cycles[-1].verified

    return check


def only_one_connection(proxy: RedisProxy) -> Callable[[], Awaitable[bool]]:
    """Whether the service holds at most its one connection through ``proxy``: it closed the
    ones it gave up on."""

    async def check() -> bool:
        return proxy.open <= 1

    return check


@pytest.fixture
async def proxy(private_redis: EmbeddedRedis) -> AsyncIterator[RedisProxy]:
    in_front = await RedisProxy(private_redis.port).start()
    yield in_front
    await in_front.close()


@pytest.fixture
def db(private_redis: EmbeddedRedis) -> Iterator[redis.Redis]:
    with redis.Redis(port=private_redis.port) as client:
        yield client


@pytest.fixture
async def behind_proxy(make_service: MakeService, proxy: RedisProxy) -> otp_pb2_grpc.OtpServiceStub:
    """The service, reaching its Redis through the proxy, with budgets that do not get in the
    way of a storm of sends."""
    return await make_service(
        redis_url=proxy.url,
        redis_timeout_seconds=REDIS_TIMEOUT,
        caller_sends_per_minute=100_000,
        interakt_sends_per_minute=100_000,
    )


# --- the network to Redis ------------------------------------------------------------------


@pytest.mark.chaos
@pytest.mark.timeout(CHAOS_TIMEOUT_SECONDS)
async def test_latency_under_the_timeout_changes_no_answer(
    behind_proxy: otp_pb2_grpc.OtpServiceStub,
    proxy: RedisProxy,
    interakt: FakeInterakt,
    db: redis.Redis,
) -> None:
    warm = await storm(behind_proxy, interakt, numbers(3_000_000, 1))  # connected before
    proxy.delay = REDIS_TIMEOUT / 10  # each way; a send makes two round trips in one timeout
    cycles = warm + await storm(behind_proxy, interakt, numbers(3_000_100, 40))
    assert all(c.send == OK and c.verified for c in cycles), cycles
    await assert_nothing_lost(cycles, behind_proxy, db)


@pytest.mark.chaos
@pytest.mark.timeout(CHAOS_TIMEOUT_SECONDS)
async def test_latency_over_the_timeout_is_unavailable_and_leaves_nothing_half_done(
    behind_proxy: otp_pb2_grpc.OtpServiceStub,
    proxy: RedisProxy,
    interakt: FakeInterakt,
    db: redis.Redis,
) -> None:
    proxy.delay = REDIS_TIMEOUT * 2
    cycles = await storm(behind_proxy, interakt, numbers(3_100_000, 40))
    assert {c.send for c in cycles} == {UNAVAILABLE}
    proxy.delay = 0  # new connections are fast; bytes already on their way stay late
    await eventually(serves_again(behind_proxy, interakt, cycles, 3_100_100))
    # The late commands reached Redis, on connections the service dropped: they changed nothing.
    await assert_nothing_lost(cycles, behind_proxy, db)
    await eventually(only_one_connection(proxy))


@pytest.mark.chaos
@pytest.mark.timeout(CHAOS_TIMEOUT_SECONDS)
async def test_a_stalled_network_is_unavailable_then_late_commands_change_nothing(
    behind_proxy: otp_pb2_grpc.OtpServiceStub,
    proxy: RedisProxy,
    interakt: FakeInterakt,
    db: redis.Redis,
) -> None:
    warm = await storm(behind_proxy, interakt, numbers(3_200_000, 10))
    proxy.stall()
    cycles = await storm(behind_proxy, interakt, numbers(3_200_100, 40))
    assert {c.send for c in cycles} == {UNAVAILABLE}
    proxy.resume()  # everything held reaches Redis now, on connections the service dropped
    await eventually(serves_again(behind_proxy, interakt, cycles, 3_200_200))
    await assert_nothing_lost(warm + cycles, behind_proxy, db)
    await eventually(only_one_connection(proxy))


@pytest.mark.chaos
@pytest.mark.timeout(CHAOS_TIMEOUT_SECONDS)
async def test_connections_that_go_silent_are_dropped_and_replaced(
    behind_proxy: otp_pb2_grpc.OtpServiceStub,
    proxy: RedisProxy,
    interakt: FakeInterakt,
    db: redis.Redis,
) -> None:
    warm = await storm(behind_proxy, interakt, numbers(3_300_000, 10))
    proxy.drop()  # no byte gets through the open connection again, and nothing says so
    cycles = await storm(behind_proxy, interakt, numbers(3_300_100, 40))
    assert {c.send for c in cycles} == {UNAVAILABLE}
    # Calls made while the silence is being noticed (within a timeout) fail too; then a new
    # connection serves.
    await eventually(serves_again(behind_proxy, interakt, cycles, 3_300_200))
    after = await storm(behind_proxy, interakt, numbers(3_300_400, 20))
    assert all(c.send == OK and c.verified for c in after), after
    await assert_nothing_lost(warm + cycles + after, behind_proxy, db)
    await eventually(only_one_connection(proxy))


@pytest.mark.chaos
@pytest.mark.timeout(CHAOS_TIMEOUT_SECONDS)
async def test_connections_cut_mid_storm_lose_nothing(
    behind_proxy: otp_pb2_grpc.OtpServiceStub,
    proxy: RedisProxy,
    interakt: FakeInterakt,
    db: redis.Redis,
) -> None:
    running = asyncio.create_task(storm(behind_proxy, interakt, numbers(3_400_000, 200)))
    for _ in range(5):
        await asyncio.sleep(0.05)
        proxy.cut()
    cycles = await running
    assert UNAVAILABLE in {c.send for c in cycles} | {c.verify for c in cycles}
    await eventually(serves_again(behind_proxy, interakt, cycles, 3_400_400))
    await assert_nothing_lost(cycles, behind_proxy, db)
    await eventually(only_one_connection(proxy))


# --- Redis itself ----------------------------------------------------------------------------


async def test_a_redis_restart_without_persistence_forgets_codes_and_limits(
    make_service: MakeService, interakt: FakeInterakt, private_redis: EmbeddedRedis
) -> None:
    """What docs/scaling.md says a restart without persistence loses: live codes, counters,
    cooldowns, attempt budgets. The service itself reconnects and fails closed meanwhile."""
    stub = await make_service(redis_url=private_redis.url, max_attempts=2)
    phone = numbers(3_500_000, 1)[0]
    await status_of(stub.SendOtp(otp_pb2.SendOtpRequest(phone_number=phone), timeout=5))
    code = code_sent_to(interakt, phone)
    assert (await verify(stub, wrong_code(code), phone)).attempts_remaining == 1
    await asyncio.to_thread(private_redis.stop)
    assert await status_of(verify(stub, code, phone)) == UNAVAILABLE
    await asyncio.to_thread(private_redis.start)
    lost = await verify(stub, code, phone)  # the code is gone: fail closed, not a free pass
    assert lost.outcome == otp_pb2.VERIFY_OUTCOME_NO_ACTIVE_CODE
    # The cooldown is gone too: a new send is taken at once, with a fresh attempt budget.
    await stub.SendOtp(otp_pb2.SendOtpRequest(phone_number=phone), timeout=5)
    fresh = code_sent_to(interakt, phone)
    assert (await verify(stub, wrong_code(fresh), phone)).attempts_remaining == 1
    assert (await verify(stub, fresh, phone)).verified


# --- Interakt --------------------------------------------------------------------------------


async def closes_mid_response(request: web.Request) -> web.StreamResponse:
    """Answers 200 with a body it never finishes: the connection closes halfway."""
    await request.read()
    response = web.StreamResponse(status=200, headers={"Content-Length": "200"})
    response.content_type = "application/json"
    await response.prepare(request)
    await response.write(b'{"result": true, "mess')
    assert request.transport is not None
    request.transport.close()
    return response


@pytest.fixture
async def half_answering_interakt() -> AsyncIterator[str]:
    app = web.Application()
    app.router.add_post("/v1/public/message/", closes_mid_response)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield f"http://127.0.0.1:{runner.addresses[0][1]}/v1/public"
    await runner.cleanup()


# Each fault: the answer Interakt gives every request (None: the half-answering one above), and
# what each send it fails must be answered: its status, ErrorInfo reason, and the words of its
# message that name the fault (so an answer from the circuit breaker is not taken for it). A
# send answered DELIVERY_IN_DOUBT keeps its code (Interakt may have the message); any other
# leaves none, and stays counted (Interakt answered it).
INTERAKT_FAULTS: dict[str, tuple[Callable[[], Answer] | None, grpc.StatusCode, str, str]] = {
    "slow": (
        lambda: accepted("too-late", delay=5),
        UNAVAILABLE,
        "DELIVERY_IN_DOUBT",
        "(timed out)",
    ),
    "failing": (
        lambda: Answer(503, {"result": False, "message": "down"}),
        UNAVAILABLE,
        "PROVIDER_UNAVAILABLE",
        "(HTTP 503)",
    ),
    "refusing": (
        lambda: Answer(400, {"result": False, "message": NOT_A_CONTACT}),
        grpc.StatusCode.FAILED_PRECONDITION,
        "RECIPIENT_NOT_A_CONTACT",
        NOT_A_CONTACT,
    ),
    "rate-limiting": (
        lambda: Answer(
            429, {"result": False, "message": RATE_LIMITED}, headers={"Retry-After": "60"}
        ),
        UNAVAILABLE,
        "PROVIDER_UNAVAILABLE",
        "(rate limited)",
    ),
    "closing mid-response": (None, UNAVAILABLE, "DELIVERY_IN_DOUBT", "(ClientPayloadError)"),
}
# Budgets out of the way of a storm of sends.
STORM_BUDGETS = {"caller_sends_per_minute": 100_000, "interakt_sends_per_minute": 100_000}


async def failed_send(call: Awaitable[object]) -> tuple[grpc.StatusCode, str, str]:
    """How a send failed: its status, ErrorInfo reason and message."""
    try:
        await call
    except grpc.aio.AioRpcError as error:
        return error.code(), error_info(error).reason, error.details() or ""
    raise AssertionError("the send succeeded")


async def send_storm(
    stub: otp_pb2_grpc.OtpServiceStub, phones: list[str]
) -> dict[str, tuple[grpc.StatusCode, str, str]]:
    """Send to every number at once; how each number's send failed."""
    requests = [otp_pb2.SendOtpRequest(phone_number=p) for p in phones]
    failures = await asyncio.gather(
        *(failed_send(stub.SendOtp(r, timeout=CALLER_DEADLINE)) for r in requests)
    )
    return dict(zip(phones, failures, strict=True))


def no_code_left(db: redis.Redis, phones: list[str]) -> Callable[[], Awaitable[bool]]:
    """Whether the sends to ``phones`` left no code (their withdrawal runs after them)."""

    async def check() -> bool:
        return not any(db.exists(f"otp:{{{phone}}}:c") for phone in phones)

    return check


@pytest.mark.chaos
@pytest.mark.timeout(CHAOS_TIMEOUT_SECONDS)
@pytest.mark.parametrize("fault", sorted(INTERAKT_FAULTS))
async def test_interakt_faults_leave_no_usable_code(
    fault: str,
    make_service: MakeService,
    interakt: FakeInterakt,
    half_answering_interakt: str,
    redis_db: redis.Redis,
) -> None:
    """Each send meets the fault itself: the circuit breaker, which would answer most of them
    once Interakt has failed a few times in a row, is out of the way (the next test has it)."""
    answer, status, reason, named = INTERAKT_FAULTS[fault]
    base_url = interakt.base_url if answer is not None else half_answering_interakt
    stub = await make_service(
        interakt_base_url=base_url,
        interakt_timeout_seconds=1.0,
        breaker_failures=1_000,  # more than the storm's 60 requests
        **STORM_BUDGETS,
    )
    if answer is not None:
        interakt.answer(*[answer() for _ in range(200)])  # enough for every retry
    phones = numbers(3_600_000, 20)
    failures = await send_storm(stub, phones)
    # Within the delivery budget, never the caller's deadline.
    assert {(code, why) for code, why, _ in failures.values()} == {(status, reason)}
    assert all(named in message for _, _, message in failures.values()), failures
    # Every request reached Interakt: each counts against the budgets, each send against its
    # number's cap.
    assert redis_db.zcard(ACCOUNT_SENDS) == redis_db.zcard(CALLER_SENDS) >= len(phones)
    assert all(redis_db.zcard(f"otp:{{{phone}}}:s") == 1 for phone in phones)
    if reason != "DELIVERY_IN_DOUBT":
        await eventually(no_code_left(redis_db, phones))
        return
    # In doubt: the code the message carried stays, and verifies once.
    codes = {code_sent_to(interakt, phone) for phone in phones} if answer else set()
    for phone in phones:
        assert redis_db.hlen(f"otp:{{{phone}}}:c") == 1
    for phone in phones if answer else []:
        assert (await verify(stub, code_sent_to(interakt, phone), phone)).verified
    assert len(codes) <= len(phones)


@pytest.mark.chaos
@pytest.mark.timeout(CHAOS_TIMEOUT_SECONDS)
async def test_the_breaker_opening_mid_storm_leaves_no_usable_code(
    make_service: MakeService, interakt: FakeInterakt, redis_db: redis.Redis
) -> None:
    """Interakt failing under a storm of sends, the breaker at its defaults: it opens after a
    few failures, and refuses the retries of sends whose code is already stored: those are
    withdrawn like any failed send."""
    stub = await make_service(interakt_timeout_seconds=1.0, **STORM_BUDGETS)
    interakt.answer(*[Answer(503, {"result": False, "message": "down"}) for _ in range(200)])
    phones = numbers(3_650_000, 20)
    failures = await send_storm(stub, phones)
    assert {code for code, _, _ in failures.values()} == {UNAVAILABLE}
    assert {why for _, why, _ in failures.values()} <= {
        "PROVIDER_CIRCUIT_OPEN",
        "PROVIDER_UNAVAILABLE",
    }
    assert len(interakt.received) < 3 * len(failures)  # the breaker spared Interakt retries
    # Sends that reached Interakt had stored their code; some were then refused by the breaker.
    reached = {m.body["countryCode"] + m.body["phoneNumber"] for m in interakt.received}
    assert any(failures[phone][1] == "PROVIDER_CIRCUIT_OPEN" for phone in reached), failures
    await eventually(no_code_left(redis_db, phones))
    # Each request made counts against the budgets; a send that made none is given back.
    assert redis_db.zcard(ACCOUNT_SENDS) == len(interakt.received)


@pytest.mark.chaos
async def test_callers_with_short_deadlines_do_not_open_the_breaker_under_load(
    make_service: MakeService, interakt: FakeInterakt
) -> None:
    """60 sends whose caller gives up before Interakt's 300 ms, among 20 with time to wait:
    the breaker stays closed, and every patient send is sent."""
    stub = await make_service(
        breaker_failures=3, breaker_cooloff_seconds=600, interakt_timeout_seconds=5, **STORM_BUDGETS
    )
    interakt.answer(*[accepted(f"msg-{i}", delay=0.3) for i in range(100)])
    short, patient = numbers(3_700_000, 60), numbers(3_700_100, 20)
    statuses = await asyncio.gather(
        *(
            status_of(stub.SendOtp(otp_pb2.SendOtpRequest(phone_number=p), timeout=0.15))
            for p in short
        ),
        *(
            status_of(stub.SendOtp(otp_pb2.SendOtpRequest(phone_number=p), timeout=10))
            for p in patient
        ),
    )
    assert set(statuses[:60]) <= {UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}
    assert statuses[60:] == [OK] * 20
    late = numbers(3_700_200, 5)
    after = [
        await status_of(stub.SendOtp(otp_pb2.SendOtpRequest(phone_number=p), timeout=10))
        for p in late
    ]
    assert after == [OK] * 5


@pytest.mark.chaos
@pytest.mark.parametrize("deadline", [1.0, 3.0])
async def test_a_hanging_interakt_under_load_is_answered_before_every_deadline(
    make_service: MakeService, interakt: FakeInterakt, redis_db: redis.Redis, deadline: float
) -> None:
    """40 sends at once against an Interakt that never answers: each is told DELIVERY_IN_DOUBT
    before its deadline, and each code stays, for the message Interakt holds."""
    stub = await make_service(interakt_timeout_seconds=60, breaker_failures=1_000, **STORM_BUDGETS)
    never = asyncio.Event()
    interakt.answer(*[Answer(body={"result": True, "id": "never"}, hold=never)] * 40)
    phones = numbers(3_750_000, 40)
    try:
        failures = await asyncio.gather(
            *(
                failed_send(stub.SendOtp(otp_pb2.SendOtpRequest(phone_number=p), timeout=deadline))
                for p in phones
            )
        )
    finally:
        never.set()
    assert {(code, why) for code, why, _ in failures} == {(UNAVAILABLE, "DELIVERY_IN_DOUBT")}
    for phone in phones:
        assert (await verify(stub, code_sent_to(interakt, phone), phone)).verified


@pytest.mark.chaos
async def test_withdrawals_during_a_hung_redis_stay_bounded_under_load(
    make_service: MakeService,
    private_redis: EmbeddedRedis,
    db: redis.Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """400 sends while Redis is stopped: one task retries the withdrawals, at most the cap of
    them wait (the rest are given up and counted), and recovery writes no more tombstones."""
    monkeypatch.setattr(store, "MAX_WAITING_WITHDRAWALS", 50)
    stub = await make_service(
        redis_url=private_redis.url, redis_timeout_seconds=REDIS_TIMEOUT, **STORM_BUDGETS
    )
    # Connected, scripts loaded: the sends' commands are written, and wait in the stopped Redis.
    await stub.SendOtp(otp_pb2.SendOtpRequest(phone_number=numbers(3_800_999, 1)[0]), timeout=10)
    waiting, given_up = sample(WITHDRAWALS_WAITING), sample(WITHDRAWALS_GIVEN_UP)
    phones = numbers(3_800_000, 400)
    with paused(private_redis):
        statuses = await asyncio.gather(
            *(
                status_of(stub.SendOtp(otp_pb2.SendOtpRequest(phone_number=p), timeout=10))
                for p in phones
            )
        )
        assert set(statuses) == {UNAVAILABLE}
        assert sample(WITHDRAWALS_WAITING) - waiting <= 50
        retrying = [t for t in asyncio.all_tasks() if "_Withdrawals._run" in repr(t.get_coro())]
        assert len(retrying) <= 1
        assert sample(WITHDRAWALS_GIVEN_UP) - given_up >= 350

    async def drained() -> bool:
        return sample(WITHDRAWALS_WAITING) == waiting

    await eventually(drained)
    assert len(db.keys("otp:*:withdrawn:*")) <= 50


# --- the service itself --------------------------------------------------------------------


OTP_SERVICE = str(Path(sys.executable).parent / "otp-service")


@dataclass
class Replica:
    """``otp-service serve`` as its own process, as production runs it."""

    process: asyncio.subprocess.Process
    port: int
    channel: grpc.aio.Channel
    stub: otp_pb2_grpc.OtpServiceStub

    def rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")

    def open_fds(self) -> int:
        return len(os.listdir(f"/proc/{self.process.pid}/fd"))


@pytest.fixture
async def start_replica(
    redis_db: redis.Redis, redis_server: EmbeddedRedis, interakt: FakeInterakt
) -> AsyncIterator[Callable[..., Awaitable[Replica]]]:
    replicas: list[Replica] = []

    async def start(port: int | None = None, **env: str) -> Replica:
        port = port or free_port()
        process = await asyncio.create_subprocess_exec(
            OTP_SERVICE,
            "serve",
            env={
                "PATH": os.environ.get("PATH", ""),
                "REDIS_URL": redis_server.url,
                "INTERAKT_API_KEY": API_KEY,
                "INTERAKT_CHANNEL": "text",
                "INTERAKT_BASE_URL": interakt.base_url,
                "OTP_SECRET": SECRET.decode(),
                "OTP_CLIENT_TOKENS": f"{CALLER}:{TOKEN}",
                "OTP_GRPC_ADDRESS": f"127.0.0.1:{port}",
                "OTP_HTTP_ADDRESS": "",
                "OTP_CALLER_SENDS_PER_MINUTE": "100000",
                "INTERAKT_SENDS_PER_MINUTE": "100000",
                **env,
            },
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,  # a log line a request: nobody reads them here
            stderr=asyncio.subprocess.DEVNULL,
        )
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}", interceptors=[Bearer(TOKEN)])
        await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=SERVICE_NAME),
            wait_for_ready=True,
            timeout=PATIENCE_SECONDS,
        )
        replica = Replica(process, port, channel, otp_pb2_grpc.OtpServiceStub(channel))
        replicas.append(replica)
        return replica

    yield start
    for replica in replicas:
        await replica.channel.close()
        if replica.process.returncode is None:
            replica.process.send_signal(signal.SIGTERM)
            async with asyncio.timeout(PATIENCE_SECONDS):
                await replica.process.wait()


@pytest.mark.chaos
@pytest.mark.timeout(CHAOS_TIMEOUT_SECONDS)
async def test_sigkill_during_a_burst_of_sends_loses_no_code_a_caller_was_told_was_sent(
    start_replica: Callable[..., Awaitable[Replica]], interakt: FakeInterakt
) -> None:
    replica = await start_replica()
    # Accepted, but spread over 0.2 s, so sends are at every stage when the kill comes.
    interakt.answer(*[accepted(f"burst-{i}", delay=0.02 * (i % 10)) for i in range(400)])
    phones = numbers(3_700_000, 400)
    told_sent: list[str] = []

    async def send_one(phone: str) -> None:
        request = otp_pb2.SendOtpRequest(phone_number=phone)
        if await status_of(replica.stub.SendOtp(request, timeout=CALLER_DEADLINE)) == OK:
            told_sent.append(phone)

    async def fifty_told() -> bool:
        return len(told_sent) >= 50

    burst = [asyncio.create_task(send_one(phone)) for phone in phones]
    await eventually(fifty_told)
    replica.process.kill()  # SIGKILL: no drain, no withdrawal, nothing said to anyone
    await asyncio.gather(*burst)
    await replica.process.wait()
    assert 50 <= len(told_sent) < len(phones)

    restarted = await start_replica(port=replica.port)
    for phone in told_sent:
        answer = await verify(restarted.stub, code_sent_to(interakt, phone), phone)
        assert answer.verified, f"{phone}: told sent before the kill, lost after the restart"


def key_kinds(db: redis.Redis) -> Counter[str]:
    """How many Redis keys there are of each kind: a key's name after its hash tag, without the
    ids some carry (``otp:{+917003848501}:withdrawn:<send id>`` is a "withdrawn")."""
    kinds: Counter[str] = Counter()
    for key in db.scan_iter():
        kind = key.decode().split("}:", 1)[1]
        kinds[kind if kind == "d:prev" else kind.split(":")[0]] += 1
    return kinds


SOAK_SECONDS = float(os.environ.get("OTP_SOAK_SECONDS", "180"))


@pytest.mark.chaos
@pytest.mark.timeout(SOAK_SECONDS + CHAOS_TIMEOUT_SECONDS)
async def test_soak_two_replicas_stay_flat_and_every_delivered_code_verifies_once(
    start_replica: Callable[..., Awaitable[Replica]],
    interakt: FakeInterakt,
    redis_db: redis.Redis,
) -> None:
    """A mixed load of sends and verifies over two replicas for a few minutes
    (OTP_SOAK_SECONDS): memory, open files and Redis keys stay flat, and every delivered code
    verifies exactly once, on whichever replica is asked."""
    # Limits out of the way: each number gets a send and a wrong code every few seconds.
    limits = {
        "OTP_RESEND_COOLDOWN_SECONDS": "0",
        "OTP_MAX_SENDS_PER_HOUR": "1000",
        "OTP_MAX_FAILED_VERIFIES_PER_HOUR": "1000",
    }
    replicas = [await start_replica(**limits) for _ in range(2)]
    anomalies: list[str] = []
    cycles = 0
    stop = asyncio.Event()

    async def worker(pool: list[str]) -> None:
        nonlocal cycles
        for turn in range(10**9):
            if stop.is_set():
                return
            phone = pool[turn % len(pool)]
            first, other = replicas[turn % 2].stub, replicas[(turn + 1) % 2].stub
            await first.SendOtp(otp_pb2.SendOtpRequest(phone_number=phone), timeout=5)
            code = code_sent_to(interakt, phone)
            wrong = await verify(other, wrong_code(code), phone)
            right = await verify(first, code, phone)
            again = await verify(other, code, phone)
            if (wrong.outcome, right.verified, again.outcome) != (
                otp_pb2.VERIFY_OUTCOME_WRONG_CODE,
                True,
                otp_pb2.VERIFY_OUTCOME_NO_ACTIVE_CODE,
            ):
                anomalies.append(f"{phone}: {wrong.outcome} {right.verified} {again.outcome}")
            cycles += 1

    # Eight callers, each with its own numbers (so they never meet a number's cooldown).
    pools = [numbers(3_800_000 + 1000 * w, 100) for w in range(8)]
    workers = [asyncio.create_task(worker(pool)) for pool in pools]

    def measure() -> tuple[list[int], list[int], Counter[str]]:
        return (
            [r.rss_bytes() for r in replicas],
            [r.open_fds() for r in replicas],
            key_kinds(redis_db),
        )

    try:
        await asyncio.sleep(SOAK_SECONDS / 4)  # warm-up: caches, pools, every number seen
        rss, fds, keys = measure()
        warm_cycles = cycles
        await asyncio.sleep(SOAK_SECONDS * 3 / 4)
        rss_end, fds_end, keys_end = measure()
    finally:
        stop.set()
        await asyncio.gather(*workers)

    print(f"soak: {cycles} cycles; RSS {rss} -> {rss_end}; fds {fds} -> {fds_end}")
    print(f"soak: Redis keys {dict(keys)} -> {dict(keys_end)}")
    assert anomalies == []
    assert cycles > warm_cycles > 0
    # Flat: a descriptor that happens to be opening or closing when counted is not a leak; one
    # per request would be tens of thousands.
    for before, after in zip(fds, fds_end, strict=True):
        assert after <= before + 2, f"open files grew from {before} to {after}"
    # Flat: what the store keeps (store/keys.py lists its keys) under this load, whose
    # sends all succeed (no withdrawal tombstones) and carry no idempotency key. Each number:
    # its sends and wrong codes of the hour, and its latest delivery record (which outlives a
    # verified code by the code's TTL). Each caller, in the middle of its cycle: the live code,
    # and until Interakt's answer is recorded, the delivery record the send replaced. The two
    # send budgets.
    phones, callers = sum(len(pool) for pool in pools), len(pools)
    bounds = {"s": phones, "f": phones, "d": phones, "c": callers, "d:prev": callers}
    bounds |= {"caller-sends": 1, "account-sends": 1}
    for kinds in (keys, keys_end):
        assert set(kinds) <= set(bounds), f"Redis keys of a kind the load should not leave: {kinds}"
        assert all(n <= bounds[kind] for kind, n in kinds.items()), f"{kinds} over {bounds}"
    for before, after in zip(rss, rss_end, strict=True):
        # Flat: what a few MiB of allocator noise allows, far under what a leak per request
        # (hundreds of thousands of them) would add.
        assert after - before < 8 * 2**20, f"RSS grew {(after - before) / 2**20:.1f} MiB"
