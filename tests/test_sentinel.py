"""Sentinel: the service finds the primary through the sentinels and follows a failover by
itself, answering UNAVAILABLE meanwhile and never a wrong answer.

The whole rules suite also runs on the session's Sentinel deployment (modules marked
`redis_backends`).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable
from typing import TypeVar

import grpc
import pytest
import redis
from otp.v1 import otp_pb2

from otp_service.config import ConfigError, Settings
from otp_service.connections.redis_backends import RedisTarget, open_store
from tests.conftest import PHONE, MakeService, code_sent_to, send, verify, wrong_code
from tests.fake_interakt import FakeInterakt
from tests.redis_deployments import SENTINEL_MASTER, LocalSentinel, RedisProcess, wait_until
from tests.redis_proxy import RedisProxy
from tests.test_store_contract import RULES

PRODUCTION = {
    "OTP_SECRET": "x" * 16,
    "INTERAKT_API_KEY": "k",
    "INTERAKT_CHANNEL": "text",
    "OTP_CLIENT_TOKENS": "a:" + "t" * 16,
}
# Cycles of the load to see before the failover, and again after it.
CYCLES = 20
Answer = TypeVar("Answer")


@pytest.fixture
async def sentinel() -> AsyncIterator[LocalSentinel]:
    deployment = LocalSentinel(replicas=1, password="failover-password")
    await asyncio.to_thread(deployment.start)
    yield deployment
    await asyncio.to_thread(deployment.close)


def evalsha_calls(client: redis.Redis) -> int:
    return int(client.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0))


async def test_the_service_follows_a_failover_under_load(
    make_service: MakeService, interakt: FakeInterakt, sentinel: LocalSentinel
) -> None:
    """Sends and verifies run while the sentinels switch the primary. Every answer is right or
    UNAVAILABLE; afterwards no verified code verifies again and every code a caller was told
    was sent (and not used or in doubt) still verifies: nothing the callers were told was lost.

    The service moves to the new primary within seconds; its writes are confirmed again once
    the new primary has a replica (the old primary, when the sentinels have turned it into one).
    """
    stub = await make_service(
        **sentinel.settings(),
        # Every replica: without acks a failover loses writes (sends and verifies alike); with
        # fewer than all, one the old primary took during the switch can be acknowledged by a
        # replica that the switch then resynchronises from the new primary, losing it.
        redis_replica_acks=1,
        redis_timeout_seconds=0.5,
        caller_sends_per_minute=100_000,
        interakt_sends_per_minute=100_000,
    )
    numbers = (f"+91700{n:07d}" for n in range(3_848_501, 4_000_000))
    wrong: list[str] = []  # every answer that was neither right nor UNAVAILABLE
    sent: dict[str, str] = {}  # number -> the code its caller was told was sent
    used: set[str] = set()  # numbers whose code was answered VERIFIED
    in_doubt: set[str] = set()  # numbers with a verify answered UNAVAILABLE: it may have run
    stop = asyncio.Event()

    async def call(rpc: Awaitable[Answer]) -> Answer | None:
        try:
            return await rpc
        except grpc.aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.UNAVAILABLE:
                wrong.append(f"{error.code()}: {error.details()}")
            return None

    async def cycle(phone: str) -> None:
        if await call(send(stub, phone)) is None:
            return
        code = sent[phone] = code_sent_to(interakt, phone)
        for typed, expected in ((wrong_code(code), "WRONG_CODE"), (code, "VERIFIED")):
            answer = await call(verify(stub, typed, phone))
            if answer is None:
                in_doubt.add(phone)
                return
            if otp_pb2.VerifyOutcome.Name(answer.outcome) != f"VERIFY_OUTCOME_{expected}":
                wrong.append(f"{phone}: {expected} expected, got {answer.outcome}")
        used.add(phone)

    async def load() -> None:
        for phone in numbers:
            if stop.is_set():
                return
            await cycle(phone)

    workers = [asyncio.create_task(load()) for _ in range(4)]
    async with asyncio.timeout(60):
        await asyncio.to_thread(wait_until, lambda: len(used) >= CYCLES, "cycles before")
        old = sentinel.current_primary()
        new = await asyncio.to_thread(sentinel.failover)
        with new.client() as client:
            await asyncio.to_thread(
                wait_until, lambda: evalsha_calls(client) > 0, "the service on the new primary"
            )
        served = len(used)
        await asyncio.to_thread(
            wait_until, lambda: len(used) >= served + CYCLES, "cycles on the new primary"
        )
        stop.set()
        await asyncio.gather(*workers)

    assert new is not old
    assert wrong == []
    # What the callers were told holds on the new primary.
    for phone in used:
        answer = await verify(stub, sent[phone], phone)
        assert answer.outcome == otp_pb2.VERIFY_OUTCOME_NO_ACTIVE_CODE, f"{phone} verified twice"
    for phone in sent.keys() - used - in_doubt:
        assert (await verify(stub, sent[phone], phone)).verified, f"{phone}'s code was lost"


async def test_a_primary_turned_replica_under_the_connection_is_left(
    make_service: MakeService, interakt: FakeInterakt
) -> None:
    """Its node becomes a replica but keeps the connection: writes answer READONLY. The call
    that meets it is UNAVAILABLE; the next connects again and finds the primary (here the
    address behind REDIS_URL switches, as a managed Redis's DNS name does)."""
    old, new = RedisProcess().start(), RedisProcess().start()
    proxy = await RedisProxy(old.port).start()
    try:
        stub = await make_service(redis_url=proxy.url)
        await send(stub)
        code = interakt.received[0].code
        with old.client() as old_client, new.client() as new_client:
            new_client.replicaof("127.0.0.1", old.port)
            wait_until(lambda: new_client.exists(f"otp:{{{'+917003848501'}}}:c"), "sync")
            new_client.replicaof("NO", "ONE")
            old_client.replicaof("127.0.0.1", new.port)
        proxy.redis_port = new.port

        with pytest.raises(grpc.aio.AioRpcError) as met_a_replica:
            await verify(stub, wrong_code(code))
        assert met_a_replica.value.code() == grpc.StatusCode.UNAVAILABLE
        answer = await verify(stub, wrong_code(code))
        assert answer.attempts_remaining == 4  # the replica counted nothing
        assert (await verify(stub, code)).verified
    finally:
        await proxy.close()
        old.close()
        new.close()


async def test_sentinels_that_do_not_answer_leave_the_primary_in_use(
    sentinel: LocalSentinel,
) -> None:
    """Without sentinels no failover can happen: the primary in use is still the primary, so
    the store stays ready (a readiness ping that failed here would take every replica out)."""
    store = open_store(sentinel_target(sentinel), RULES)
    try:
        await store.add_code(PHONE, "a" * 32, "send-1")
        for node in sentinel.sentinels:
            await asyncio.to_thread(node.stop)
        assert await store.check() is None
        assert (await store.verify(PHONE, "a" * 32)).verified
    finally:
        await store.close()


async def test_a_deposed_primary_still_taking_writes_is_left_at_the_next_ping(
    sentinel: LocalSentinel,
) -> None:
    """The sentinels name another primary while the old one still takes writes (not yet turned
    into a replica): the readiness ping moves the store there, so no write lands on the node
    the failover is about to discard."""
    store = open_store(sentinel_target(sentinel), RULES)
    old, new = sentinel.primary, sentinel.replicas[0]
    codes = f"otp:{{{PHONE}}}:c"
    try:
        await store.add_code(PHONE, "a" * 32, "send-1")
        with new.client() as client:
            wait_until(lambda: client.exists(codes), "the code on the replica")
            client.replicaof("NO", "ONE")
        for node in sentinel.sentinels:
            with node.client() as client:
                client.execute_command("SENTINEL", "REMOVE", SENTINEL_MASTER)
                client.execute_command(
                    "SENTINEL", "MONITOR", SENTINEL_MASTER, "127.0.0.1", new.port, 2
                )
                client.execute_command(
                    "SENTINEL", "SET", SENTINEL_MASTER, "auth-pass", sentinel.password
                )
        assert await store.check() is None
        assert (await store.verify(PHONE, "a" * 32)).verified
        with old.client() as on_old, new.client() as on_new:
            assert (on_old.exists(codes), on_new.exists(codes)) == (1, 0)
    finally:
        await store.close()


def sentinel_target(sentinel: LocalSentinel) -> RedisTarget:
    return RedisTarget(
        url=sentinel.settings()["redis_url"],
        timeout=0.5,
        sentinels=sentinel.settings()["redis_sentinels"],
        sentinel_master=SENTINEL_MASTER,
        sentinel_password=sentinel.password,
    )


@pytest.mark.parametrize(
    ("env", "problem"),
    [
        ({"REDIS_SENTINELS": "10.0.0.1:26379"}, "REDIS_SENTINELS, REDIS_SENTINEL_MASTER: set both"),
        ({"REDIS_SENTINEL_MASTER": "otp"}, "REDIS_SENTINELS, REDIS_SENTINEL_MASTER: set both"),
        (
            {"REDIS_SENTINELS": "10.0.0.1:26379,10.0.0.2", "REDIS_SENTINEL_MASTER": "otp"},
            "REDIS_SENTINELS: expected host:port, got '10.0.0.2'",
        ),
        (
            {
                "REDIS_SENTINELS": "10.0.0.1:26379",
                "REDIS_SENTINEL_MASTER": "otp",
                "REDIS_URL": "redis://10.0.0.9:6379/0",
            },
            "REDIS_URL: with REDIS_SENTINELS the sentinels name the primary",
        ),
        ({"OTP_REDIS_REPLICA_ACKS": "-1"}, "OTP_REDIS_REPLICA_ACKS: must be between 0 and 16"),
    ],
)
def test_bad_sentinel_settings_are_named(env: dict[str, str], problem: str) -> None:
    with pytest.raises(ConfigError) as failed:
        Settings.from_env({**PRODUCTION, **env})
    assert any(p.startswith(problem) for p in failed.value.problems), failed.value.problems


def test_sentinel_settings() -> None:
    settings = Settings.from_env(
        {
            **PRODUCTION,
            "REDIS_SENTINELS": "10.0.0.1:26379, [fd00::2]:26380",
            "REDIS_SENTINEL_MASTER": "otp",
            "REDIS_SENTINEL_PASSWORD": "sentinel-secret",
            "REDIS_URL": "rediss://app:data-secret@/2?ssl_ca_certs=/etc/ca.pem",
        }
    )
    assert settings.redis_sentinels == (("10.0.0.1", 26379), ("fd00::2", 26380))
    assert settings.redis_sentinel_master == "otp"
    assert "sentinel-secret" not in repr(settings)
    # Without REDIS_URL, the data nodes need no password and use database 0.
    assert (
        Settings.from_env(
            {**PRODUCTION, "REDIS_SENTINELS": "10.0.0.1:26379", "REDIS_SENTINEL_MASTER": "otp"}
        ).redis_url
        == "redis://"
    )
