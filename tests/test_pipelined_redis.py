"""PipelinedRedis under concurrency and faults, against a real redis-server of its own."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import redis
from otp.v1 import otp_pb2
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from otp_service.embedded_redis import EmbeddedRedis
from otp_service.pipelined_redis import PipelinedRedis
from tests.conftest import MakeService, SilentRedis, verify

TIMEOUT = 0.3
SCRIPT = "return {KEYS[1], ARGV[1]}"


@pytest.fixture
async def client(private_redis: EmbeddedRedis) -> AsyncIterator[PipelinedRedis]:
    pipelined = PipelinedRedis.from_url(private_redis.url, timeout=TIMEOUT)
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
    client: PipelinedRedis, private_redis: EmbeddedRedis
) -> None:
    sha = await client.execute_command("SCRIPT", "LOAD", SCRIPT)
    assert await client.execute_command("EVALSHA", sha, 1, "k", "a") == [b"k", b"a"]
    admin(private_redis).script_flush()
    with pytest.raises(NoScriptError):
        await client.execute_command("EVALSHA", sha, 1, "k", "b")
    assert await client.ping()


async def test_reconnects_after_a_redis_restart_and_fails_fast_while_down(
    client: PipelinedRedis, private_redis: EmbeddedRedis
) -> None:
    assert await client.ping()
    private_redis.stop()
    with pytest.raises(RedisConnectionError):
        await client.execute_command("PING")
    private_redis.start()
    # The reader saw the old connection close, so the first command connects afresh.
    assert await client.execute_command("ECHO", "back") == b"back"


async def test_a_silent_redis_times_out_then_the_next_command_reconnects(
    client: PipelinedRedis, private_redis: EmbeddedRedis
) -> None:
    assert await client.ping()
    admin(private_redis).execute_command("CLIENT", "PAUSE", "1500", "ALL")
    waiting = [client.execute_command("ECHO", str(i)) for i in range(5)]
    results = await asyncio.gather(*waiting, return_exceptions=True)
    # Redis stays paused for 1.5 s, far past TIMEOUT: only giving up can produce these.
    assert all(isinstance(r, RedisTimeoutError) for r in results), results
    admin(private_redis).execute_command("CLIENT", "UNPAUSE")
    assert await client.execute_command("ECHO", "after") == b"after"


async def test_a_caller_that_gives_up_does_not_shift_later_replies(
    client: PipelinedRedis, private_redis: EmbeddedRedis
) -> None:
    assert await client.ping()
    admin(private_redis).execute_command("CLIENT", "PAUSE", "100", "ALL")
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(client.execute_command("ECHO", "abandoned"), 0.02)
    assert await client.execute_command("ECHO", "mine") == b"mine"


async def test_unreachable_redis_fails_fast() -> None:
    with EmbeddedRedis() as server:
        url = server.url
    client = PipelinedRedis.from_url(url, timeout=TIMEOUT)
    with pytest.raises(RedisConnectionError):
        await client.execute_command("PING")
    assert not await _ping_ok(client)
    await client.aclose()


async def _ping_ok(client: PipelinedRedis) -> bool:
    try:
        return await client.ping()
    except RedisConnectionError:
        return False


async def test_callers_waiting_on_a_silent_server_share_one_connection_attempt(
    silent_redis: SilentRedis,
) -> None:
    """A server that accepts and never answers: N callers must not queue N connect attempts."""
    client = PipelinedRedis.from_url(silent_redis.url, timeout=TIMEOUT)
    results = await asyncio.gather(
        *(client.execute_command("PING") for _ in range(20)), return_exceptions=True
    )
    assert all(isinstance(r, RedisTimeoutError) for r in results), results
    assert silent_redis.connections == 1
    await client.aclose()


async def test_service_answers_right_after_a_redis_restart(
    make_service: MakeService, private_redis: EmbeddedRedis
) -> None:
    stub = await make_service(redis_url=private_redis.url)
    before = await verify(stub, "123456")  # loads the verify script, opens the connection
    assert before.outcome == otp_pb2.VERIFY_OUTCOME_NO_ACTIVE_CODE
    private_redis.stop()
    private_redis.start()  # the same port, empty: the scripts are gone too
    answer = await verify(stub, "123456")
    assert answer.outcome == otp_pb2.VERIFY_OUTCOME_NO_ACTIVE_CODE
