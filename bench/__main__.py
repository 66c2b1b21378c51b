"""``python -m bench [--smoke] [--rounds N] [--python-client] [--out DIR]``: run every figure,
write results.md and chart.png: into bench/results/ (the committed figures), or with
``--smoke`` into a new temporary directory, so a smoke run never overwrites them.

Everything runs on this machine in this run, each as its own process: a private redis-server,
the fake Interakt with 50 ms latency, ``otp-service serve`` in production mode (authentication
and default request logging on), and the references it is compared with (``bench.references``):
the empty handlers and the Redis references, gRPC and aiohttp. Servers compared with each other
take their rounds in turn, so that a drift in the machine's speed hits them all alike.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
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
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import grpc
import redis
from otp.v1 import otp_pb2

from bench import load, report
from bench.load import Sample, Shape, Target
from bench.references import GRPC_METHOD, HTTP_PATH, VERIFY_METHOD, VERIFY_PATH
from otp_service.connections.embedded_redis import EmbeddedRedis, free_port
from otp_service.store import SCRIPT_COMMANDS
from tests.fake_interakt import API_KEY
from tests.redis_deployments import RedisProcess, wait_until

RESULTS = Path(__file__).parent / "results"
TOKEN = "bench-token-0123456789abcdef"  # noqa: S105 - a benchmark-only caller token
SECRET = "bench-otp-secret-0123456789"  # noqa: S105 - a benchmark-only HMAC key
PHONE = "+917003848501"
AUTH = (("authorization", f"Bearer {TOKEN}"),)
SEND_METHOD = "/otp.v1.OtpService/SendOtp"

# The loads. gRPC: the two h2load shapes (-c connections, -m streams each); REST
# (HTTP/1.1, one request in flight per connection): 64 connections. Every fast route also runs
# at 1 in flight, and paced at half of its own peak (the last shape, at a fixed rate).
GRPC_SHAPES = (Shape("c16 m8", 16, 8), Shape("c4 m16", 4, 16))
REST_SHAPES = (Shape("64 conns", 64),)
LIGHT = Shape("light", 1)
HALF = "half"
SEND_FULL = Shape("full", 64)  # SendOtp: the Python client, 64 in flight

# The routes and references, as the tables name them, and how bench.references starts each.
VERIFY = "VerifyOtp"
# The same, with OTP_REDIS_REPLICA_ACKS=1: each verify waits for a replica (its own Redis pair).
VERIFY_ACKED = "VerifyOtp, 1 replica ack"
SEND = "SendOtp"
REST = "REST verify"
UPSTREAM = "fake Interakt alone"
EMPTY_GRPC = "empty gRPC"
GRPC_REDIS = "gRPC Redis reference"
GRPC_PROTOCOL = "gRPC Redis reference, minimal Protocol"
EMPTY_HTTP = "empty aiohttp"
HTTP_REDIS = "aiohttp Redis reference"
REFERENCES = {
    EMPTY_GRPC: "empty-grpc",
    GRPC_REDIS: "grpc-redis",
    GRPC_PROTOCOL: "grpc-protocol",
    EMPTY_HTTP: "empty-http",
    HTTP_REDIS: "http-redis",
}


@dataclass(frozen=True)
class Ratio:
    """A route's throughput over a reference's, round by round (context: no target)."""

    route: str
    reference: str


RATIOS = (
    Ratio(VERIFY, GRPC_REDIS),
    Ratio(GRPC_REDIS, GRPC_PROTOCOL),
    Ratio(REST, HTTP_REDIS),
    Ratio(VERIFY, EMPTY_GRPC),
    Ratio(GRPC_REDIS, EMPTY_GRPC),
    Ratio(REST, EMPTY_HTTP),
    Ratio(HTTP_REDIS, EMPTY_HTTP),
    Ratio(VERIFY_ACKED, VERIFY),
)


@dataclass(frozen=True)
class Sizes:
    rounds: int
    warmup: int  # requests per server before its first round (fast routes)
    full: int  # requests per round at each peak shape (fast routes)
    light: int  # requests per round at light load (fast routes)
    half_seconds: float  # about how long a round at half of peak lasts (fast routes)
    send_full: int
    send_light: int
    send_split: int  # sends one by one, their Redis commands split at the upstream's arrival
    memory_verifies: int  # verifies between the two RSS readings, measured rounds included


FULL = Sizes(
    rounds=8,
    warmup=10_000,
    full=20_000,
    light=1_500,
    half_seconds=2.0,
    send_full=2_000,
    send_light=40,
    send_split=40,
    memory_verifies=200_000,
)
SMOKE = Sizes(
    rounds=1,
    warmup=20,
    full=100,
    light=20,
    half_seconds=0.05,
    send_full=40,
    send_light=3,
    send_split=3,
    memory_verifies=200,
)


@dataclass
class Figure:
    """One route at one load: its rounds and what the server spent on them."""

    route: str
    load: str  # the shape's name
    in_flight: str  # what the load means: requests in flight, or the paced rate
    samples: list[Sample] = field(default_factory=list)
    cpu_seconds: list[float] = field(default_factory=list)
    redis_counted: bool = False
    round_trip_calls: int = 0  # top-level Redis commands during its rounds
    redis_calls: int = 0  # the same, with the commands our scripts run inside Redis

    @property
    def requests(self) -> int:
        return sum(s.requests for s in self.samples)

    @property
    def round_trips(self) -> float | None:
        return self.round_trip_calls / self.requests if self.redis_counted else None

    @property
    def commands(self) -> float | None:
        return self.redis_calls / self.requests if self.redis_counted else None


@dataclass(frozen=True)
class Contestant:
    """What one round of a figure runs, on which server process; ``db``: count its commands."""

    figure: Figure
    run_round: Callable[[], Sample]
    pid: int
    db: redis.Redis | None = None


@dataclass(frozen=True)
class Server:
    """A server under load: where its requests go, what they carry, its process."""

    route: str
    target: Target
    body: bytes
    pid: int
    uses_redis: bool
    db: redis.Redis | None = None  # its Redis, when not the run's main one


@dataclass(frozen=True)
class Upstream:
    """The fake Interakt: its base URL, where its notes are (bench.upstream), its pid."""

    url: str
    notes_url: str
    pid: int

    def notes(self) -> list[dict[str, Any]]:
        """The notes it took on each message since the last call."""
        with urllib.request.urlopen(self.notes_url, timeout=10) as answer:  # noqa: S310
            notes: list[dict[str, Any]] = json.loads(answer.read())
            return notes

    def count_commands(self, on: bool) -> None:
        """Whether its notes hold the Redis command counts as each message arrived."""
        # A loopback http:// URL of ours.
        request = urllib.request.Request(  # noqa: S310
            self.notes_url, data=b"1" if on else b"0", method="PUT"
        )
        with urllib.request.urlopen(request, timeout=10):  # noqa: S310
            pass


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

    def start_upstream(self, redis_port: int | None = None) -> Upstream:
        """The fake Interakt (bench.upstream); given ``redis_port``, it can count that Redis'
        commands as each message arrives."""
        command = [sys.executable, "-m", "bench.upstream"]
        upstream = self.start(
            "upstream", [*command, *([str(redis_port)] if redis_port else [])], pipe=True
        )
        assert upstream.stdout is not None
        url, notes_url = (upstream.stdout.readline().decode().strip() for _ in range(2))
        return Upstream(url, notes_url, upstream.pid)

    def stop(self) -> None:
        for child in self._children:
            child.terminate()
        for child in self._children:
            try:
                child.wait(timeout=10)
            except subprocess.TimeoutExpired:
                child.kill()


def wait_listening(port: int, timeout: float = 60.0) -> None:
    # A minute: a run starts nine Python servers at once, which on a busy 2-core machine (other
    # test suites running) took more than 20 s.
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


def tree_cpu_seconds(pid: int) -> float:
    """CPU of a process and of its live children (``serve --workers N`` forks N) so far."""
    total = cpu_seconds(pid)
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):  # a process that ended meanwhile
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                total += tree_cpu_seconds(int(stat.parent.name))
    return total


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


# Not a request's: the INFO calls that count, and the PING of the servers' readiness check, once
# a second whatever the load (otp_service.readiness).
NOT_A_REQUESTS = frozenset({"info", "ping"})


def round_trips(before: dict[str, int], after: dict[str, int]) -> int:
    """Top-level commands run between two counts: not the commands our scripts run inside
    Redis, nor those of no request (``NOT_A_REQUESTS``)."""
    return sum(
        n - before.get(command, 0)
        for command, n in after.items()
        if command not in NOT_A_REQUESTS and command not in SCRIPT_COMMANDS
    )


def settled_counts(db: redis.Redis, quiet: float = 0.02) -> dict[str, int]:
    """The command counts once no command has run for ``quiet`` seconds: what a send does after
    its answer (inline or in a task) has been done."""
    counts = command_counts(db)
    while True:
        time.sleep(quiet)
        again = command_counts(db)
        if again == counts:
            return counts
        counts = again


def record(contestant: Contestant) -> None:
    """Run one round, recording the server's CPU and, with ``db``, the Redis commands run."""
    figure, db = contestant.figure, contestant.db
    before = command_counts(db) if db else {}
    cpu = tree_cpu_seconds(contestant.pid)
    sample = contestant.run_round()
    figure.cpu_seconds.append(tree_cpu_seconds(contestant.pid) - cpu)
    figure.samples.append(sample)
    if db:
        after = command_counts(db)
        delta = {k: after[k] - before.get(k, 0) for k in after}
        figure.redis_counted = True
        figure.redis_calls += sum(v for k, v in delta.items() if k not in NOT_A_REQUESTS)
        figure.round_trip_calls += round_trips(before, after)


def interleave(rounds: int, bouts: Sequence[Sequence[Contestant]]) -> None:
    """Run ``rounds`` rounds of every bout; in a round, a bout's contestants run one by one.

    The contestants of one bout are compared with each other: each round, every one of them runs
    once, the first of them moving on by one each round, so that a drift in the machine's speed
    (other work on it, a warming cache) hits them all alike and no one always follows the same.
    """
    for number in range(rounds):
        for bout in bouts:
            first = number % len(bout)
            for contestant in [*bout[first:], *bout[:first]]:
                record(contestant)


def time_split(samples: Sequence[Sample], notes: list[dict[str, Any]]) -> dict[str, list[int]]:
    """Where each send's time went, in microseconds (sorted), from outside the service: before
    the upstream (the client's start -> the fake Interakt's arrival), the upstream's own (arrival
    -> its answer), after it (its answer -> the client has the response), and the whole; each
    send matched to its message by number (every send has its own)."""
    by_phone = {note["phone"]: note for note in notes}
    split: dict[str, list[int]] = {"before": [], "upstream": [], "after": [], "whole": []}
    for sample in samples:
        for body, start, end in sample.spans:
            note = by_phone.get(otp_pb2.SendOtpRequest.FromString(body).phone_number)
            if note is None:  # failed before reaching Interakt: counted in "failed"
                continue
            arrived, answered = note["arrived"], note["answered"]
            for part, seconds in (
                ("before", arrived - start),
                ("upstream", answered - arrived),
                ("after", end - answered),
                ("whole", end - start),
            ):
                split[part].append(round(seconds * 1e6))
    return {part: sorted(times) for part, times in split.items()}


def grpc_answer(port: int, method: str, body: bytes) -> bytes:
    """The serialized answer to one gRPC call (with the caller token); raises grpc.RpcError."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        answer: bytes = channel.unary_unary(method)(
            body, metadata=AUTH, timeout=10, wait_for_ready=True
        )
        return answer


def json_answer(port: int, path: str, body: bytes) -> tuple[int, Any]:
    """The HTTP status and parsed JSON answer to one POST (with the caller token).

    A 4xx is an answer too: the legacy verify route gives one to a code that did not verify.
    """
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}",
        data=body,
        headers={"Content-Type": "application/json", **dict(AUTH)},
    )
    try:
        # A loopback http:// URL of ours.
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, json.loads(exc.read())


def check(
    call: Callable[[bytes], object], bodies: list[bytes], expected: object = None
) -> list[str]:
    """A verdict per body: "OK" when answered with success (and, given ``expected``, with it)."""
    codes = []
    for body in bodies:
        try:
            answer = call(body)
        except grpc.RpcError as exc:
            codes.append(f"{exc.code().name}: {exc.details()}")
        else:
            ok = expected is None or answer == expected
            codes.append("OK" if ok else f"answered {answer!r}, not {expected!r}")
    return codes


def check_answers(
    port: int, method: str, bodies: list[bytes], expected: bytes | None = None
) -> list[str]:
    """Send ``bodies`` with a real gRPC client: h2load counts HTTP 200, not grpc-status 0."""
    return check(functools.partial(grpc_answer, port, method), bodies, expected)


def phone(i: int) -> str:
    """The i-th of a million valid Indian mobile numbers, so every send has its own number."""
    return f"+91700{i:07d}"


def send_request(i: int, *, keyed: bool = False) -> otp_pb2.SendOtpRequest:
    """A send to the i-th number; ``keyed``: with an idempotency key of its own, as the clients
    send."""
    return otp_pb2.SendOtpRequest(
        phone_number=phone(i), idempotency_key=f"bench-{i}" if keyed else ""
    )


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
        "INTERAKT_CHANNEL": "text",
        "INTERAKT_BASE_URL": interakt_url,
        "OTP_SECRET": SECRET,
        "OTP_GRPC_ADDRESS": grpc_address,
        "OTP_HTTP_ADDRESS": http_address,
        "OTP_CLIENT_TOKENS": f"bench:{TOKEN}",
        # The bench measures the service's own cost per send, far past the per-minute budgets
        # of one caller and of a real Interakt account: lift only those two.
        "OTP_CALLER_SENDS_PER_MINUTE": "100000",
        "INTERAKT_SENDS_PER_MINUTE": "100000",
        # The code sent before the verifies must outlive the run, so that every verify takes
        # the same path through the script; how long a code lives costs nothing per request.
        "OTP_TTL_SECONDS": "86400",
    }


@dataclass(frozen=True)
class Running:
    """The processes of a run, by name: "service", "gateway" (the service's own JSON gateway:
    same process), "upstream" (the fake Interakt) and each reference's route name."""

    ports: dict[str, int]
    pids: dict[str, int]
    upstream: Upstream
    redis_port: int
    acked_redis_port: int  # the primary, with a replica, of "service-acks"


@contextlib.contextmanager
def services(workdir: Path) -> Iterator[Running]:
    """Redis, the fake Interakt, the service and every reference, until the block ends; and
    "service-acks", the service with OTP_REDIS_REPLICA_ACKS=1 on a primary and replica of its own.
    """
    processes = Processes(workdir)
    with EmbeddedRedis() as redis_server, EmbeddedRedis() as acked_redis:
        replica = RedisProcess("--replicaof", "127.0.0.1", str(acked_redis.port))
        try:
            with replica.start().client() as client:
                wait_until(lambda: client.info("replication")["master_link_status"] == "up", "sync")
            upstream = processes.start_upstream(redis_server.port)
            base_url = upstream.url
            names = ("service", "gateway", "service-acks", *REFERENCES)
            ports = {name: free_port() for name in names}
            # The references read the service's configuration, so they get its environment.
            env = service_env(
                redis_server.url,
                base_url,
                f"127.0.0.1:{ports['service']}",
                f"127.0.0.1:{ports['gateway']}",
            )
            command = [sys.executable, "-m", "otp_service", "serve"]
            service = processes.start("service", command, env).pid
            pids = {"service": service, "gateway": service, "upstream": upstream.pid}
            acks_env = {
                **service_env(acked_redis.url, base_url, f"127.0.0.1:{ports['service-acks']}", ""),
                "OTP_REDIS_REPLICA_ACKS": "1",
            }
            pids["service-acks"] = processes.start("service-acks", command, acks_env).pid
            for route, kind in REFERENCES.items():
                command = [sys.executable, "-m", "bench.references", kind, str(ports[route])]
                pids[route] = processes.start(kind, command, env).pid
            for port in ports.values():
                wait_listening(port)
            ports["upstream"] = urlsplit(base_url).port or 80
            yield Running(ports, pids, upstream, redis_server.port, acked_redis.port)
        finally:
            processes.stop()
            replica.close()


def run(sizes: Sizes, use_h2load: bool, out: Path) -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix="otp-bench-") as tmp, services(Path(tmp)) as running:
        db = redis.Redis(port=running.redis_port)
        figures: list[Figure] = []
        checks: dict[str, list[str]] = {}
        svc, svc_pid = running.ports["service"], running.pids["service"]

        def server(
            name: str, route: str, path: str, body: bytes, *, over_grpc: bool, answer: int = 200
        ) -> Server:
            """Process ``name`` serving ``route`` at ``path``, answering with HTTP ``answer``."""
            target = Target(running.ports[name], path, grpc=over_grpc, headers=AUTH, answer=answer)
            uses_redis = route not in (EMPTY_GRPC, EMPTY_HTTP)
            return Server(route, target, body, running.pids[name], uses_redis)

        def one(target: Target, body: bytes, requests: int, shape: Shape) -> Sample:
            return load.same_request(
                target, body, requests=requests, shape=shape, use_h2load=use_h2load
            )

        def warm_up(servers: list[Server], shape: Shape) -> None:
            for server in servers:
                one(server.target, server.body, sizes.warmup, shape)

        def compare(servers: list[Server], shapes: Sequence[Shape]) -> list[Figure]:
            """Every server at every shape and at light load, their rounds interleaved; then
            each at half of its own peak (the best median of the shapes), interleaved again."""

            def contestant(server: Server, shape: Shape, requests: int, label: str) -> Contestant:
                figure = Figure(server.route, shape.name, label)
                run_round = functools.partial(one, server.target, server.body, requests, shape)
                counted = server.db or (db if server.uses_redis else None)
                return Contestant(figure, run_round, server.pid, counted)

            bouts = [
                [contestant(s, shape, sizes.full, str(shape.in_flight)) for s in servers]
                for shape in shapes
            ]
            bouts.append([contestant(s, LIGHT, sizes.light, str(LIGHT.in_flight)) for s in servers])
            interleave(sizes.rounds, bouts)
            half = []
            for k, server in enumerate(servers):
                peak = max(
                    statistics.median(s.rps for s in b[k].figure.samples) for b in bouts[:-1]
                )
                rate = peak / 2
                requests = max(sizes.light, round(rate * sizes.half_seconds))
                shape = shapes[-1].paced(HALF, rate)
                half.append(contestant(server, shape, requests, f"{rate:,.0f}/s"))
            interleave(sizes.rounds, [half])
            return [c.figure for b in [*bouts, half] for c in b]

        # VerifyOtp, the hot path: one number with a live code, a wrong code typed, so every
        # call runs the verify script's attempt counting (then its over-budget answer).
        seed = [otp_pb2.SendOtpRequest(phone_number=PHONE).SerializeToString()]
        checks["SendOtp (seed)"] = check_answers(svc, SEND_METHOD, seed)
        acked = running.ports["service-acks"]
        checks["SendOtp (seed, 1 replica ack)"] = check_answers(acked, SEND_METHOD, seed)
        verify_body = otp_pb2.VerifyOtpRequest(
            phone_number=PHONE, otp_code="000000"
        ).SerializeToString()

        grpc_servers = [
            server("service", VERIFY, VERIFY_METHOD, verify_body, over_grpc=True),
            server(GRPC_REDIS, GRPC_REDIS, VERIFY_METHOD, verify_body, over_grpc=True),
            server(GRPC_PROTOCOL, GRPC_PROTOCOL, VERIFY_METHOD, verify_body, over_grpc=True),
            server(EMPTY_GRPC, EMPTY_GRPC, GRPC_METHOD, b"", over_grpc=True),
            dataclasses.replace(
                server("service-acks", VERIFY_ACKED, VERIFY_METHOD, verify_body, over_grpc=True),
                db=redis.Redis(port=running.acked_redis_port),
            ),
        ]
        warm_up(grpc_servers, GRPC_SHAPES[-1])
        # The memory figures: RSS once warm, and again after the rounds (topped up to as many
        # verifies as the target says).
        rss_before = rss_mib(svc_pid)
        grpc_figures = compare(grpc_servers, GRPC_SHAPES)
        figures += grpc_figures
        verifies = sum(f.requests for f in grpc_figures if f.route == VERIFY)
        if verifies < sizes.memory_verifies:
            extra = sizes.memory_verifies - verifies
            one(grpc_servers[0].target, verify_body, extra, GRPC_SHAPES[-1])
            verifies += extra
        rss_after = rss_mib(svc_pid)
        # The references must answer exactly as the service does: same script, same path.
        service_answer = grpc_answer(svc, VERIFY_METHOD, verify_body)
        checks[VERIFY] = check_answers(svc, VERIFY_METHOD, [verify_body] * 20)
        for reference in grpc_servers[1:]:
            port, path = reference.target.port, reference.target.path
            expected = service_answer if reference.uses_redis else None
            checks[reference.route] = check_answers(port, path, [reference.body] * 5, expected)

        # SendOtp: every request a new number (limits are per number), so always the Python
        # client: h2load sends one body.
        send = Target(svc, SEND_METHOD, grpc=True, headers=AUTH)
        numbers = iter(range(1, 1_000_000))

        def send_bodies(n: int) -> list[bytes]:
            return [send_request(next(numbers)).SerializeToString() for _ in range(n)]

        def sends(n: int, shape: Shape) -> Callable[[], Sample]:
            """A round of ``n`` SendOtp calls, each to a new number."""
            return lambda: load.python_client(send, send_bodies(n), requests=n, shape=shape)

        def send_figure(shape: Shape, label: str, n: int) -> Figure:
            figure = Figure(SEND, shape.name, label)
            interleave(sizes.rounds, [[Contestant(figure, sends(n, shape), svc_pid, db)]])
            return figure

        sends(sizes.send_full // 4, SEND_FULL)()  # warm-up
        full = send_figure(SEND_FULL, str(SEND_FULL.in_flight), sizes.send_full)
        half_rate = statistics.median(s.rps for s in full.samples) / 2
        half_shape = SEND_FULL.paced(HALF, half_rate)
        # At half of its peak, SendOtp and the fake Interakt alone at the same rate take their
        # rounds in turn: what of SendOtp's latency is upstream's.
        half = Figure(SEND, HALF, f"{half_rate:,.0f}/s")
        upstream = Target(
            running.ports["upstream"],
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
        alone = Figure(UPSTREAM, HALF, f"{half_rate:,.0f}/s")
        upstream_round = functools.partial(
            load.python_client,
            upstream,
            [upstream_body],
            requests=sizes.send_full // 2,
            shape=half_shape,
        )
        running.upstream.notes()  # forget the messages so far
        half_sends = sends(sizes.send_full // 2, half_shape)
        interleave(
            sizes.rounds,
            [
                [
                    Contestant(half, half_sends, svc_pid, db),
                    Contestant(alone, upstream_round, running.pids["upstream"]),
                ]
            ],
        )
        send_split = time_split(half.samples, running.upstream.notes())
        light = send_figure(LIGHT, str(LIGHT.in_flight), sizes.send_light)
        figures += [full, half, light, alone]
        checks[SEND] = check_answers(svc, SEND_METHOD, send_bodies(5))

        # SendOtp's Redis round trips before the upstream and after it: sends one at a time,
        # each to a new number, the fake Interakt taking Redis' command counts as each message
        # arrives; each send's count is taken once its commands are done (inline or not).
        running.upstream.count_commands(True)
        running.upstream.notes()  # forget the messages so far
        trips: dict[str, list[int]] = {"before": [], "after": []}
        one_by_one = checks["SendOtp (one at a time)"] = []
        counts = settled_counts(db)
        for body in send_bodies(sizes.send_split):
            one_by_one += check_answers(svc, SEND_METHOD, [body])
            settled = settled_counts(db)
            notes = running.upstream.notes()
            if len(notes) != 1:
                raise RuntimeError(f"one send, {len(notes)} messages to Interakt: {one_by_one}")
            at_upstream = notes[0]["commands"]
            trips["before"].append(round_trips(counts, at_upstream))
            trips["after"].append(round_trips(at_upstream, settled))
            counts = settled
        running.upstream.count_commands(False)

        # Redis bytes per pending code: every key one send leaves, on both slots (the number's
        # and the senders'), without an idempotency key and with one.
        def code_bytes(request: otp_pb2.SendOtpRequest) -> int:
            before = set(db.keys())
            checks["SendOtp (memory)"] += check_answers(
                svc, SEND_METHOD, [request.SerializeToString()]
            )
            settled_counts(db)
            return sum(db.memory_usage(key) or 0 for key in set(db.keys()) - before)

        checks["SendOtp (memory)"] = []
        pending = {
            "without a key": code_bytes(send_request(999_999)),
            "with a key": code_bytes(send_request(999_998, keyed=True)),
        }

        # REST verify: the legacy JSON route, through the gateway inside the same process.
        rest_body = json.dumps({"phone_number": PHONE, "otp_code": "000000"}).encode()
        # The number's wrong tries are spent by now: the route answers TOO_MANY_ATTEMPTS with a
        # 429 (only a verified code is a 2xx there), and the reference must answer the same.
        gateway_answer = json_answer(running.ports["gateway"], VERIFY_PATH, rest_body)
        status = gateway_answer[0]
        rest_servers = [
            server("gateway", REST, VERIFY_PATH, rest_body, over_grpc=False, answer=status),
            server(HTTP_REDIS, HTTP_REDIS, VERIFY_PATH, rest_body, over_grpc=False, answer=status),
            server(EMPTY_HTTP, EMPTY_HTTP, HTTP_PATH, b"{}", over_grpc=False),
        ]
        warm_up(rest_servers, REST_SHAPES[-1])
        figures += compare(rest_servers, REST_SHAPES)
        for rest_server in rest_servers:
            post = functools.partial(json_answer, rest_server.target.port, rest_server.target.path)
            expected = gateway_answer if rest_server.uses_redis else (200, {})
            checks[rest_server.route] = check(post, [rest_server.body] * 5, expected)

        results = {
            "machine": machine(),
            "figures": figures,
            "ratios": RATIOS,
            "peak_loads": [shape.name for shape in (*GRPC_SHAPES, *REST_SHAPES)],
            "checks": checks,
            "memory": {
                "service RSS after warm-up (MiB)": rss_before,
                f"service RSS after {verifies} more verifies (MiB)": rss_after,
                **{
                    f"Redis bytes per pending code, {key} (MEMORY USAGE, every key a send "
                    "leaves)": size
                    for key, size in pending.items()
                },
            },
            "targets": {
                "round_trips": trips,
                "pending_bytes": pending,
                "rss_mib": (rss_before, rss_after, verifies),
                "send_split": send_split,
            },
            "sizes": sizes,
            "h2load": use_h2load,
        }
        report.write(results, out)
        return results


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--smoke", action="store_true", help="tiny counts: checks it runs")
    parser.add_argument("--rounds", type=int, help=f"rounds per figure (default {FULL.rounds})")
    parser.add_argument("--python-client", action="store_true", help="do not use h2load")
    parser.add_argument(
        "--out",
        type=Path,
        help="where results go (default: bench/results, with --smoke a new temporary directory)",
    )
    args = parser.parse_args()
    if args.out is None:
        args.out = Path(tempfile.mkdtemp(prefix="otp-bench-smoke-")) if args.smoke else RESULTS
    sizes = SMOKE if args.smoke else FULL
    if args.rounds:
        sizes = dataclasses.replace(sizes, rounds=args.rounds)
    use_h2load = load.have_h2load() and not args.python_client
    if not use_h2load:
        print("bench: h2load not found, using the Python load client", file=sys.stderr)
    args.out.mkdir(parents=True, exist_ok=True)
    results = run(sizes, use_h2load, args.out)
    return finish("bench", args.out / "results.md", args.out, results["checks"])  # type: ignore[arg-type]


def finish(name: str, table: Path, written: Path, checks: dict[str, list[str]]) -> int:
    """Print ``table`` and where the results went: 0 when every sampled answer was right, else 1
    and the wrong ones on stderr (h2load counts HTTP 200, not a right answer)."""
    print(table.read_text())
    print(f"{name}: results written to {written}")
    bad = {k: v for k, v in checks.items() if any(c != "OK" for c in v)}
    if bad:
        print(f"{name}: some sampled answers were wrong: {bad}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
