"""``otp-service serve --workers N``: N processes share one port and all of them serve; a
worker that dies takes the others down with it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import redis
from otp.v1 import otp_pb2, otp_pb2_grpc

from otp_service.connections.embedded_redis import EmbeddedRedis, free_port
from tests.conftest import CALLER, PHONE, SECRET, TOKEN
from tests.fake_interakt import API_KEY

CONNECTIONS = 24


def children_of(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            # The fields after the parenthesised command name: state, ppid, ...
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def sockets_on(pid: int, port: int, state: str) -> int:
    """How many TCP sockets on local ``port`` in ``state`` the process ``pid`` holds open."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local_port = int(fields[1].rsplit(":", 1)[1], 16)
            if local_port == port and fields[3] == state and fields[9] in inodes:
                count += 1
    return count


# The states of /proc/net/tcp.
ESTABLISHED = "01"
LISTEN = "0A"


def listening_workers(process: subprocess.Popen[bytes], port: int) -> list[int]:
    """The two workers' pids, once both listen on ``port`` (each starts on its own schedule)."""
    bound = time.monotonic() + 60
    while time.monotonic() < bound:
        assert process.poll() is None, "the server exited"
        workers = children_of(process.pid)
        try:
            if len(workers) == 2 and all(sockets_on(pid, port, LISTEN) for pid in workers):
                return workers
        except FileNotFoundError:
            pass  # a process went away between the two looks
        time.sleep(0.05)
    raise AssertionError("two workers never listened")


@pytest.fixture
def two_workers(
    redis_server: EmbeddedRedis, redis_db: redis.Redis
) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """Two workers on the test Redis, emptied first (redis_db): no code of PHONE is left."""
    port = free_port()
    env = {
        **os.environ,
        "REDIS_URL": redis_server.url,
        "INTERAKT_API_KEY": API_KEY,
        "INTERAKT_CHANNEL": "text",
        "INTERAKT_BASE_URL": "http://127.0.0.1:9/v1/public",  # never called by a verify
        "OTP_SECRET": SECRET.decode(),
        "OTP_GRPC_ADDRESS": f"127.0.0.1:{port}",
        "OTP_CLIENT_TOKENS": f"{CALLER}:{TOKEN}",
        # Both workers serve HTTP on one port too.
        "OTP_HTTP_ADDRESS": f"127.0.0.1:{free_port()}",
        "OTP_SHUTDOWN_GRACE_SECONDS": "1",
    }
    command = [sys.executable, "-m", "otp_service", "serve", "--workers", "2"]
    process = subprocess.Popen(command, env=env)
    yield process, port
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def test_two_workers_share_the_port_and_both_serve(
    two_workers: tuple[subprocess.Popen[bytes], int],
) -> None:
    process, port = two_workers
    # Until both listen, the kernel gives every connection to the one that does.
    workers = listening_workers(process, port)
    request = otp_pb2.VerifyOtpRequest(phone_number=PHONE, otp_code="123456")
    channels = []
    try:
        for _ in range(CONNECTIONS):
            # A private subchannel pool gives each channel its own TCP connection, so the
            # kernel spreads them over the workers.
            channel = grpc.insecure_channel(
                f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)]
            )
            channels.append(channel)
            answer = otp_pb2_grpc.OtpServiceStub(channel).VerifyOtp(
                request,
                timeout=10,
                wait_for_ready=True,
                metadata=(("authorization", f"Bearer {TOKEN}"),),
            )
            assert answer.outcome == otp_pb2.VERIFY_OUTCOME_NO_ACTIVE_CODE
        per_worker = [sockets_on(pid, port, ESTABLISHED) for pid in workers]
        assert sum(per_worker) == CONNECTIONS
        assert all(count > 0 for count in per_worker), per_worker
    finally:
        for channel in channels:
            channel.close()
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=15) == 0


def test_a_worker_that_dies_stops_the_others_and_the_service_exits_non_zero(
    two_workers: tuple[subprocess.Popen[bytes], int],
) -> None:
    process, port = two_workers
    killed, other = listening_workers(process, port)
    os.kill(killed, signal.SIGKILL)
    # Not left serving short-handed: the supervisor sees the whole service exit, and restarts it.
    assert process.wait(timeout=60) != 0
    assert not Path(f"/proc/{other}").exists()
