"""PipelinedRedis under concurrency and faults, against a real redis-server of its own."""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
import pytest
import redis
import uvloop
from otp.v1 import otp_pb2
from redis.asyncio import ConnectionPool
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import DataError, NoPermissionError, NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from otp_service.connections.embedded_redis import EmbeddedRedis
from otp_service.connections.pipelined_redis import PipelinedRedis, _packer
from tests.conftest import MakeService, SilentRedis, eventually, verify
from tests.redis_proxy import RedisProxy
from tests.test_tls import Authority

TIMEOUT = 0.3
SCRIPT = "return {KEYS[1], ARGV[1]}"


@pytest.fixture
async def client(private_redis: EmbeddedRedis) -> AsyncIterator[PipelinedRedis]:
    pipelined = PipelinedRedis.from_url(private_redis.url, timeout=TIMEOUT)
    yield pipelined
    await pipelined.aclose()


def admin(server: EmbeddedRedis, db: int = 0) -> redis.Redis:
    return redis.Redis(port=server.port, db=db)


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
    client: PipelinedRedis,
) -> None:
    assert await client.ping()
    abandoned = asyncio.create_task(client.execute_command("ECHO", "abandoned"))
    mine = asyncio.create_task(client.execute_command("ECHO", "mine"))
    await asyncio.sleep(0)  # both are queued; no reply can arrive before the next loop turn
    abandoned.cancel()
    assert await mine == b"mine"
    assert abandoned.cancelled()
    assert await client.execute_command("ECHO", "after") == b"after"


async def test_a_command_that_cannot_be_encoded_fails_alone(client: PipelinedRedis) -> None:
    """It is refused before it takes a reply slot, so no other caller gets a neighbour's reply."""
    results = await asyncio.gather(
        client.execute_command("ECHO", "first"),
        client.execute_command("ECHO", None),  # redis-py cannot encode None
        client.execute_command("ECHO", "second"),
        return_exceptions=True,
    )
    assert results[0] == b"first"
    assert isinstance(results[1], DataError)
    assert results[2] == b"second"
    assert await client.execute_command("ECHO", "third") == b"third"


@pytest.mark.parametrize("encoding", ["utf-8", "latin-1"])
async def test_commands_are_sent_as_redis_py_would_send_them(encoding: str) -> None:
    """Packed by hiredis where it can (the fast path) or by redis-py: the same bytes either way,
    and what neither can encode is redis-py's DataError."""
    url = f"redis://127.0.0.1:1/0?encoding={encoding}"
    connection = ConnectionPool.from_url(url).make_connection()
    pack = _packer(connection)
    commands: list[tuple[object, ...]] = [
        ("EVALSHA", "a" * 40, 2, "otp:{+917003848501}:c", b"raw", -3, 1.5, 2**70, "\u00e9"),
        ("CLIENT SETNAME", "two-word name"),  # split by redis-py, not sent as one word
        (b"PING",),
        ("SET", "k", bytearray(b"v")),  # hiredis refuses a bytearray, redis-py sends it
        ("SET", "k", memoryview(b"v")),
    ]
    for command in commands:
        assert pack(command) == b"".join(connection.pack_command(*command))
    for unencodable in (None, True, object()):
        with pytest.raises(DataError):
            pack(("SET", "k", unencodable))


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


async def test_a_pool_given_to_the_constructor_makes_the_connections(
    private_redis: EmbeddedRedis,
) -> None:
    """The seam for Sentinel: any pool whose make_connection() gives a redis-py connection."""
    pool = ConnectionPool(host="127.0.0.1", port=private_redis.port, db=5)
    client = PipelinedRedis(pool, timeout=TIMEOUT)
    try:
        await client.execute_command("SET", "where", "db 5")
        assert admin(private_redis, db=5).get("where") == b"db 5"
    finally:
        await client.aclose()
        await pool.aclose()


@pytest.mark.parametrize("loop_factory", [asyncio.new_event_loop, uvloop.new_event_loop])
def test_tls_with_an_acl_user_on_either_event_loop(
    private_redis: EmbeddedRedis,
    tmp_path: Path,
    loop_factory: Callable[[], asyncio.AbstractEventLoop],
) -> None:
    """rediss:// with a user, password, database and CA from the URL; the server's loop is uvloop.

    Redis sits behind a TLS-terminating proxy (the wheel's Redis is built without TLS).
    """
    admin(private_redis).execute_command(
        "ACL", "SETUSER", "otp", "on", ">otp-password-0123", "~otp:*", "+@all"
    )
    authority = Authority("test Redis CA")
    issued = authority.issue("localhost", server=True)
    (tmp_path / "ca.pem").write_bytes(authority.cert)
    (tmp_path / "key.pem").write_bytes(issued.key)
    (tmp_path / "cert.pem").write_bytes(issued.cert)
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")

    async def scenario() -> None:
        proxy = await RedisProxy(private_redis.port, tls=tls).start()
        url = (
            f"rediss://otp:otp-password-0123@127.0.0.1:{proxy.port}/3"
            f"?ssl_ca_certs={tmp_path / 'ca.pem'}"
        )
        client = PipelinedRedis.from_url(url, timeout=5)
        try:
            info = await client.execute_command("CLIENT", "INFO")
            assert b" user=otp " in info
            assert b" db=3 " in info
            answers = await asyncio.gather(
                *(client.execute_command("ECHO", f"tls-{i}") for i in range(50))
            )
            assert answers == [f"tls-{i}".encode() for i in range(50)]
            with pytest.raises(NoPermissionError):
                await client.execute_command("GET", "not-ours")
            with pytest.raises(NoScriptError):
                await client.execute_command("EVALSHA", "0" * 40, 1, "otp:k")
            assert await client.ping()
        finally:
            await client.aclose()
            await proxy.close()

    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(scenario())


async def test_dropped_connections_are_closed_and_never_written_again(
    make_service: MakeService, private_redis: EmbeddedRedis
) -> None:
    """Many CLIENT KILLs under load: afterwards the service holds one socket to Redis, open.

    A dropped connection that is written again (redis-py reconnects on send) is never read,
    and ends in CLOSE-WAIT once Redis closes it.
    """
    stub = await make_service(redis_url=private_redis.url)
    killer = admin(private_redis)
    stop = asyncio.Event()
    failures: list[grpc.StatusCode] = []

    async def load() -> None:
        while not stop.is_set():
            try:
                await verify(stub, "123456")
            except grpc.aio.AioRpcError as exc:
                failures.append(exc.code())

    async def service_connected() -> bool:
        clients = await asyncio.to_thread(killer.client_list, _type="normal")
        return len(clients) > 1  # the killer's own, and the service's

    workers = [asyncio.create_task(load()) for _ in range(16)]
    try:
        for _ in range(40):
            await eventually(service_connected)
            await asyncio.to_thread(
                killer.execute_command, "CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes"
            )
    finally:
        stop.set()
        await asyncio.gather(*workers)
        killer.close()
    assert set(failures) <= {grpc.StatusCode.UNAVAILABLE}
    assert (await verify(stub, "123456")).outcome == otp_pb2.VERIFY_OUTCOME_NO_ACTIVE_CODE

    async def one_open_socket() -> bool:
        return sockets_to(private_redis.port) == ["ESTABLISHED"]

    await eventually(one_open_socket)


_TCP_STATES = {"01": "ESTABLISHED", "06": "TIME_WAIT", "08": "CLOSE_WAIT", "0A": "LISTEN"}


def sockets_to(port: int) -> list[str]:
    """The TCP states of this process' sockets connected to ``port`` on loopback (Linux)."""
    inodes = set()
    for fd in Path("/proc/self/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[len("socket:[") : -1])
    states = []
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        remote, state, inode = fields[2], fields[3], fields[9]
        if int(remote.split(":")[1], 16) == port and inode in inodes:
            states.append(_TCP_STATES.get(state, state))
    return states
