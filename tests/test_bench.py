"""The benchmark's smoke run: tiny counts, so the bench cannot rot. No timing is asserted."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bench import load

ROOT = Path(__file__).parent.parent


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
def test_smoke_run_writes_table_and_chart_and_every_sampled_answer_is_ok(
    tmp_path: Path, client: str
) -> None:
    command = [sys.executable, "-m", "bench", "--smoke", "--out", str(tmp_path)]
    if client == "python":
        command.append("--python-client")
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]

    table = (tmp_path / "results.md").read_text()
    for route in ("VerifyOtp", "SendOtp", "REST verify", "empty gRPC", "empty aiohttp"):
        assert f"| {route} |" in table
    assert (tmp_path / "chart.png").read_bytes().startswith(b"\x89PNG")
    # Every sampled answer was grpc-status 0, and no request failed in any round.
    checks = table.split("Sampled answers", 1)[1]
    assert checks.count(": OK (") == 4, checks
    for row in table.splitlines():
        if row.startswith(("| VerifyOtp |", "| SendOtp |", "| REST verify |", "| empty")):
            assert row.rstrip(" |").endswith("| 0"), row
