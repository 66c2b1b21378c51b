"""PipelinedRedis under concurrency and faults, against a real redis-server of its own."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import grpc
import pytest
import redis
from otp.v1 import otp_pb2, otp_pb2_grpc
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from otp_service import build_deps, create_server
from otp_service.embedded_redis import EmbeddedRedis
from otp_service.pipelined_redis import PipelinedRedis
from tests.conftest import TOKEN, Bearer, settings_for, verify
from tests.fake_interakt import FakeInterakt

TIMEOUT = 0.3
SCRIPT = "return {KEYS[1], ARGV[1]}"


@pytest.fixture
def own_redis() -> Iterator[EmbeddedRedis]:
    """A private server, so stopping or pausing it cannot disturb other tests."""
    with EmbeddedRedis() as server:
        yield server


@pytest.fixture
async def client(own_redis: EmbeddedRedis) -> AsyncIterator[PipelinedRedis]:
    pipelined = PipelinedRedis(own_redis.url, timeout=TIMEOUT)
    yield pipelined
    await pipelined.aclose()


def admin(server: EmbeddedRedis) -> redis.Redis:
    return redis.Redis.from_url(server.url)


async def test_concurrent_commands_each_get_their_own_reply(client: PipelinedRedis) -> None:
    await client.execute_command("SET", "text", "not a number")

    async def one(i: int) -> object:
        if i % 7 == 0:
            return await client.execute_command("INCR", "text")  # an error reply
        return await client.execute_command("ECHO", f"reply-{i}")

    answers = await asyncio.gather(*(one(i) for i in range(300)), return_exceptions=True)
    for i, answer in enumerate(answers):
        if i % 7 == 0:
            assert isinstance(answer, ResponseError), answer
        else:
            assert answer == f"reply-{i}".encode()
    assert await client.ping()


async def test_noscript_reaches_its_caller_as_noscripterror_and_the_connection_stays(
    client: PipelinedRedis, own_redis: EmbeddedRedis
) -> None:
    sha = await client.execute_command("SCRIPT", "LOAD", SCRIPT)
    assert await client.execute_command("EVALSHA", sha, 1, "k", "a") == [b"k", b"a"]
    admin(own_redis).script_flush()
    with pytest.raises(NoScriptError):
        await client.execute_command("EVALSHA", sha, 1, "k", "b")
    assert await client.ping()


async def test_reconnects_after_a_redis_restart_and_fails_fast_while_down(
    client: PipelinedRedis, own_redis: EmbeddedRedis
) -> None:
    assert await client.ping()
    own_redis.stop()
    with pytest.raises(RedisConnectionError):
        await client.execute_command("PING")
    own_redis.start()
    # The reader saw the old connection close, so the first command connects afresh.
    assert await client.execute_command("ECHO", "back") == b"back"


async def test_a_silent_redis_times_out_then_the_next_command_reconnects(
    client: PipelinedRedis, own_redis: EmbeddedRedis
) -> None:
    assert await client.ping()
    admin(own_redis).execute_command("CLIENT", "PAUSE", "1500", "ALL")
    loop = asyncio.get_running_loop()
    started = loop.time()
    waiting = [client.execute_command("ECHO", str(i)) for i in range(5)]
    results = await asyncio.gather(*waiting, return_exceptions=True)
    assert all(isinstance(r, RedisTimeoutError) for r in results), results
    assert loop.time() - started < TIMEOUT * 3  # a bound on the hang, not a performance claim
    admin(own_redis).execute_command("CLIENT", "UNPAUSE")
    assert await client.execute_command("ECHO", "after") == b"after"


async def test_a_caller_that_gives_up_does_not_shift_later_replies(
    client: PipelinedRedis, own_redis: EmbeddedRedis
) -> None:
    assert await client.ping()
    admin(own_redis).execute_command("CLIENT", "PAUSE", "100", "ALL")
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(client.execute_command("ECHO", "abandoned"), 0.02)
    assert await client.execute_command("ECHO", "mine") == b"mine"


async def test_unreachable_redis_fails_fast() -> None:
    with EmbeddedRedis() as server:
        url = server.url
    client = PipelinedRedis(url, timeout=TIMEOUT)
    with pytest.raises(RedisConnectionError):
        await client.execute_command("PING")
    assert not await _ping_ok(client)
    await client.aclose()


async def _ping_ok(client: PipelinedRedis) -> bool:
    try:
        return await client.ping()
    except RedisConnectionError:
        return False


async def test_callers_waiting_on_a_silent_server_fail_together_within_the_timeout() -> None:
    """A server that accepts and never answers: N callers must not queue N connect attempts."""

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # hold the connection, answer nothing
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = PipelinedRedis(f"redis://127.0.0.1:{port}/0", timeout=TIMEOUT)
    loop = asyncio.get_running_loop()
    started = loop.time()
    results = await asyncio.gather(
        *(client.execute_command("PING") for _ in range(20)), return_exceptions=True
    )
    assert all(isinstance(r, RedisTimeoutError) for r in results), results
    assert loop.time() - started < TIMEOUT * 5  # one shared attempt, not twenty in a row
    await client.aclose()
    server.close()
    await server.wait_closed()


async def test_service_answers_right_after_a_redis_restart(
    own_redis: EmbeddedRedis, interakt: FakeInterakt
) -> None:
    settings = settings_for(interakt, own_redis.url)
    deps = build_deps(settings, own_redis.url)
    server = await create_server(settings, deps)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(
            f"127.0.0.1:{server.port}", interceptors=[Bearer(TOKEN)]
        ) as channel:
            stub = otp_pb2_grpc.OtpServiceStub(channel)
            before = await verify(stub, "123456")  # loads the verify script, opens the connection
            assert before.outcome == otp_pb2.VERIFY_OUTCOME_NO_ACTIVE_CODE
            own_redis.stop()
            own_redis.start()  # the same port, empty: the scripts are gone too
            answer = await verify(stub, "123456")
            assert answer.outcome == otp_pb2.VERIFY_OUTCOME_NO_ACTIVE_CODE
    finally:
        await server.stop(0)
        await deps.close()
