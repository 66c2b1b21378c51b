"""``python -m bench.ab [--rest] [--rounds N] A B``: server CPU per request of two versions.

A and B are git revisions (``HEAD~1``, a branch; ``.`` is the working tree). Each is exported
to a temporary directory and served as ``otp-service serve`` (production mode, token, default
logging) against one shared private Redis. h2load then drives VerifyOtp (gRPC, 64 in flight) or,
with ``--rest``, the REST verify route, alternating rounds between A and B. The same load and
the same moment hit both, so a drift in the machine's speed shows in both columns, not as a
difference. Prints each one's median req/s and server CPU microseconds per request with the
rounds' spread. This is how the levers in bench/README.md were weighed. Needs h2load.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path

from otp.v1 import otp_pb2

from bench import load
from bench.__main__ import (
    AUTH,
    FULL_IN_FLIGHT,
    PHONE,
    Processes,
    check_answers,
    cpu_seconds,
    service_env,
    wait_listening,
)
from bench.load import Target
from otp_service.embedded_redis import EmbeddedRedis, free_port

ROOT = Path(__file__).parent.parent
REQUESTS = 15_000


@dataclass
class Version:
    """One version under test: its server and what its rounds measured."""

    name: str
    process: subprocess.Popen[bytes]
    target: Target
    rps: list[float] = field(default_factory=list)
    cpu_us: list[float] = field(default_factory=list)


def export(revision: str, into: Path) -> Path:
    """The service's source at ``revision`` (``.``: the working tree), as a directory."""
    if revision == ".":
        return ROOT / "service"
    command = ["git", "archive", revision, "service"]
    archive = subprocess.run(command, cwd=ROOT, check=True, capture_output=True).stdout  # noqa: S603
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return into / "service"


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
    else:
        body = otp_pb2.VerifyOtpRequest(phone_number=PHONE, otp_code="000000").SerializeToString()
    with (
        tempfile.TemporaryDirectory(prefix="otp-ab-") as tmp,
        EmbeddedRedis() as redis_server,
    ):
        processes = Processes(Path(tmp))
        try:
            interakt_url, _ = processes.start_upstream()
            versions: list[Version] = []
            for name in (args.a, args.b):
                source = export(name, Path(tmp) / f"v{len(versions)}")
                grpc_port, http_port = free_port(), free_port()
                env = service_env(
                    redis_server.url,
                    interakt_url,
                    f"127.0.0.1:{grpc_port}",
                    f"127.0.0.1:{http_port}" if args.rest else "",
                )
                env["PYTHONPATH"] = os.pathsep.join([str(source), str(ROOT / "clients" / "python")])
                command = [sys.executable, "-m", "otp_service", "serve"]
                process = processes.start(f"v{len(versions)}", command, env)
                target = (
                    Target(http_port, "/api/v1/auth/verify-otp", grpc=False, headers=AUTH)
                    if args.rest
                    else Target(grpc_port, "/otp.v1.OtpService/VerifyOtp", grpc=True, headers=AUTH)
                )
                versions.append(Version(name, process, target))
                wait_listening(target.port)
                wait_listening(grpc_port)
            # A live code, so each verify runs the attempt counting, as in `make bench`.
            send = otp_pb2.SendOtpRequest(phone_number=PHONE).SerializeToString()
            if check_answers(grpc_port, "/otp.v1.OtpService/SendOtp", [send]) != ["OK"]:
                raise RuntimeError("could not send the seed code")
            for version in versions:
                load.h2load(version.target, body, requests=5_000, in_flight=FULL_IN_FLIGHT)
            for _ in range(args.rounds):
                for version in versions:
                    before = cpu_seconds(version.process.pid)
                    sample = load.h2load(
                        version.target, body, requests=REQUESTS, in_flight=FULL_IN_FLIGHT
                    )
                    used = cpu_seconds(version.process.pid) - before
                    version.cpu_us.append(used / sample.requests * 1e6)
                    version.rps.append(sample.rps)
        finally:
            processes.stop()
    route = "REST verify" if args.rest else "VerifyOtp"
    for version in versions:
        cpu = version.cpu_us
        print(
            f"{route} {version.name}: {statistics.median(version.rps):,.0f} req/s, "
            f"{statistics.median(cpu):.0f} us CPU per request [{min(cpu):.0f}-{max(cpu):.0f}]"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
