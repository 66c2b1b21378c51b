"""``python -m bench [--smoke] [--rounds N] [--python-client]``: run every figure, write
bench/results/results.md and chart.png.

Everything runs on this machine in this run: a private redis-server, the fake Interakt with
50 ms latency, ``otp-service serve`` in production mode (authentication and default request
logging on), and the two empty-handler ceilings, each as its own process.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import grpc
import redis
from otp.v1 import otp_pb2

from bench import load, report
from bench.ceilings import GRPC_METHOD, HTTP_PATH
from bench.load import Sample, Target
from otp_service.embedded_redis import EmbeddedRedis, free_port
from otp_service.store import SCRIPT_COMMANDS
from tests.fake_interakt import API_KEY

RESULTS = Path(__file__).parent / "results"
TOKEN = "bench-token-0123456789abcdef"  # noqa: S105 - a benchmark-only caller token
SECRET = "bench-otp-secret-0123456789"  # noqa: S105 - a benchmark-only HMAC key
PHONE = "+917003848501"
AUTH = (("authorization", f"Bearer {TOKEN}"),)
FULL_IN_FLIGHT = 64
LIGHT_IN_FLIGHT = 1


@dataclass(frozen=True)
class Sizes:
    rounds: int
    warmup: int
    full: int  # requests per round at full load (fast routes)
    light: int  # requests per round at light load (fast routes)
    send_full: int
    send_light: int
    memory_verifies: int  # verifies between the two RSS readings, measured rounds included


FULL = Sizes(
    rounds=5,
    warmup=3000,
    full=20_000,
    light=1_500,
    send_full=2_000,
    send_light=40,
    memory_verifies=200_000,
)
SMOKE = Sizes(
    rounds=1, warmup=20, full=100, light=20, send_full=40, send_light=3, memory_verifies=200
)


@dataclass
class Figure:
    """One route at one load: its rounds and what the server spent on them."""

    route: str
    load: str
    in_flight: str
    samples: list[Sample] = field(default_factory=list)
    cpu_seconds: list[float] = field(default_factory=list)
    round_trips: float | None = None
    commands: float | None = None
    ceiling: str | None = None


class Processes:
    """The child processes of a run; all stopped on exit."""

    def __init__(self, workdir: Path) -> None:
        self._children: list[subprocess.Popen[bytes]] = []
        self._workdir = workdir

    def start(
        self,
        name: str,
        command: list[str],
        env: dict[str, str] | None = None,
        *,
        pipe: bool = False,
    ) -> subprocess.Popen[bytes]:
        """Start ``command``; its output goes to NAME.log, or to a pipe with ``pipe``."""
        with (self._workdir / f"{name}.log").open("wb") as log:
            child = subprocess.Popen(  # noqa: S603
                command,
                env=env,
                stdout=subprocess.PIPE if pipe else log,
                stderr=subprocess.STDOUT,
                cwd=Path(__file__).parent.parent,
            )
        self._children.append(child)
        return child

    def start_upstream(self) -> tuple[str, int]:
        """The fake Interakt (bench.upstream): its base URL and pid."""
        upstream = self.start("upstream", [sys.executable, "-m", "bench.upstream"], pipe=True)
        assert upstream.stdout is not None
        return upstream.stdout.readline().decode().strip(), upstream.pid

    def stop(self) -> None:
        for child in self._children:
            child.terminate()
        for child in self._children:
            try:
                child.wait(timeout=10)
            except subprocess.TimeoutExpired:
                child.kill()


def wait_listening(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process (all its threads) so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def command_counts(db: redis.Redis) -> dict[str, int]:
    """Commands Redis has run so far, by name (the INFO calls that ask, left out)."""
    stats = db.info("commandstats")
    return {
        key.removeprefix("cmdstat_"): value["calls"]
        for key, value in stats.items()
        if key != "cmdstat_info"
    }


def measure(
    figure: Figure,
    rounds: int,
    run_round: Callable[[], Sample],
    pid: int,
    db: redis.Redis | None = None,
) -> Figure:
    """Run ``rounds`` rounds, recording the server's CPU and (for the service) Redis calls."""
    before = command_counts(db) if db else {}
    for _ in range(rounds):
        cpu = cpu_seconds(pid)
        sample = run_round()
        figure.cpu_seconds.append(cpu_seconds(pid) - cpu)
        figure.samples.append(sample)
    if db:
        after = command_counts(db)
        delta = {k: after[k] - before.get(k, 0) for k in after}
        total = sum(s.requests for s in figure.samples)
        figure.commands = sum(delta.values()) / total
        figure.round_trips = sum(v for k, v in delta.items() if k not in SCRIPT_COMMANDS) / total
    return figure


def check_answers(port: int, method: str, bodies: list[bytes]) -> list[str]:
    """Send ``bodies`` with a real gRPC client: h2load counts HTTP 200, not grpc-status 0."""
    codes = []
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.unary_unary(method)
        for body in bodies:
            try:
                call(body, metadata=AUTH, timeout=10, wait_for_ready=True)
                codes.append("OK")
            except grpc.RpcError as exc:
                codes.append(f"{exc.code().name}: {exc.details()}")
    return codes


def phone(i: int) -> str:
    """The i-th of a million valid Indian mobile numbers, so every send has its own number."""
    return f"+91700{i:07d}"


def machine() -> dict[str, str]:
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor() or "unknown",
    )
    h2load_version = (
        subprocess.run(["h2load", "--version"], capture_output=True, text=True).stdout.strip()  # noqa: S607
        if load.have_h2load()
        else "not installed (Python client)"
    )
    import aiohttp
    import google.protobuf

    return {
        "CPU": model,
        "cores": str(os.cpu_count()),
        "OS": platform.platform(),
        "Python": platform.python_version(),
        "grpcio": grpc.__version__,
        "protobuf": google.protobuf.__version__,
        "redis-py": redis.__version__,
        "aiohttp": aiohttp.__version__,
        "load generator": h2load_version,
    }


def service_env(
    redis_url: str, interakt_url: str, grpc_address: str, http_address: str
) -> dict[str, str]:
    """``otp-service serve``'s environment: production mode, a caller token, default logging."""
    return {
        **os.environ,
        "REDIS_URL": redis_url,
        "INTERAKT_API_KEY": API_KEY,
        "INTERAKT_BASE_URL": interakt_url,
        "OTP_SECRET": SECRET,
        "OTP_GRPC_ADDRESS": grpc_address,
        "OTP_HTTP_ADDRESS": http_address,
        "OTP_CLIENT_TOKENS": f"bench:{TOKEN}",
        # The bench measures the service's own cost per send, far past the per-minute budgets
        # of one caller and of a real Interakt account: lift only those two.
        "OTP_CALLER_SENDS_PER_MINUTE": "100000",
        "INTERAKT_SENDS_PER_MINUTE": "100000",
    }


@contextlib.contextmanager
def services(workdir: Path) -> Iterator[dict[str, int]]:
    """Redis, fake Interakt, the service and both ceilings; yields their ports and pids."""
    processes = Processes(workdir)
    with EmbeddedRedis() as redis_server:
        try:
            base_url, upstream_pid = processes.start_upstream()
            ports = {name: free_port() for name in ("service", "gateway", "grpc", "http")}
            env = service_env(
                redis_server.url,
                base_url,
                f"127.0.0.1:{ports['service']}",
                f"127.0.0.1:{ports['gateway']}",
            )
            pids = {
                "service": processes.start(
                    "service", [sys.executable, "-m", "otp_service", "serve"], env
                ).pid,
                "grpc": processes.start(
                    "grpc", [sys.executable, "-m", "bench.ceilings", "grpc", str(ports["grpc"])]
                ).pid,
                "http": processes.start(
                    "http", [sys.executable, "-m", "bench.ceilings", "http", str(ports["http"])]
                ).pid,
            }
            for port in ports.values():
                wait_listening(port)
            yield {
                "upstream_port": urlsplit(base_url).port or 80,
                "upstream_pid": upstream_pid,
                **{f"{k}_port": v for k, v in ports.items()},
                **{f"{k}_pid": v for k, v in pids.items()},
                "redis_port": redis_server.port,
            }
        finally:
            processes.stop()


def run(sizes: Sizes, use_h2load: bool, out: Path) -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix="otp-bench-") as tmp, services(Path(tmp)) as env:
        db = redis.Redis(port=env["redis_port"])
        figures: list[Figure] = []
        checks: dict[str, list[str]] = {}
        svc, svc_pid = env["service_port"], env["service_pid"]

        def one(target: Target, body: bytes, requests: int, in_flight: int) -> Sample:
            """One round of the same request, by h2load or, without it, the Python client."""
            if use_h2load:
                return load.h2load(target, body, requests=requests, in_flight=in_flight)
            return load.python_client(
                target, [body], requests=requests, in_flight=in_flight, processes=2
            )

        def fast_route(
            route: str,
            target: Target,
            body: bytes,
            pid: int,
            ceiling: str | None,
            *,
            counted: bool,
            warm: bool = True,
        ) -> None:
            if warm:
                one(target, body, sizes.warmup, FULL_IN_FLIGHT)
            for name, requests, in_flight in (
                ("full", sizes.full, FULL_IN_FLIGHT),
                ("light", sizes.light, LIGHT_IN_FLIGHT),
            ):
                figure = Figure(route, name, str(in_flight), ceiling=ceiling)
                figures.append(
                    measure(
                        figure,
                        sizes.rounds,
                        functools.partial(one, target, body, requests, in_flight),
                        pid,
                        db if counted else None,
                    )
                )

        # VerifyOtp, the hot path: one number with a live code, a wrong code typed, so every
        # call runs the verify script's attempt counting (then its over-budget answer).
        checks["SendOtp (seed)"] = check_answers(
            svc,
            "/otp.v1.OtpService/SendOtp",
            [otp_pb2.SendOtpRequest(phone_number=PHONE).SerializeToString()],
        )
        verify_body = otp_pb2.VerifyOtpRequest(
            phone_number=PHONE, otp_code="000000"
        ).SerializeToString()
        verify = Target(svc, "/otp.v1.OtpService/VerifyOtp", grpc=True, headers=AUTH)
        fast_route("VerifyOtp", verify, verify_body, svc_pid, "empty gRPC", counted=False)
        figures.clear()  # that was the warm-up
        rss_before = rss_mib(svc_pid)
        fast_route(
            "VerifyOtp", verify, verify_body, svc_pid, "empty gRPC", counted=True, warm=False
        )
        verifies = sum(s.requests for f in figures for s in f.samples)
        if verifies < sizes.memory_verifies:
            # Unmeasured load, only so that RSS is read after as many verifies as the target says.
            extra = sizes.memory_verifies - verifies
            one(verify, verify_body, extra, FULL_IN_FLIGHT)
            verifies += extra
        rss_after = rss_mib(svc_pid)
        checks["VerifyOtp"] = check_answers(svc, verify.path, [verify_body] * 20)

        # SendOtp: every request a new number (limits are per number), so always the Python
        # client: h2load sends one body.
        send = Target(svc, "/otp.v1.OtpService/SendOtp", grpc=True, headers=AUTH)
        numbers = iter(range(1, 1_000_000))

        def send_bodies(n: int) -> list[bytes]:
            return [
                otp_pb2.SendOtpRequest(phone_number=phone(next(numbers))).SerializeToString()
                for _ in range(n)
            ]

        def sends(n: int, in_flight: int, rate: float | None = None) -> Callable[[], Sample]:
            """A round of ``n`` SendOtp calls, each to a new number."""
            return lambda: load.python_client(
                send, send_bodies(n), requests=n, in_flight=in_flight, rate=rate
            )

        def send_figure(
            name: str, label: str, n: int, in_flight: int, rate: float | None = None
        ) -> Figure:
            return measure(
                Figure("SendOtp", name, label),
                sizes.rounds,
                sends(n, in_flight, rate),
                svc_pid,
                db,
            )

        sends(sizes.send_full // 4, FULL_IN_FLIGHT)()  # warm-up
        full = send_figure("full", str(FULL_IN_FLIGHT), sizes.send_full, FULL_IN_FLIGHT)
        half_rate = statistics.median(s.rps for s in full.samples) / 2
        half = send_figure(
            "half", f"{half_rate:.0f}/s", sizes.send_full // 2, FULL_IN_FLIGHT, half_rate
        )
        # The fake Interakt alone, at the same rate: what of SendOtp's latency is upstream's.
        upstream = Target(
            env["upstream_port"],
            "/v1/public/message/",
            grpc=False,
            headers=(("Authorization", f"Basic {API_KEY}"),),
        )
        upstream_body = json.dumps(
            {
                "countryCode": "+91",
                "phoneNumber": "7003848501",
                "type": "Text",
                "data": {"message": "Your OTP for MinServe is 123456. "},
            }
        ).encode()
        alone = measure(
            Figure("fake Interakt alone", "half", f"{half_rate:.0f}/s"),
            sizes.rounds,
            lambda: load.python_client(
                upstream,
                [upstream_body],
                requests=sizes.send_full // 2,
                in_flight=FULL_IN_FLIGHT,
                rate=half_rate,
            ),
            env["upstream_pid"],
        )
        light = send_figure("light", str(LIGHT_IN_FLIGHT), sizes.send_light, LIGHT_IN_FLIGHT)
        figures += [full, half, light, alone]
        checks["SendOtp"] = check_answers(svc, send.path, send_bodies(5))
        fresh = phone(999_999)
        check_answers(
            svc, send.path, [otp_pb2.SendOtpRequest(phone_number=fresh).SerializeToString()]
        )
        code_bytes = sum(db.memory_usage(k) or 0 for k in db.keys(f"otp:{{{fresh}}}:*"))

        # REST verify: the legacy JSON route, through the gateway inside the same process.
        rest = Target(env["gateway_port"], "/api/v1/auth/verify-otp", grpc=False, headers=AUTH)
        rest_body = json.dumps({"phone_number": PHONE, "otp_code": "000000"}).encode()
        fast_route("REST verify", rest, rest_body, svc_pid, "empty aiohttp", counted=True)

        # The ceilings.
        empty_grpc = Target(env["grpc_port"], GRPC_METHOD, grpc=True, headers=AUTH)
        fast_route("empty gRPC", empty_grpc, b"", env["grpc_pid"], None, counted=False)
        checks["empty gRPC"] = check_answers(env["grpc_port"], GRPC_METHOD, [b""] * 5)
        empty_http = Target(env["http_port"], HTTP_PATH, grpc=False)
        fast_route("empty aiohttp", empty_http, b"{}", env["http_pid"], None, counted=False)

        results = {
            "machine": machine(),
            "figures": figures,
            "checks": checks,
            "memory": {
                "service RSS after warm-up (MiB)": rss_before,
                f"service RSS after {verifies} more verifies (MiB)": rss_after,
                "Redis bytes per pending code (MEMORY USAGE, both keys)": code_bytes,
            },
            "sizes": sizes,
            "h2load": use_h2load,
        }
        report.write(results, out)
        return results


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--smoke", action="store_true", help="tiny counts: checks it runs")
    parser.add_argument("--rounds", type=int, help="rounds per figure (default 5)")
    parser.add_argument("--python-client", action="store_true", help="do not use h2load")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where results go")
    args = parser.parse_args()
    sizes = SMOKE if args.smoke else FULL
    if args.rounds:
        sizes = Sizes(**{**sizes.__dict__, "rounds": args.rounds})
    use_h2load = load.have_h2load() and not args.python_client
    if not use_h2load:
        print("bench: h2load not found, using the Python load client", file=sys.stderr)
    args.out.mkdir(parents=True, exist_ok=True)
    results = run(sizes, use_h2load, args.out)
    print((args.out / "results.md").read_text())
    bad = {k: v for k, v in results["checks"].items() if any(c != "OK" for c in v)}  # type: ignore[union-attr]
    if bad:
        print(f"bench: some sampled answers were not grpc-status 0: {bad}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
