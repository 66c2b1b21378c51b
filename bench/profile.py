"""``python -m bench.profile``: where the server's CPU goes on the VerifyOtp hot path.

Starts the same processes as the bench, drives VerifyOtp with h2load at full load and samples
the server with ``py-spy record --native --gil`` (so the event-loop thread's CPU, with gRPC's
Cython core visible). Writes ``bench/results/profile-verify.txt``: the Python frames by share of
samples, inclusive (the raw stacks stay next to it, not committed). Needs py-spy
(``pip install -e '.[bench]'``) and h2load.
"""

from __future__ import annotations

import collections
import re
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from otp.v1 import otp_pb2

from bench import load
from bench.__main__ import AUTH, FULL_IN_FLIGHT, PHONE, RESULTS, check_answers, services
from bench.load import Target

SECONDS = 8
TOP = 40


def summarize(folded: Path) -> str:
    """Inclusive share of each Python frame in py-spy's raw (folded) output."""
    total = 0
    inclusive: collections.Counter[str] = collections.Counter()
    for line in folded.read_text().splitlines():
        stack, count = line.rsplit(" ", 1)
        total += int(count)
        frames = {re.sub(r":\d+\)$", ")", f) for f in stack.split(";") if ".py" in f}
        for frame in frames:
            inclusive[frame] += int(count)
    rows = [f"{n / total:6.1%}  {frame}" for frame, n in inclusive.most_common(TOP)]
    return f"{total} samples (GIL held), inclusive share of Python frames:\n" + "\n".join(rows)


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="otp-profile-") as tmp, services(Path(tmp)) as env:
        port, pid = env["service_port"], env["service_pid"]
        send = otp_pb2.SendOtpRequest(phone_number=PHONE).SerializeToString()
        check_answers(port, "/otp.v1.OtpService/SendOtp", [send])
        target = Target(port, "/otp.v1.OtpService/VerifyOtp", grpc=True, headers=AUTH)
        body = otp_pb2.VerifyOtpRequest(phone_number=PHONE, otp_code="000000").SerializeToString()
        load.h2load(target, body, requests=5_000, in_flight=FULL_IN_FLIGHT)  # warm-up

        stop = threading.Event()

        def drive() -> None:
            while not stop.is_set():
                load.h2load(target, body, requests=10_000, in_flight=FULL_IN_FLIGHT)

        driver = threading.Thread(target=drive)
        driver.start()
        folded = RESULTS / "profile-verify.folded.tmp"  # for flamegraph.pl or speedscope
        command = [
            str(Path(sys.executable).parent / "py-spy"), "record", "--pid", str(pid),
            "--native", "--gil", "--rate", "250", "--duration", str(SECONDS),
            "--format", "raw", "-o", str(folded),
        ]  # fmt: skip
        try:
            subprocess.run(command, check=True)  # noqa: S603
        finally:
            stop.set()
            driver.join()
        out = RESULTS / "profile-verify.txt"
        out.write_text(summarize(folded) + "\n")
        print(out.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
