"""The benchmark's smoke run: tiny counts, so the bench cannot rot. No timing is asserted."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bench import load, report
from bench.__main__ import Figure, Ratio
from bench.load import Sample

ROOT = Path(__file__).parent.parent
RESULTS = ROOT / "bench" / "results"


@pytest.mark.parametrize(
    "client",
    [
        pytest.param(
            "h2load",
            marks=pytest.mark.skipif(not load.have_h2load(), reason="h2load is not installed"),
        ),
        "python",
    ],
)
def test_smoke_run_measures_every_server_and_every_sampled_answer_is_right(
    tmp_path: Path, client: str
) -> None:
    command = [sys.executable, "-m", "bench", "--smoke"]
    if client == "python":
        command.append("--python-client")
    committed = {path.name: path.read_bytes() for path in RESULTS.iterdir()}
    # The smoke run picks a temporary directory of its own: here, one under tmp_path.
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    # The committed figures are untouched.
    assert {path.name: path.read_bytes() for path in RESULTS.iterdir()} == committed
    [out] = tmp_path.glob("otp-bench-smoke-*")
    assert done.stdout.rstrip().endswith(f"bench: results written to {out}")

    table = (out / "results.md").read_text()
    routes = (
        "VerifyOtp",
        "VerifyOtp, 1 replica ack",
        "gRPC Redis reference",
        "gRPC Redis reference, minimal Protocol",
        "empty gRPC",
        "SendOtp",
        "REST verify",
        "aiohttp Redis reference",
        "empty aiohttp",
    )
    rows = [row for row in table.splitlines() if row.startswith(tuple(f"| {r} |" for r in routes))]
    for route in routes:
        assert any(row.startswith(f"| {route} |") for row in rows), route
    # No request failed in any round.
    for row in rows:
        assert row.rstrip(" |").endswith("| 0"), row
    # The targets' ratios are there, each judged.
    for ratio in (
        "| VerifyOtp / gRPC Redis reference | c16 m8 |",
        "| VerifyOtp / gRPC Redis reference | c4 m16 |",
        "| gRPC Redis reference / gRPC Redis reference, minimal Protocol | c4 m16 |",
        "| REST verify / aiohttp Redis reference | 64 conns |",
    ):
        row = next(row for row in table.splitlines() if row.startswith(ratio))
        assert row.endswith(("| met |", "| **not met** |")), row
    # What waiting for a replica costs VerifyOtp: a ratio with no target.
    assert "| VerifyOtp, 1 replica ack / VerifyOtp | c4 m16 |" in table
    assert (out / "chart.png").read_bytes().startswith(b"\x89PNG")
    # Every sampled answer was a success, and each Redis reference answered as the service did.
    checks = [
        line for line in table.split("Sampled answers", 1)[1].splitlines() if line[:2] == "- "
    ]
    assert len(checks) == 11, checks
    for line in checks:
        assert re.fullmatch(r"- .+: OK \(\d+ calls\)", line), line


def test_ratios_pair_the_rounds_and_judge_each_target_on_the_median() -> None:
    def figure(route: str, rps_by_round: list[float], cpu_seconds: float) -> Figure:
        done = Figure(route, "c4 m16", "64")
        for rps in rps_by_round:
            done.samples.append(Sample(1000, 1000 / rps, [100], 0))
            done.cpu_seconds.append(cpu_seconds)
        return done

    # Round by round 0.80, 0.90, 1.00: median 0.90. The medians' ratio would be 0.80 (800/1000).
    route = figure("VerifyOtp", [800, 450, 1000], 0.3)
    reference = figure("reference", [1000, 500, 1000], 0.2)
    rows = report.ratio_rows(
        {
            "figures": [route, reference],
            "ratios": [
                Ratio("VerifyOtp", "reference"),
                Ratio("VerifyOtp", "reference", 0.85),
                Ratio("VerifyOtp", "reference", 0.95),
            ],
            "peak_loads": ["c16 m8", "c4 m16"],  # no figures at c16 m8: no row
        }
    )
    assert rows == [
        "| VerifyOtp / reference | c4 m16 | 0.900 [0.80-1.00] | 0.67 | >= 0.85 | met |",
        "| VerifyOtp / reference | c4 m16 | 0.900 [0.80-1.00] | 0.67 | >= 0.95 | **not met** |",
        "| VerifyOtp / reference | c4 m16 | 0.900 [0.80-1.00] | 0.67 |  |  |",
    ]
    # Tiny rounds (--smoke) can use less CPU than one clock tick: no ratio of CPU then.
    idle = figure("VerifyOtp", [800, 450, 1000], 0.0)
    only = [Ratio("VerifyOtp", "reference")]
    rows = report.ratio_rows(
        {"figures": [idle, reference], "ratios": only, "peak_loads": ["c4 m16"]}
    )
    assert rows == ["| VerifyOtp / reference | c4 m16 | 0.900 [0.80-1.00] | nan |  |  |"]
