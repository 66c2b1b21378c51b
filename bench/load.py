"""Load generators: h2load (preferred: not Python, not the code under test) and a fallback
multi-process Python client. Both run a fixed number of requests in a given ``Shape`` (as fast
as answers come, or paced at a fixed rate) and return every request's latency.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import re
import shutil
import struct
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Target:
    """What one request looks like: a gRPC method or an HTTP/1.1 JSON route on loopback."""

    port: int
    path: str
    grpc: bool
    headers: tuple[tuple[str, str], ...] = ()
    # The HTTP status every answer should have (a JSON route may answer a 4xx by design).
    answer: int = 200

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{self.path}"


@dataclass(frozen=True)
class Shape:
    """How a round loads a server.

    ``connections`` x ``streams`` requests in flight (h2load's ``-c`` and ``-m``; HTTP/1.1 has
    one in flight per connection, so ``streams`` is 1). With ``rate`` the requests start at that
    many per second overall whatever the answers (open loop), so latency is measured at a chosen
    load; ``streams`` then only bounds how many may wait at once.
    """

    name: str
    connections: int
    streams: int = 1
    rate: float | None = None

    @property
    def in_flight(self) -> int:
        return self.connections * self.streams

    def paced(self, name: str, rate: float) -> Shape:
        return Shape(name, self.connections, self.streams, rate)


@dataclass
class Sample:
    """One round as the client saw it."""

    requests: int
    seconds: float
    latencies_us: list[int]  # sorted
    failed: int
    # The Python client's requests: each one's body, start and end (time.monotonic(), which is
    # CLOCK_MONOTONIC: one clock for every process of the machine).
    spans: list[tuple[bytes, float, float]] = field(default_factory=list)

    @property
    def rps(self) -> float:
        return self.requests / self.seconds


def grpc_frame(message: bytes) -> bytes:
    """A unary gRPC request body: uncompressed flag, big-endian length, the message."""
    return struct.pack(">BI", 0, len(message)) + message


def have_h2load() -> bool:
    return shutil.which("h2load") is not None


_FINISHED = re.compile(r"finished in ([\d.]+)(us|ms|s), ([\d.]+) req/s")
_STATUS_CLASSES = re.compile(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx")


def h2load(target: Target, body: bytes, *, requests: int, shape: Shape) -> Sample:
    """One h2load round of ``requests`` requests in ``shape``."""
    if target.grpc:
        protocol = ["-m", str(shape.streams)]
        headers = [("content-type", "application/grpc"), ("te", "trailers")]
    else:
        protocol = ["--h1"]
        headers = [("content-type", "application/json")]
    connections = min(shape.connections, requests)  # h2load refuses more clients than requests
    if shape.rate:
        # h2load paces each connection (client) on its own: --rps is per client.
        protocol += ["--rps", f"{shape.rate / connections:.3f}"]
    with tempfile.TemporaryDirectory(prefix="otp-bench-") as tmp:
        body_file, log_file = Path(tmp, "body"), Path(tmp, "log")
        body_file.write_bytes(grpc_frame(body) if target.grpc else body)
        command = [
            "h2load", "-n", str(requests), "-c", str(connections), "-t", "1", *protocol,
            "-d", str(body_file), "--log-file", str(log_file),
        ]  # fmt: skip
        for name, value in (*headers, *target.headers):
            command += ["-H", f"{name}: {value}"]
        out = subprocess.run(  # noqa: S603
            [*command, target.url], capture_output=True, text=True, check=True
        ).stdout
        finished, classes = _FINISHED.search(out), _STATUS_CLASSES.search(out)
        if not finished or not classes:
            raise RuntimeError(f"cannot read h2load's output:\n{out}")
        # h2load logs "start µs <TAB> HTTP status <TAB> duration µs" per request.
        latencies = sorted(
            int(line.split("\t")[2]) for line in log_file.read_text().splitlines() if line
        )
    number, unit = float(finished.group(1)), finished.group(2)
    seconds = number / {"us": 1e6, "ms": 1e3, "s": 1}[unit]
    # h2load's "succeeded" counts 2xx only; it counts the answers by class too.
    ok = int(classes.group(target.answer // 100 - 1))
    return Sample(requests=requests, seconds=seconds, latencies_us=latencies, failed=requests - ok)


def same_request(
    target: Target, body: bytes, *, requests: int, shape: Shape, use_h2load: bool
) -> Sample:
    """One round of the same request: by h2load or, without it, the Python client (two
    processes, so that the client is not the bottleneck)."""
    if use_h2load:
        return h2load(target, body, requests=requests, shape=shape)
    return python_client(target, [body], requests=requests, shape=shape, processes=2)


def python_client(
    target: Target,
    bodies: list[bytes],
    *,
    requests: int,
    shape: Shape,
    processes: int = 1,
) -> Sample:
    """One round from ``processes`` Python processes; request i carries ``bodies[i % len]``.

    Each process keeps its share of ``shape.in_flight`` requests going, or with ``shape.rate``
    starts its share of that rate (connections and streams are h2load's; here only their
    product counts).
    """
    jobs = [
        (
            target,
            bodies[k::processes] if len(bodies) >= processes else bodies,
            requests // processes + (k < requests % processes),
            max(1, shape.in_flight // processes),
            shape.rate / processes if shape.rate else None,
        )
        for k in range(processes)
    ]
    # spawn: a forked child would inherit gRPC state of the parent, which gRPC forbids.
    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        parts = pool.starmap(_client_process, jobs)
    latencies = sorted(lat for part in parts for lat in part[2])
    start, end = min(p[0] for p in parts), max(p[1] for p in parts)
    return Sample(
        requests=requests,
        seconds=end - start,
        latencies_us=latencies,
        failed=sum(p[3] for p in parts),
        spans=[span for part in parts for span in part[4]],
    )


_Part = tuple[float, float, list[int], int, list[tuple[bytes, float, float]]]


def _client_process(
    target: Target, bodies: list[bytes], requests: int, in_flight: int, rate: float | None
) -> _Part:
    return asyncio.run(_client(target, bodies, requests, in_flight, rate))


async def _client(
    target: Target, bodies: list[bytes], requests: int, in_flight: int, rate: float | None
) -> _Part:
    import aiohttp
    import grpc

    latencies: list[int] = []
    spans: list[tuple[bytes, float, float]] = []
    failed = 0
    if target.grpc:
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{target.port}")
        call = channel.unary_unary(target.path)
        metadata = target.headers
    else:
        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=in_flight))
        headers = {"Content-Type": "application/json", **dict(target.headers)}

    async def one(i: int) -> None:
        nonlocal failed
        body = bodies[i % len(bodies)]
        started = time.monotonic()
        try:
            if target.grpc:
                await call(body, metadata=metadata, timeout=30)
            else:
                async with session.post(target.url, data=body, headers=headers) as r:
                    await r.read()
                    if r.status != target.answer:
                        failed += 1
        except (grpc.RpcError, aiohttp.ClientError):
            failed += 1
        ended = time.monotonic()
        latencies.append(int((ended - started) * 1e6))
        spans.append((body, started, ended))

    begin = time.time()
    if rate:
        tasks = []
        for i in range(requests):
            await asyncio.sleep(max(0.0, begin + i / rate - time.time()))
            tasks.append(asyncio.create_task(one(i)))
        await asyncio.gather(*tasks)
    else:
        counter = iter(range(requests))

        async def worker() -> None:
            for i in counter:
                await one(i)

        await asyncio.gather(*(worker() for _ in range(in_flight)))
    end = time.time()
    if target.grpc:
        await channel.close()
    else:
        await session.close()
    return begin, end, latencies, failed, spans
