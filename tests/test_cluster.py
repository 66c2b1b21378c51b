"""Redis Cluster: every script stays in one hash slot, numbers spread over the primaries, and the
service follows a slot that moves and a primary that fails, loading its scripts where needed.

The whole rules suite also runs on the session's Cluster (modules marked `redis_backends`).
"""

from __future__ import annotations

import asyncio
import hashlib
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
import pytest
import redis
from otp.v1 import otp_pb2
from redis.crc import key_slot

from otp_service.config import ConfigError, Settings
from otp_service.connections.embedded_redis import EmbeddedRedis
from otp_service.connections.redis_backends import cluster_client
from otp_service.store.scripts import SCRIPTS as LUA_SCRIPTS
from tests.conftest import (
    PHONE,
    MakeGateway,
    MakeService,
    eventually,
    send,
    status_of,
    verify,
    wrong_code,
)
from tests.fake_interakt import NOT_A_CONTACT, FakeInterakt, accepted, refusal
from tests.redis_deployments import LocalCluster, wait_until
from tests.test_abuse_limits import OTHER_PHONES
from tests.test_admin import admin_tokens_in, support_actions
from tests.test_delivery_status import reporting, state_becomes
from tests.test_idempotency import received, send_with


def scripts_run_by(admin: redis.Redis, sha: str) -> Callable[[], Awaitable[bool]]:
    """A check for ``eventually``: Redis has logged an EVALSHA of script ``sha``."""

    async def check() -> bool:
        return any(sha in entry["command"].decode() for entry in admin.slowlog_get(10_000))

    return check


async def test_each_script_touches_one_hash_slot(
    make_gateway: MakeGateway,
    interakt: FakeInterakt,
    private_redis: EmbeddedRedis,
    tmp_path: Path,
) -> None:
    """Every script the service runs, as Redis saw it: its keys all hash to one slot."""
    admin = redis.Redis.from_url(private_redis.url)
    admin.config_set("slowlog-log-slower-than", 0)  # log every command, with its arguments
    admin.config_set("slowlog-max-len", 10_000)
    gateway = reporting(
        await make_gateway(
            redis_url=private_redis.url,
            resend_cooldown_seconds=0,
            admin_tokens_file=str(admin_tokens_in(tmp_path)),
        ),
        interakt,
    )
    stub = gateway.stub
    await send(stub)  # stores, counts, and records what Interakt accepted
    assert await interakt.report(interakt.queued[-1], "delivered") == 200
    await state_becomes(stub, otp_pb2.DELIVERY_STATE_DELIVERED)  # a report, and the status
    await verify(stub, wrong_code(interakt.received[0].code))
    await verify(stub, interakt.received[0].code)
    # A refused send: its code is undone, and its idempotency key freed.
    interakt.answer(refusal(NOT_A_CONTACT))
    with pytest.raises(Exception, match=NOT_A_CONTACT):
        await send_with(stub, "key-0")
    hold = asyncio.Event()  # a repeat of a send still running asks for the first one's answer
    interakt.answer(accepted("msg-held", hold=hold))
    first = asyncio.ensure_future(send_with(stub, "key-1"))
    await eventually(received(interakt, 3))
    repeat = asyncio.ensure_future(send_with(stub, "key-1"))
    await eventually(scripts_run_by(admin, _sha1(LUA_SCRIPTS["first_answer"])))
    hold.set()
    assert await repeat == await first
    await support_actions(gateway.grpc_port)  # AdminService's show, unlock and cancel

    ran: dict[str, set[frozenset[int]]] = {}
    for entry in admin.slowlog_get(10_000):
        # EVALSHA's arguments have no spaces (an EVAL's script has, and follows an EVALSHA
        # of the same script with the same keys).
        name, *args = entry["command"].decode().split()
        if name.upper() == "EVALSHA":
            keys = args[2 : 2 + int(args[1])]
            ran.setdefault(args[0], set()).add(frozenset(key_slot(k.encode()) for k in keys))
    admin.close()
    shas = {_sha1(source): name for name, source in LUA_SCRIPTS.items()}
    assert set(shas) <= set(ran), f"never ran: {[shas[s] for s in set(shas) - set(ran)]}"
    for sha, slot_sets in ran.items():
        assert all(len(slots) == 1 for slots in slot_sets), shas.get(sha, sha)


def test_the_suites_numbers_spread_over_every_primary(redis_cluster: LocalCluster) -> None:
    """The rules suite's numbers, and the send budgets, live on every primary of the Cluster."""
    with redis_cluster.admin() as admin:
        owners = {
            admin.get_node_from_key(f"otp:{{{phone}}}:c").name
            for phone in [PHONE, *OTHER_PHONES, "senders"]
        }
        assert owners == {node.name for node in admin.get_primaries()}


@pytest.mark.parametrize("redis_backend", ["cluster"], indirect=True)
async def test_a_slot_that_moves_is_followed_and_its_scripts_loaded_there(
    make_service: MakeService, interakt: FakeInterakt, redis_cluster: LocalCluster
) -> None:
    stub = await make_service()
    await send(stub)
    slot = key_slot(f"otp:{{{PHONE}}}:c".encode())
    origin = redis_cluster.owner(slot)
    target = next(node for node in redis_cluster.primaries() if node is not origin)
    with target.client() as client:
        client.script_flush()  # the new owner has never seen the scripts
    redis_cluster.move_slot(slot, target)
    try:
        # MOVED: redis-py follows it; NOSCRIPT on the new owner: the store sends the script.
        wrong = await verify(stub, wrong_code(interakt.received[0].code))
        assert wrong.outcome == otp_pb2.VERIFY_OUTCOME_WRONG_CODE
        assert wrong.attempts_remaining == 4  # the code and its count moved with the slot
        assert (await verify(stub, interakt.received[0].code)).verified
    finally:
        redis_cluster.move_slot(slot, origin)


async def test_a_failed_primary_is_replaced_by_its_replica_and_the_service_follows(
    make_service: MakeService, interakt: FakeInterakt
) -> None:
    """A primary is killed; its replica takes over (the Cluster's own failover); the service
    answers UNAVAILABLE meanwhile, then uses the new primary, where it loads its scripts."""
    cluster = await asyncio.to_thread(lambda: LocalCluster(masters=3, replicas=1).start())
    try:
        stub = await make_service(redis_url=cluster.url, max_attempts=50)
        await send(stub)
        code = interakt.received[0].code
        slot = key_slot(f"otp:{{{PHONE}}}:c".encode())
        primary = cluster.owner(slot)
        replica = cluster.replica_of(primary)
        with replica.client() as client:
            client.execute_command("READONLY")
            wait_until(lambda: client.exists(f"otp:{{{PHONE}}}:c"), "the code on the replica")
        await asyncio.to_thread(primary.stop, signal.SIGKILL)

        for _ in range(300):
            status = await status_of(verify(stub, wrong_code(code)))
            assert status in (grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE)
            if status == grpc.StatusCode.OK:
                break
            await asyncio.sleep(0.1)
        assert cluster.owner(slot) is replica
        assert (await verify(stub, code)).verified  # replicated before the failure
    finally:
        await asyncio.to_thread(cluster.close)


def _sha1(source: str) -> str:
    return hashlib.sha1(source.encode(), usedforsecurity=False).hexdigest()


def test_cluster_urls_are_checked() -> None:
    env = {
        "OTP_SECRET": "x" * 16,
        "INTERAKT_API_KEY": "k",
        "INTERAKT_CHANNEL": "text",
        "OTP_CLIENT_TOKENS": "a:" + "t" * 16,
    }
    url = "rediss+cluster://user:secret@10.0.0.1:7000,10.0.0.2:7001,[::1]:7002"
    assert Settings.from_env({**env, "REDIS_URL": url}).redis_url == url
    for bad, problem in [
        ("redis+cluster://10.0.0.1:7000,10.0.0.2", "expected host:port, got '10.0.0.2'"),
        ("redis+cluster://10.0.0.1:7000/3", "a Redis Cluster has only database 0"),
        ("cluster://10.0.0.1:7000", "must start with redis://"),
    ]:
        with pytest.raises(ConfigError) as failed:
            Settings.from_env({**env, "REDIS_URL": bad})
        assert any(p.startswith("REDIS_URL:") and problem in p for p in failed.value.problems)


async def test_cluster_url_options_reach_redis_py() -> None:
    """Credentials and TLS options of a rediss+cluster:// URL reach every node's connections.

    (The wheel's redis-server has no TLS, so this is checked on the client that would connect.)
    """
    url = "rediss+cluster://app:pw@127.0.0.1:7000,[::1]:7001?ssl_ca_certs=/etc/ca.pem"
    cluster = cluster_client(url, timeout=1.0)
    try:
        options = cluster.get_connection_kwargs()
        assert options["connection_class"].__name__ == "SSLConnection"
        assert (options["username"], options["password"]) == ("app", "pw")
        assert options["ssl_ca_certs"] == "/etc/ca.pem"
        assert [(node.host, node.port) for node in cluster.startup_nodes] == [
            ("127.0.0.1", 7000),
            ("::1", 7001),
        ]
    finally:
        await cluster.aclose()
