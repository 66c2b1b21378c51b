"""``python -m bench.scaling [--smoke] [--rounds N] [--out DIR]``: how many workers and replicas
one Redis feeds, measured on this machine in one run; writes scaling.md into bench/results/ (with
``--smoke``, tiny counts, into a new temporary directory) and prints it.

1. The service: ``otp-service serve --workers 1`` and ``--workers 2`` side by side on one Redis,
   their rounds interleaved (``bench.__main__.interleave``): VerifyOtp by h2load at the bench's
   peak (c16 m8), SendOtp by the Python client at 64 in flight (the fake Interakt answering in
   50 ms). Server CPU is every process of a server (the parent and the workers it forks); Redis
   CPU comes from INFO around each round, so "one worker uses X% of a Redis core".
2. One Redis alone: ``redis-benchmark`` running the service's own scripts, each command exactly
   as the service sent it (caught with MONITOR during one VerifyOtp and one SendOtp), the scripts
   loaded with SCRIPT LOAD from otp_service.store's loader. A send's keys and send id get
   ``__rand_int__`` so that each send finds a fresh number, as a new send does.
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import csv
import dataclasses
import functools
import hashlib
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import redis
from otp.v1 import otp_pb2

from bench import load, report
from bench.__main__ import (
    AUTH,
    GRPC_SHAPES,
    PHONE,
    RESULTS,
    SEND_FULL,
    SEND_METHOD,
    Contestant,
    Figure,
    Processes,
    Ratio,
    check_answers,
    finish,
    grpc_answer,
    interleave,
    machine,
    send_request,
    service_env,
    wait_listening,
)
from bench.load import Sample, Target
from bench.references import VERIFY_METHOD
from otp_service.connections.embedded_redis import EmbeddedRedis, find_redis_server, free_port
from otp_service.store.scripts import SCRIPTS

WORKERS = (1, 2)
PEAK = GRPC_SHAPES[0]  # c16 m8: the bench's peak load for VerifyOtp
VERIFY = "VerifyOtp"
SEND = "SendOtp"
# The scripts one VerifyOtp and one SendOtp run, in the order the service runs them.
VERIFY_SCRIPTS = ("verify",)
SEND_SCRIPTS = ("send", "count_send", "record_sent")
PIPELINES = (1, 16)
BENCH_CLIENTS = 8  # redis-benchmark connections: a few replicas' pipelined connections
RANDOM_RANGE = 1_000_000_000  # redis-benchmark -r: __rand_int__ takes values below it


@dataclass(frozen=True)
class Sizes:
    """How much one run does: the counts of a full run and of --smoke."""

    rounds: int
    warmup: int  # VerifyOtp requests per server before its first round
    verifies: int  # VerifyOtp requests per round
    sends: int  # SendOtp requests per round
    commands: int  # redis-benchmark requests per script and pipeline depth


FULL = Sizes(rounds=5, warmup=10_000, verifies=20_000, sends=1_500, commands=100_000)
# redis-benchmark times a run in whole milliseconds: enough commands that none takes "0 ms".
SMOKE = Sizes(rounds=1, warmup=20, verifies=100, sends=20, commands=5_000)


def route(name: str, workers: int) -> str:
    return f"{name}, {workers} worker{'s' if workers > 1 else ''}"


@dataclass
class RedisUse:
    """Redis CPU (INFO used_cpu_sys + used_cpu_user) over each round of one figure."""

    cpu_seconds: list[float] = field(default_factory=list)


def redis_cpu(db: redis.Redis) -> float:
    info = db.info("cpu")
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


def measured(db: redis.Redis, use: RedisUse, run_round: Callable[[], Sample]) -> Sample:
    """Run a round, adding the CPU Redis spent meanwhile to ``use``."""
    before = redis_cpu(db)
    sample = run_round()
    use.cpu_seconds.append(redis_cpu(db) - before)
    return sample


@dataclass(frozen=True)
class Served:
    """One ``otp-service serve --workers N`` under test."""

    workers: int
    port: int
    pid: int


@dataclass(frozen=True)
class Benchmarked:
    """One script's redis-benchmark run at one pipeline depth."""

    script: str
    pipeline: int
    per_second: float
    cpu_us: float  # Redis CPU per command, from INFO
    failed: int  # commands Redis answered with an error


def monitored(db: redis.Redis, calls: Callable[[], None]) -> list[tuple[str, ...]]:
    """Every command clients (not scripts) sent Redis while ``calls`` ran, as sent."""
    marker = f"bench-scaling-{time.monotonic_ns()}"
    commands: list[tuple[str, ...]] = []
    with db.monitor() as monitor:
        calls()
        db.echo(marker)
        while True:
            line = monitor.connection.read_response()
            text = line.decode() if isinstance(line, bytes) else str(line)
            client, arguments = re.fullmatch(r"[\d.]+ \[\d+ (\S*)\] (.*)", text).groups()  # type: ignore[union-attr]
            command = tuple(
                # MONITOR quotes each argument, escaping as C does: \" \\ \xNN.
                codecs.escape_decode(arg.encode())[0].decode()  # type: ignore[attr-defined]
                for arg in re.findall(r'"(.*?)(?<!\\)"', arguments)
            )
            if command == ("ECHO", marker):
                return commands
            if client != "lua":
                commands.append(command)


def scripts_sent(commands: list[tuple[str, ...]]) -> dict[str, tuple[str, ...]]:
    """The last EVALSHA of each of our scripts among ``commands``, by the script's name."""
    names = {
        hashlib.sha1(source.encode(), usedforsecurity=False).hexdigest(): name
        for name, source in SCRIPTS.items()
    }
    return {names[c[1]]: c for c in commands if c[0].upper() == "EVALSHA" and c[1] in names}


def randomized(command: tuple[str, ...], number: str, send_id: str) -> tuple[str, ...]:
    """``command`` with its number and send id made random per call: a fresh send each time.

    redis-benchmark draws each ``__rand_int__`` on its own, so each key of one call is of
    another number; on one Redis that costs the same as a number whose keys are all new.
    """
    return tuple(
        arg.replace(number, "+91__rand_int__").replace(send_id, "s__rand_int__") for arg in command
    )


def redis_benchmark(
    db: redis.Redis, port: int, script: str, command: tuple[str, ...], pipeline: int, n: int
) -> Benchmarked:
    """``n`` of ``command`` by redis-benchmark: its rate, Redis's CPU per command, errors."""

    def errors() -> int:
        stats = db.info("commandstats").get(f"cmdstat_{command[0].lower()}", {})
        return int(stats.get("failed_calls", 0)) + int(stats.get("rejected_calls", 0))

    failed, cpu = errors(), redis_cpu(db)
    command_line = ["redis-benchmark", "-p", str(port), "-n", str(n)]
    command_line += ["-c", str(BENCH_CLIENTS), "-P", str(pipeline), "-r", str(RANDOM_RANGE)]
    out = subprocess.run(  # noqa: S603
        [*command_line, "--csv", *command],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    cpu = redis_cpu(db) - cpu
    *_, last = csv.reader(out.splitlines())
    return Benchmarked(script, pipeline, float(last[1]), cpu / n * 1e6, errors() - failed)


def one_redis(
    db: redis.Redis,
    port: int,
    n: int,
    captured: dict[str, tuple[str, ...]],
    number: str,
    send_id: str,
) -> list[Benchmarked]:
    """Each script (and PING, for scale) through redis-benchmark, unpipelined and pipelined."""
    # The service's scripts as otp_service.store loads them: the same SHA1 the service sent.
    for name in (*VERIFY_SCRIPTS, *SEND_SCRIPTS):
        sha = db.script_load(SCRIPTS[name])
        if captured[name][1] != sha:
            raise RuntimeError(f"{name}: the service sent another script than the loader's")
    commands = {
        # The number over its attempt budget, as in the VerifyOtp rounds: the same path each call.
        "verify": captured["verify"],
        "send": randomized(captured["send"], number, send_id),
        "count_send": randomized(captured["count_send"], number, send_id),
        # The record of the captured send: running it again writes the same again.
        "record_sent": captured["record_sent"],
        "PING": ("PING",),
    }
    done = []
    for script, command in commands.items():
        for pipeline in PIPELINES:
            if script == "count_send":
                # Every send is counted in the same two budgets: start them empty each run,
                # so that no run reaches the bench's lifted limits.
                db.delete(
                    *[
                        arg
                        for arg in command
                        if arg.startswith("otp:{senders}:") and "-sends" in arg
                    ]
                )
            done.append(redis_benchmark(db, port, script, command, pipeline, n))
    return done


@contextlib.contextmanager
def serving(workdir: Path) -> Iterator[tuple[redis.Redis, int, dict[int, Served]]]:
    """One Redis, the fake Interakt, and the service with each number of WORKERS on it."""
    processes = Processes(workdir)
    with EmbeddedRedis() as redis_server:
        try:
            base_url = processes.start_upstream().url
            served = {}
            for workers in WORKERS:
                port = free_port()
                env = service_env(redis_server.url, base_url, f"127.0.0.1:{port}", "")
                command = [sys.executable, "-m", "otp_service", "serve", "--workers", str(workers)]
                child = processes.start(f"service-{workers}", command, env)
                served[workers] = Served(workers, port, child.pid)
            for one in served.values():
                wait_listening(one.port)
            yield redis.Redis(port=redis_server.port), redis_server.port, served
        finally:
            processes.stop()


def run(sizes: Sizes, out: Path) -> dict[str, object]:
    load_before, started = os.getloadavg(), datetime.now(UTC)
    use_h2load = load.have_h2load()
    with (
        tempfile.TemporaryDirectory(prefix="otp-scaling-") as tmp,
        serving(Path(tmp)) as (db, redis_port, served),
    ):
        # VerifyOtp as in the bench: one number with a live code, a wrong code typed.
        seed = otp_pb2.SendOtpRequest(phone_number=PHONE).SerializeToString()
        checks = {"SendOtp (seed)": check_answers(served[1].port, SEND_METHOD, [seed])}
        verify_body = otp_pb2.VerifyOtpRequest(
            phone_number=PHONE, otp_code="000000"
        ).SerializeToString()
        numbers = iter(range(1, 1_000_000))
        uses: dict[str, RedisUse] = {}

        def contestant(
            name: str,
            server: Served,
            load_name: str,
            in_flight: int,
            run_round: Callable[[], Sample],
        ) -> Contestant:
            figure = Figure(route(name, server.workers), load_name, str(in_flight))
            use = uses[figure.route] = RedisUse()
            return Contestant(
                figure, functools.partial(measured, db, use, run_round), server.pid, db
            )

        def verifies(server: Served, n: int) -> Sample:
            target = Target(server.port, VERIFY_METHOD, grpc=True, headers=AUTH)
            return load.same_request(
                target, verify_body, requests=n, shape=PEAK, use_h2load=use_h2load
            )

        def sends(server: Served, n: int) -> Sample:
            """``n`` SendOtp calls, each to a number of its own (limits are per number)."""
            target = Target(server.port, SEND_METHOD, grpc=True, headers=AUTH)
            bodies = [send_request(next(numbers)).SerializeToString() for _ in range(n)]
            return load.python_client(target, bodies, requests=n, shape=SEND_FULL)

        for server in served.values():
            verifies(server, sizes.warmup)
            sends(server, sizes.sends // 4)
        verify_bout = [
            contestant(
                VERIFY, s, PEAK.name, PEAK.in_flight, functools.partial(verifies, s, sizes.verifies)
            )
            for s in served.values()
        ]
        send_bout = [
            contestant(
                SEND,
                s,
                SEND_FULL.name,
                SEND_FULL.in_flight,
                functools.partial(sends, s, sizes.sends),
            )
            for s in served.values()
        ]
        interleave(sizes.rounds, [verify_bout, send_bout])
        for server in served.values():
            checks[route(VERIFY, server.workers)] = check_answers(
                server.port,
                VERIFY_METHOD,
                [verify_body] * 5,
                grpc_answer(served[1].port, VERIFY_METHOD, verify_body),
            )

        # What the service sends Redis for one VerifyOtp and one SendOtp to a new number.
        fresh = send_request(999_999)
        number, send_body = fresh.phone_number, fresh.SerializeToString()

        def one_of_each() -> None:
            grpc_answer(served[1].port, VERIFY_METHOD, verify_body)
            grpc_answer(served[1].port, SEND_METHOD, send_body)

        captured = scripts_sent(monitored(db, one_of_each))
        send = captured["send"]
        send_id = send[3 + int(send[2]) + 1]  # ARGV[2]
        benchmarked = None
        if shutil.which("redis-benchmark"):
            benchmarked = one_redis(db, redis_port, sizes.commands, captured, number, send_id)

        results: dict[str, object] = {
            "machine": {
                **machine(),
                "redis-server": version([find_redis_server(), "--version"]),
                "redis-benchmark": version(["redis-benchmark", "--version"]),
                "run": f"{started:%Y-%m-%d %H:%M} UTC",
                "load average (1, 5, 15 min) before": " ".join(f"{x:.2f}" for x in load_before),
                "load average (1, 5, 15 min) after": " ".join(f"{x:.2f}" for x in os.getloadavg()),
            },
            "figures": [c.figure for c in [*verify_bout, *send_bout]],
            "uses": uses,
            "benchmarked": benchmarked,
            "checks": checks,
            "sizes": sizes,
            "h2load": use_h2load,
        }
    (out / "scaling.md").write_text(write(results))
    return results


def version(command: list[str]) -> str:
    if not shutil.which(command[0]):
        return "not installed"
    return subprocess.run(command, capture_output=True, text=True).stdout.strip()  # noqa: S603


def core_share(figure: Figure, use: RedisUse) -> list[float]:
    """Each round's Redis CPU over the round's length: the share of one Redis core it used."""
    return [cpu / s.seconds for cpu, s in zip(use.cpu_seconds, figure.samples, strict=True)]


def write(results: dict[str, Any]) -> str:
    """scaling.md: the figures, then what they say one Redis feeds."""
    figures: list[Figure] = results["figures"]
    uses: dict[str, RedisUse] = results["uses"]
    sizes: Sizes = results["sizes"]
    lines = [
        "# How many workers and replicas one Redis feeds",
        "",
        "Generated by `python -m bench.scaling`; every figure is from the same run on the machine "
        "below. Medians over the rounds; [min-max] is the spread between rounds.",
        "",
        "| machine | |",
        "| --- | --- |",
        *(f"| {k} | {v} |" for k, v in results["machine"].items()),
        "",
        "## The service: `serve --workers 1` against `--workers 2`, one Redis",
        "",
        f"Rounds: {sizes.rounds}, the two servers taking theirs in turn. VerifyOtp: "
        f"{'h2load' if results['h2load'] else 'the Python client'} at {PEAK.name} "
        f"({PEAK.in_flight} in flight), {sizes.verifies:,} calls a round, one number over its "
        f"attempt budget (the bench's VerifyOtp). SendOtp: the Python client at "
        f"{SEND_FULL.in_flight} in flight, {sizes.sends:,} calls a round, each to a new number, "
        "the fake Interakt answering in 50 ms. Server CPU: the server's every process (the "
        "parent and the workers it forks), from /proc. Redis CPU: INFO's used_cpu_sys + "
        "used_cpu_user around each round; its share of a core is that over the round's length.",
        "",
        "| route | load (in flight) | req/s [min-max] | p50 ms | p99 ms | server CPU us / req "
        "| Redis CPU us / req | Redis core used [min-max] | Redis round trips / req | failed |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for f in figures:
        s, use = report.summary(f.samples), uses[f.route]
        shares = core_share(f, use)
        lines.append(
            f"| {f.route} | {f.load} ({f.in_flight}) | {s['rps']:,.0f} "
            f"[{s['rps_min']:,.0f}-{s['rps_max']:,.0f}] | {s['p50']:.2f} | {s['p99']:.2f} "
            f"| {report.cpu_us(f):.0f} | {sum(use.cpu_seconds) / f.requests * 1e6:.1f} "
            f"| {statistics.median(shares):.1%} [{min(shares):.1%}-{max(shares):.1%}] "
            f"| {f.round_trips:.2f} | {s['failed']} |"
        )
    ratios = [Ratio(route(name, 2), route(name, 1)) for name in (VERIFY, SEND)]
    lines += [
        "",
        "Two workers over one, round by round (median [min-max]); by CPU: one worker's CPU "
        "per request over two workers':",
        "",
        "| ratio | load | req/s ratio | by CPU per request |",
        "| --- | --- | --- | --- |",
        *report.ratio_rows(
            {"figures": figures, "ratios": ratios, "peak_loads": [PEAK.name, SEND_FULL.name]}
        ),
        "",
        "## One Redis alone: the service's scripts through redis-benchmark",
        "",
    ]
    benchmarked: list[Benchmarked] | None = results["benchmarked"]
    if benchmarked is None:
        lines += [
            "Not measured: redis-benchmark is not installed (Debian's redis-tools ships it).",
            "",
        ]
    else:
        by = {(b.script, b.pipeline): b for b in benchmarked}
        lines += [
            f"Each command as the service sent it (caught with MONITOR), {sizes.commands:,} "
            f"a run, {BENCH_CLIENTS} connections, unpipelined (`-P 1`) and 16 commands "
            "pipelined on each connection (`-P 16`; the service's one connection per process "
            "writes the commands of one event-loop turn together). Redis CPU per command from "
            "INFO around each run.",
            "",
            "| script | runs for | -P 1 commands/s | -P 16 commands/s | Redis CPU us / command "
            "(-P 1, -P 16) | errors |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        what = {
            "verify": "each VerifyOtp (the number over its attempt budget, as above)",
            "send": "each SendOtp, before Interakt: stores the code (a new number each call)",
            "count_send": "each SendOtp, before Interakt: the caller's and account's budgets",
            "record_sent": "each SendOtp Interakt accepted: records its answer",
            "PING": "for scale",
        }
        for script, runs_for in what.items():
            one, piped = by[(script, 1)], by[(script, PIPELINES[-1])]
            lines.append(
                f"| {script} | {runs_for} | {one.per_second:,.0f} | {piped.per_second:,.0f} "
                f"| {one.cpu_us:.1f}, {piped.cpu_us:.1f} | {one.failed + piped.failed} |"
            )
        lines += ["", *feeds(figures, uses, by), ""]
    lines += [
        "Sampled answers, checked with a real client:",
        "",
        *(
            f"- {name}: {', '.join(sorted(set(codes)))} ({len(codes)} calls)"
            for name, codes in results["checks"].items()
        ),
        "",
    ]
    return "\n".join(lines)


def feeds(
    figures: list[Figure], uses: dict[str, RedisUse], by: dict[tuple[str, int], Benchmarked]
) -> list[str]:
    """What one Redis feeds, with the arithmetic shown."""
    figure = {f.route: f for f in figures}
    verify = figure[route(VERIFY, 1)]
    use = uses[verify.route]
    rate = report.summary(verify.samples)["rps"]
    share = statistics.median(core_share(verify, use))
    per_verify = sum(use.cpu_seconds) / verify.requests * 1e6
    redis_rate = {p: by[("verify", p)].per_second for p in PIPELINES}
    piped = PIPELINES[-1]

    def send_rate(p: int) -> float:
        return 1 / sum(1 / by[(s, p)].per_second for s in SEND_SCRIPTS)

    send = figure[route(SEND, 1)]
    send_share = statistics.median(core_share(send, uses[send.route]))
    send_peak = report.summary(send.samples)["rps"]
    return [
        "## What one Redis feeds",
        "",
        f"- **VerifyOtp**: one worker at its peak took {rate:,.0f} verifies/s and used "
        f"{share:.1%} of a Redis core ({per_verify:.1f} us of Redis CPU per verify, against "
        f"{by[('verify', piped)].cpu_us:.1f} us under redis-benchmark -P {piped}). One Redis "
        f"runs {redis_rate[piped]:,.0f} verify scripts/s pipelined ({redis_rate[1]:,.0f} "
        f"unpipelined), so about {redis_rate[piped]:,.0f} / {rate:,.0f} = "
        f"**{redis_rate[piped] / rate:.0f} such workers** by that rate, or 1 / {share:.1%} = "
        f"**{1 / share:.0f} workers** by the core share under the service's own traffic "
        "(plan with the smaller).",
        f"- **SendOtp**: each send runs {' + '.join(SEND_SCRIPTS)}: 1 / ("
        + " + ".join(f"1/{by[(s, piped)].per_second:,.0f}" for s in SEND_SCRIPTS)
        + f") = **{send_rate(piped):,.0f} sends/s** one Redis takes pipelined "
        f"({send_rate(1):,.0f} unpipelined). One worker at {SEND_FULL.in_flight} in flight "
        f"took {send_peak:,.0f} sends/s (bound by Interakt's 50 ms) using {send_share:.1%} "
        "of a Redis core.",
    ]


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.scaling", description=__doc__)
    parser.add_argument("--smoke", action="store_true", help="tiny counts: checks it runs")
    parser.add_argument("--rounds", type=int, help=f"rounds per figure (default {FULL.rounds})")
    parser.add_argument(
        "--out",
        type=Path,
        help="where scaling.md goes (default: bench/results, with --smoke a new temporary "
        "directory)",
    )
    args = parser.parse_args()
    if args.out is None:
        args.out = Path(tempfile.mkdtemp(prefix="otp-scaling-smoke-")) if args.smoke else RESULTS
    sizes = SMOKE if args.smoke else FULL
    if args.rounds:
        sizes = dataclasses.replace(sizes, rounds=args.rounds)
    if not shutil.which("redis-benchmark"):
        print(
            "bench.scaling: redis-benchmark not found (Debian's redis-tools ships it): "
            "one Redis alone is not measured",
            file=sys.stderr,
        )
    args.out.mkdir(parents=True, exist_ok=True)
    results = run(sizes, args.out)
    table = args.out / "scaling.md"
    return finish("bench.scaling", table, table, results["checks"])  # type: ignore[arg-type]


if __name__ == "__main__":
    sys.exit(main())
