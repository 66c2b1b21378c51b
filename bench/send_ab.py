"""``python -m bench.send_ab [--rounds N] [--keys] A B``: server CPU, Redis round trips and Redis
memory per successful SendOtp of two versions.

A and B are git revisions (``.`` is the working tree), each served as ``otp-service serve``
(production mode, as ``bench.ab`` serves them) against one shared private Redis and bench's fake
Interakt (50 ms). Each round sends SENDS codes, IN_FLIGHT at a time, each to a number of its
own (no cooldown; the per-minute budgets are lifted as in ``make bench``); rounds alternate
between A and B, so a drift in the machine's speed shows in both. h2load cannot do this: it
sends one body, one number. With ``--keys`` each send carries an idempotency key, as the
clients' sends do (a version that predates them ignores the field). Prints each one's median
server CPU microseconds per send, with the rounds' spread, the Redis round trips per send, and
the Redis memory each pending code holds (codes outlive the run: nothing expires meanwhile).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
from pathlib import Path

import grpc
import redis
from otp.v1 import otp_pb2_grpc

from bench.__main__ import (
    AUTH,
    Processes,
    command_counts,
    cpu_seconds,
    round_trips,
    send_request,
    service_env,
    wait_listening,
)
from bench.ab import ROOT, export, known_to
from otp_service.connections.embedded_redis import EmbeddedRedis, free_port

SENDS = 1_500
IN_FLIGHT = 32


async def send_round(port: int, first: int, keys: bool) -> None:
    """SENDS sends to numbers ``first``, ``first + 1``, ...; each must succeed."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = otp_pb2_grpc.OtpServiceStub(channel)
        numbers = iter(range(first, first + SENDS))

        async def sender() -> None:
            for n in numbers:
                await stub.SendOtp(send_request(n, keyed=keys), metadata=AUTH, timeout=30)

        await asyncio.gather(*(sender() for _ in range(IN_FLIGHT)))


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.send_ab", description=__doc__)
    parser.add_argument("a")
    parser.add_argument("b")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--keys", action="store_true", help="an idempotency key on each send")
    args = parser.parse_args()
    cpu: dict[str, list[float]] = {args.a: [], args.b: []}
    trips: dict[str, list[float]] = {args.a: [], args.b: []}
    memory: dict[str, list[float]] = {args.a: [], args.b: []}
    with tempfile.TemporaryDirectory(prefix="otp-send-ab-") as tmp, EmbeddedRedis() as server:
        db = redis.Redis.from_url(server.url)
        processes = Processes(Path(tmp))
        try:
            interakt_url = processes.start_upstream().url
            served = []
            for index, name in enumerate((args.a, args.b)):
                source = export(name, Path(tmp) / f"v{index}")
                port = free_port()
                env = known_to(
                    source, service_env(server.url, interakt_url, f"127.0.0.1:{port}", "")
                )
                env["PYTHONPATH"] = os.pathsep.join([str(source), str(ROOT / "clients" / "python")])
                command = [sys.executable, "-m", "otp_service", "serve"]
                process = processes.start(f"v{index}", command, env)
                wait_listening(port)
                served.append((name, port, process.pid))
            first = 0
            for rounds in (1, args.rounds):  # a warm-up round each, not recorded
                for _ in range(rounds):
                    for name, port, pid in served:
                        before_cpu, before_calls = cpu_seconds(pid), command_counts(db)
                        before_bytes = db.info("memory")["used_memory"]
                        asyncio.run(send_round(port, first, args.keys))
                        first += SENDS
                        if rounds == 1:
                            continue
                        memory[name].append(
                            (db.info("memory")["used_memory"] - before_bytes) / SENDS
                        )
                        top = round_trips(before_calls, command_counts(db))
                        cpu[name].append((cpu_seconds(pid) - before_cpu) / SENDS * 1e6)
                        trips[name].append(top / SENDS)
        finally:
            processes.stop()
            db.close()
    for name in (args.a, args.b):
        rounds = cpu[name]
        print(
            f"SendOtp {name}: {statistics.median(rounds):.0f} us server CPU per send "
            f"[{min(rounds):.0f}-{max(rounds):.0f}], {statistics.median(trips[name]):.2f} Redis "
            f"round trips per send, {statistics.median(memory[name]):.0f} bytes of Redis per "
            "pending code"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
