"""The scaling bench's smoke run: tiny counts, so it cannot rot. No timing is asserted."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from bench.__main__ import cpu_seconds, tree_cpu_seconds
from bench.scaling import randomized
from tests.redis_deployments import wait_until

ROOT = Path(__file__).parent.parent
RESULTS = ROOT / "bench" / "results"


def test_smoke_run_measures_both_worker_counts_and_every_script(tmp_path: Path) -> None:
    committed = {path.name: path.read_bytes() for path in RESULTS.iterdir()}
    # The smoke run picks a temporary directory of its own: here, one under tmp_path.
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-m", "bench.scaling", "--smoke"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    # The committed figures are untouched.
    assert {path.name: path.read_bytes() for path in RESULTS.iterdir()} == committed
    [out] = tmp_path.glob("otp-scaling-smoke-*")
    assert done.stdout.rstrip().endswith(f"bench.scaling: results written to {out / 'scaling.md'}")
    table = (out / "scaling.md").read_text()
    assert done.stdout.startswith(table)

    assert re.search(r"\| load average \(1, 5, 15 min\) before \| [\d.]+ [\d.]+ [\d.]+ \|", table)
    for route, load in (
        ("VerifyOtp, 1 worker", "c16 m8 (128)"),
        ("VerifyOtp, 2 workers", "c16 m8 (128)"),
        ("SendOtp, 1 worker", "full (64)"),
        ("SendOtp, 2 workers", "full (64)"),
    ):
        row = next(r for r in table.splitlines() if r.startswith(f"| {route} | {load} |"))
        # Redis CPU and its core share measured; no call failed.
        assert re.search(r"\| [\d.]+ \| [\d.]+% \[[\d.]+%-[\d.]+%\] \| [\d.]+ \| 0 \|$", row), row
    header = next(r for r in table.splitlines() if r.startswith("| ratio | load |"))
    for ratio in (
        "| VerifyOtp, 2 workers / VerifyOtp, 1 worker | c16 m8 |",
        "| SendOtp, 2 workers / SendOtp, 1 worker | full |",
    ):
        assert ratio in table
        # Each ratio row has its header's columns.
        row = next(r for r in table.splitlines() if r.startswith(ratio))
        assert row.count("|") == header.count("|"), (header, row)

    if shutil.which("redis-benchmark") is None:
        assert "Not measured: redis-benchmark is not installed" in table
    else:
        for script in ("verify", "send", "count_send", "record_sent", "PING"):
            row = next(r for r in table.splitlines() if r.startswith(f"| {script} | "))
            # Both pipeline depths measured, and Redis answered no call with an error.
            assert re.fullmatch(r"\| .+ \| [\d,]+ \| [\d,]+ \| [\d.]+, [\d.]+ \| 0 \|", row), row
        assert re.search(r"\*\*\d+ such workers\*\* by that rate", table)
        assert re.search(r"\*\*\d+ workers\*\* by the core share", table)
        assert re.search(r"= \*\*[\d,]+ sends/s\*\* one Redis takes", table)
    checks = [
        line for line in table.split("Sampled answers", 1)[1].splitlines() if line[:2] == "- "
    ]
    assert len(checks) == 3, checks
    for line in checks:
        assert re.fullmatch(r"- .+: OK \(\d+ calls\)", line), line


def test_a_send_is_randomized_in_every_key_and_argument_naming_its_number_or_id() -> None:
    command = (
        "EVALSHA",
        "abc",
        "2",
        "otp:{+917000999999}:c",
        "otp:{+917000999999}:withdrawn:5f3a",
        "5f3a",
        "bench",
        "+917000999999",
    )
    assert randomized(command, "+917000999999", "5f3a") == (
        "EVALSHA",
        "abc",
        "2",
        "otp:{+91__rand_int__}:c",
        "otp:{+91__rand_int__}:withdrawn:s__rand_int__",
        "s__rand_int__",
        "bench",
        "+91__rand_int__",
    )


def test_a_servers_cpu_counts_the_workers_it_forked() -> None:
    # A parent that forks a worker spinning on the CPU, as `serve --workers N` does.
    script = (
        "import os, sys, time\n"
        "child = os.fork()\n"
        "if child == 0:\n"
        "    while True: pass\n"
        "print(child, flush=True)\n"
        "time.sleep(60)\n"
    )
    with subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, text=True
    ) as parent:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        try:
            wait_until(lambda: cpu_seconds(child) > 0.2, "the worker spent some CPU")
            spent = cpu_seconds(parent.pid) + cpu_seconds(child)
            assert tree_cpu_seconds(parent.pid) >= spent
        finally:
            os.kill(child, signal.SIGKILL)
            parent.kill()
