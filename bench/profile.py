"""``python -m bench.profile [--rest] [--seconds N]``: where the server's CPU goes under load,
next to its Redis reference.

Starts the same processes as the bench and drives VerifyOtp and the gRPC Redis reference (with
``--rest``: REST verify and the aiohttp Redis reference) with h2load, one at a time, at the
bench's ``c4 m16`` load (REST: 64 connections). First each one's CPU per request, rounds
interleaved; then, while h2load keeps each busy in turn:

- ``py-spy record --native --gil``: samples of the thread holding the GIL (the event loop),
  Python frames with gRPC's Cython core and C calls visible as native frames;
- ``perf record -e cpu-clock -g`` on all of the process' threads (gRPC's own included), when
  ``perf`` works here (Debian's ``linux-perf``): CPU by library and by symbol, system calls
  and the kernel included. ``cpu-clock`` is a software event, so it works in VMs without
  hardware counters.

Writes ``bench/results/profile-verify.txt`` (``profile-rest.txt``): both servers side by side;
the raw stacks and perf data stay next to it as ``*.tmp`` (not committed: for flamegraph.pl,
speedscope or ``perf report``). Needs py-spy (``pip install -e '.[bench]'``) and h2load.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import json
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

from otp.v1 import otp_pb2

from bench import load
from bench.__main__ import (
    AUTH,
    GRPC_REDIS,
    GRPC_SHAPES,
    HTTP_REDIS,
    PHONE,
    REST,
    REST_SHAPES,
    RESULTS,
    SEND_METHOD,
    VERIFY,
    Contestant,
    Figure,
    check_answers,
    interleave,
    services,
)
from bench.load import Shape, Target
from bench.references import VERIFY_METHOD, VERIFY_PATH
from bench.report import cpu_us

SECONDS = 8
CPU_ROUNDS = 3
REQUESTS = 10_000  # per h2load run
TOP = 40
ROOT_SHARE = 0.95


def py_spy_frames(folded: Path) -> tuple[int, collections.Counter[str]]:
    """Samples in py-spy's raw (folded) output, and each frame's inclusive count."""
    total = 0
    inclusive: collections.Counter[str] = collections.Counter()
    for line in folded.read_text().splitlines():
        stack, count = line.rsplit(" ", 1)
        total += int(count)
        # Line numbers dropped, so that a function counts once however many lines it ran.
        for frame in {re.sub(r":\d+\)$", ")", f) for f in stack.split(";")}:
            inclusive[frame] += int(count)
    return total, inclusive


def perf_works() -> bool:
    if shutil.which("perf") is None:
        return False
    done = subprocess.run(
        ["perf", "stat", "-e", "cpu-clock", "true"],  # noqa: S607
        capture_output=True,
        text=True,
    )
    return done.returncode == 0 and "<not supported>" not in done.stderr


def perf_shares(data: Path, sort: str) -> dict[str, float]:
    """Share of perf samples (0..1) by ``sort`` keys (``dso``, ``dso,sym``), largest first."""
    out = subprocess.run(  # noqa: S603
        ["perf", "report", "-i", str(data), "--stdio", "--no-children", "-g", "none",  # noqa: S607
         "--sort", sort, "--percent-limit", "0.2"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    shares = {}
    for line in out.splitlines():
        if match := re.match(r"\s*([\d.]+)%\s+(.+?)\s*$", line):
            shares[re.sub(r"\s+", " ", match.group(2))] = float(match.group(1)) / 100
    return shares


@contextlib.contextmanager
def busy(target: Target, body: bytes, shape: Shape) -> Iterator[None]:
    """h2load keeps ``target`` under load until the block ends."""
    stop = threading.Event()

    def drive() -> None:
        while not stop.is_set():
            load.h2load(target, body, requests=REQUESTS, shape=shape)

    driver = threading.Thread(target=drive)
    driver.start()
    try:
        yield
    finally:
        stop.set()
        driver.join()


def table(header: str, rows: list[tuple[str, str, str]]) -> list[str]:
    width = max([len(header), *(len(r[0]) for r in rows)])
    return [f"{header:<{width}}  {'server':>9}  {'reference':>9}"] + [
        f"{name:<{width}}  {a:>9}  {b:>9}" for name, a, b in rows
    ]


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__)
    parser.add_argument("--rest", action="store_true", help="REST verify instead of VerifyOtp")
    parser.add_argument("--seconds", type=int, default=SECONDS, help="per profiler and server")
    args = parser.parse_args()
    py_spy = Path(sys.executable).parent / "py-spy"
    if not load.have_h2load() or not py_spy.exists():
        parser.error("needs h2load (apt-get install nghttp2-client) and py-spy (.[bench])")
    with_perf = perf_works()
    name = "rest" if args.rest else "verify"
    if args.rest:
        body = json.dumps({"phone_number": PHONE, "otp_code": "000000"}).encode()
        pair, shape = (("gateway", REST), (HTTP_REDIS, HTTP_REDIS)), REST_SHAPES[-1]
    else:
        body = otp_pb2.VerifyOtpRequest(phone_number=PHONE, otp_code="000000").SerializeToString()
        pair, shape = (("service", VERIFY), (GRPC_REDIS, GRPC_REDIS)), GRPC_SHAPES[-1]

    with tempfile.TemporaryDirectory(prefix="otp-profile-") as tmp, services(Path(tmp)) as running:
        send = otp_pb2.SendOtpRequest(phone_number=PHONE).SerializeToString()
        check_answers(running.ports["service"], SEND_METHOD, [send])
        path = VERIFY_PATH if args.rest else VERIFY_METHOD
        targets = [
            Target(running.ports[p], path, grpc=not args.rest, headers=AUTH) for p, _ in pair
        ]
        pids = [running.pids[p] for p, _ in pair]
        contestants = [
            Contestant(
                Figure(route, shape.name, str(shape.in_flight)),
                functools.partial(load.h2load, target, body, requests=REQUESTS, shape=shape),
                pid,
            )
            for (_, route), target, pid in zip(pair, targets, pids, strict=True)
        ]
        for contestant in contestants:
            contestant.run_round()  # warm-up
        interleave(CPU_ROUNDS, [contestants])
        cpu = [cpu_us(c.figure) for c in contestants]

        frames, dsos, symbols = [], [], []
        for k, (target, pid) in enumerate(zip(targets, pids, strict=True)):
            folded = RESULTS / f"profile-{name}-{k}.folded.tmp"
            data = RESULTS / f"profile-{name}-{k}.perf.tmp"
            with busy(target, body, shape):
                subprocess.run(  # noqa: S603
                    [str(py_spy), "record", "--pid", str(pid), "--native", "--gil",
                     "--rate", "250", "--duration", str(args.seconds),
                     "--format", "raw", "-o", str(folded)],
                    check=True, capture_output=True,
                )  # fmt: skip
                if with_perf:
                    subprocess.run(  # noqa: S603
                        ["perf", "record", "-e", "cpu-clock", "-F", "999", "-g",  # noqa: S607
                         "-p", str(pid), "-o", str(data), "--", "sleep", str(args.seconds)],
                        check=True, capture_output=True,
                    )  # fmt: skip
            frames.append(py_spy_frames(folded))
            if with_perf:
                dsos.append(perf_shares(data, "dso"))
                symbols.append(perf_shares(data, "dso,sym"))

    routes = [route for _, route in pair]
    lines = [
        f"# {routes[0]} (server) next to the {routes[1]} (reference)",
        "",
        f"Load: h2load {shape.name} ({shape.in_flight} in flight), one server at a time.",
        "",
        *table(
            "CPU per request, all threads (us)",
            [("", f"{cpu[0]:.0f}", f"{cpu[1]:.0f}")],
        ),
    ]
    if with_perf:
        # A library's share of the process' CPU samples, times its CPU per request.
        names = sorted(set(dsos[0]) | set(dsos[1]), key=lambda d: -dsos[0].get(d, 0))
        lines += [
            "",
            f"perf record -e cpu-clock, all threads, {args.seconds} s each: CPU per request by "
            "library (us)",
            *table(
                "library",
                [
                    (d, f"{dsos[0].get(d, 0) * cpu[0]:.1f}", f"{dsos[1].get(d, 0) * cpu[1]:.1f}")
                    for d in names
                ],
            ),
        ]
        for route, shares, us in zip(routes, symbols, cpu, strict=True):
            top = sorted(shares.items(), key=lambda s: -s[1])[:TOP]
            lines += ["", f"perf, {route}: top symbols, CPU per request (us)"]
            lines += [f"{share * us:7.1f}  {symbol}" for symbol, share in top]
    else:
        lines += ["", "perf: not available here (apt-get install linux-perf), left out."]
    (total_a, frames_a), (total_b, frames_b) = frames
    shares = {
        frame: (frames_a[frame] / total_a, frames_b[frame] / total_b)
        for frame in frames_a | frames_b
        # Not: native frames py-spy could not name (addresses differ between processes), and
        # the roots nearly every sample of a process shares (interpreter, event loop, runpy).
        if not frame.startswith("0x")
        and max(frames_a[frame] / total_a, frames_b[frame] / total_b) < ROOT_SHARE
    }
    top = sorted(shares, key=lambda f: -max(shares[f]))[:TOP]
    lines += [
        "",
        f"py-spy record --native --gil, {args.seconds} s each: {total_a} and {total_b} samples "
        "while the GIL was held; inclusive share of each frame (unnamed native frames, and "
        f"frames in over {ROOT_SHARE:.0%} of a server's samples, left out)",
        *table("frame", [(f, f"{shares[f][0]:.1%}", f"{shares[f][1]:.1%}") for f in top]),
    ]
    out = RESULTS / f"profile-{name}.txt"
    out.write_text("\n".join(lines) + "\n")
    print(out.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
