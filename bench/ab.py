"""``python -m bench.ab [--rest] [--rounds N] A B``: server CPU per request of two versions.

A and B are git revisions (``HEAD~1``, a branch; ``.`` is the working tree). Each is exported
to a temporary directory and served as ``otp-service serve`` (production mode, token, default
logging) against one shared private Redis. h2load then drives VerifyOtp (gRPC, ``c4 m16``: 64 in
flight) or, with ``--rest``, the REST verify route (64 connections), alternating rounds between
A and B as ``make bench`` does (``bench.__main__.interleave``). The same load and the same
moment hit both, so a drift in the machine's speed shows in both columns, not as a difference.
Prints each one's median req/s and server CPU microseconds per request with the rounds' spread.
This is how the levers in bench/README.md were weighed. Needs h2load.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
from io import BytesIO
from pathlib import Path

from otp.v1 import otp_pb2

from bench import load
from bench.__main__ import (
    AUTH,
    GRPC_SHAPES,
    PHONE,
    REST_SHAPES,
    SEND_METHOD,
    Contestant,
    Figure,
    Processes,
    check_answers,
    interleave,
    service_env,
    wait_listening,
)
from bench.load import Target
from bench.references import VERIFY_METHOD, VERIFY_PATH
from otp_service.connections.embedded_redis import EmbeddedRedis, free_port

ROOT = Path(__file__).parent.parent
REQUESTS = 15_000


def export(revision: str, into: Path) -> Path:
    """The service's source at ``revision`` (``.``: the working tree), as a directory."""
    if revision == ".":
        return ROOT / "service"
    command = ["git", "archive", revision, "service"]
    archive = subprocess.run(command, cwd=ROOT, check=True, capture_output=True).stdout  # noqa: S603
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return into / "service"


def known_to(source: Path, env: dict[str, str]) -> dict[str, str]:
    """``env`` without the service's variables that the revision at ``source`` does not read:
    it refuses an unknown one, so a revision older than a variable could not be weighed."""
    config = (source / "otp_service" / "config.py").read_text()
    return {
        name: value
        for name, value in env.items()
        if not name.startswith(("OTP_", "INTERAKT_")) or f'"{name}"' in config
    }


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ab", description=__doc__)
    parser.add_argument("a")
    parser.add_argument("b")
    parser.add_argument("--rest", action="store_true", help="REST verify instead of gRPC")
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    if not load.have_h2load():
        parser.error("h2load is needed: apt-get install nghttp2-client (make bench does it)")

    if args.rest:
        body = json.dumps({"phone_number": PHONE, "otp_code": "000000"}).encode()
        shape = REST_SHAPES[-1]
    else:
        body = otp_pb2.VerifyOtpRequest(phone_number=PHONE, otp_code="000000").SerializeToString()
        shape = GRPC_SHAPES[-1]
    route = "REST verify" if args.rest else "VerifyOtp"
    with (
        tempfile.TemporaryDirectory(prefix="otp-ab-") as tmp,
        EmbeddedRedis() as redis_server,
    ):
        processes = Processes(Path(tmp))
        try:
            interakt_url = processes.start_upstream().url
            versions: list[Contestant] = []
            for name in (args.a, args.b):
                source = export(name, Path(tmp) / f"v{len(versions)}")
                grpc_port, http_port = free_port(), free_port()
                env = service_env(
                    redis_server.url,
                    interakt_url,
                    f"127.0.0.1:{grpc_port}",
                    f"127.0.0.1:{http_port}" if args.rest else "",
                )
                env = known_to(source, env)
                env["PYTHONPATH"] = os.pathsep.join([str(source), str(ROOT / "clients" / "python")])
                command = [sys.executable, "-m", "otp_service", "serve"]
                process = processes.start(f"v{len(versions)}", command, env)
                target = (
                    Target(http_port, VERIFY_PATH, grpc=False, headers=AUTH)
                    if args.rest
                    else Target(grpc_port, VERIFY_METHOD, grpc=True, headers=AUTH)
                )
                wait_listening(target.port)
                wait_listening(grpc_port)
                run_round = functools.partial(
                    load.h2load, target, body, requests=REQUESTS, shape=shape
                )
                versions.append(
                    Contestant(Figure(f"{route} {name}", shape.name, ""), run_round, process.pid)
                )
            # A live code, so each verify runs the attempt counting, as in `make bench`.
            send = otp_pb2.SendOtpRequest(phone_number=PHONE).SerializeToString()
            if check_answers(grpc_port, SEND_METHOD, [send]) != ["OK"]:
                raise RuntimeError("could not send the seed code")
            for version in versions:
                version.run_round()  # warm-up, not recorded
            interleave(args.rounds, [versions])
        finally:
            processes.stop()
    for version in versions:
        figure = version.figure
        rounds = [
            cpu / sample.requests * 1e6
            for cpu, sample in zip(figure.cpu_seconds, figure.samples, strict=True)
        ]
        print(
            f"{figure.route}: {statistics.median(s.rps for s in figure.samples):,.0f} req/s, "
            f"{statistics.median(rounds):.0f} us CPU per request "
            f"[{min(rounds):.0f}-{max(rounds):.0f}]"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
