"""``otp-service serve --workers N``: N processes share one port and all of them serve."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from otp.v1 import otp_pb2, otp_pb2_grpc

from otp_service.embedded_redis import EmbeddedRedis, free_port
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


def established_on(pid: int, port: int) -> int:
    """How many TCP connections to ``port`` the process ``pid`` holds open."""
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
            if local_port == port and fields[3] == "01" and fields[9] in inodes:
                count += 1
    return count


@pytest.fixture
def two_workers(redis_server: EmbeddedRedis) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    port = free_port()
    env = {
        **os.environ,
        "REDIS_URL": redis_server.url,
        "INTERAKT_API_KEY": API_KEY,
        "INTERAKT_BASE_URL": "http://127.0.0.1:9/v1/public",  # never called by a verify
        "OTP_SECRET": SECRET.decode(),
        "OTP_GRPC_ADDRESS": f"127.0.0.1:{port}",
        "OTP_CLIENT_TOKENS": f"{CALLER}:{TOKEN}",
        # Both workers serve HTTP on one port too.
        "OTP_HTTP_ADDRESS": f"127.0.0.1:{free_port()}",
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
        workers = children_of(process.pid)
        assert len(workers) == 2
        per_worker = [established_on(pid, port) for pid in workers]
        assert sum(per_worker) == CONNECTIONS
        assert all(count > 0 for count in per_worker), per_worker
    finally:
        for channel in channels:
            channel.close()
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=15) == 0
