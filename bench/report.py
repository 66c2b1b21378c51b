"""results.md (a markdown table) and chart.png from one run's figures."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from bench.load import Sample


def percentile(sorted_us: list[int], q: float) -> float:
    """The q-th percentile (0..100) in milliseconds, nearest rank."""
    if not sorted_us:
        return float("nan")
    rank = min(len(sorted_us) - 1, max(0, round(q / 100 * len(sorted_us)) - 1))
    return sorted_us[rank] / 1000


def summary(samples: list[Sample]) -> dict[str, float]:
    """Medians over the rounds, with the spread of throughput and p99."""
    rps = [s.rps for s in samples]
    p = {q: [percentile(s.latencies_us, q) for s in samples] for q in (50, 99, 99.9)}
    return {
        "rps": statistics.median(rps),
        "rps_min": min(rps),
        "rps_max": max(rps),
        "p50": statistics.median(p[50]),
        "p99": statistics.median(p[99]),
        "p99_min": min(p[99]),
        "p99_max": max(p[99]),
        "p999": statistics.median(p[99.9]),
        "failed": sum(s.failed for s in samples),
    }


def cpu_us(figure: Any) -> float:
    """Server CPU (all its threads) per request over the figure's rounds, in microseconds."""
    return sum(figure.cpu_seconds) / figure.requests * 1e6


def ratio_rows(results: dict[str, Any]) -> list[str]:
    """Each ratio at each peak load both sides ran: median and spread of the rounds' ratios.

    A round's ratio pairs the route's round with the reference's round of the same number,
    which ran next to it; the median of those pairs is the figure. "By CPU" is the reference's
    CPU per request over the route's.
    """
    by_key = {(f.route, f.load): f for f in results["figures"]}
    rows = []
    for ratio in results["ratios"]:
        for load in results["peak_loads"]:
            route, reference = by_key.get((ratio.route, load)), by_key.get((ratio.reference, load))
            if route is None or reference is None:
                continue
            rounds = [a.rps / b.rps for a, b in zip(route.samples, reference.samples, strict=True)]
            median = statistics.median(rounds)
            # A few requests can take less than one clock tick of CPU (tiny counts: --smoke).
            by_cpu = cpu_us(reference) / cpu_us(route) if cpu_us(route) else float("nan")
            rows.append(
                f"| {ratio.route} / {ratio.reference} | {load} | {median:.3f} "
                f"[{min(rounds):.2f}-{max(rounds):.2f}] | {by_cpu:.2f} |"
            )
    return rows


def _verdict(met: bool) -> str:
    return "met" if met else "**not met**"


def _spread(values: list[float], unit: str, digits: int = 0) -> str:
    """The median of the rounds' values, with [min-max]."""
    return (
        f"{statistics.median(values):.{digits}f} {unit} "
        f"[{min(values):.{digits}f}-{max(values):.{digits}f}]"
    )


def own_cpu_us(route: Any, reference: Any) -> list[float]:
    """Round by round, the route's server CPU per request minus its reference's, in us: round i
    of each (they ran in turn, so a drift of the machine's speed hits both)."""
    return [
        (a_cpu / a.requests - b_cpu / b.requests) * 1e6
        for a, a_cpu, b, b_cpu in zip(
            route.samples, route.cpu_seconds, reference.samples, reference.cpu_seconds, strict=True
        )
    ]


# Issue 23's CPU budgets: (route, reference, load, at most us, aim us).
CPU_BUDGETS = (
    ("VerifyOtp", "gRPC Redis reference", "c16 m8", 40, 30),
    ("VerifyOtp", "gRPC Redis reference", "c4 m16", 40, 30),
    ("REST verify", "aiohttp Redis reference", "64 conns", 35, 25),
)
# SendOtp's Redis round trips: at most this many before the upstream and after it.
ROUND_TRIPS = {"before": 2, "after": 1}
SEND_OWN_P99_MS = 4.0  # SendOtp's p99 over the fake Interakt's own, at half of SendOtp's peak
PENDING_BYTES = {"without a key": 450, "with a key": 800}  # under these
RSS_GROWTH_MB = 10.0  # under this, over the verifies measured


def target_rows(results: dict[str, Any]) -> list[str]:
    """Issue 23's targets, one row each: what, this run's figure, the target, met or not."""
    by_key = {(f.route, f.load): f for f in results["figures"]}
    targets = results["targets"]
    rows = []
    for route, reference, load, most, aim in CPU_BUDGETS:
        own = own_cpu_us(by_key[(route, load)], by_key[(reference, load)])
        rows.append(
            f"| {route} own CPU over the {reference}, {load} | {_spread(own, 'us')} per request "
            f"| at most {most} us (aim {aim}) | {_verdict(statistics.median(own) <= most)} |"
        )
    for part, most in ROUND_TRIPS.items():
        trips = targets["round_trips"][part]
        rows.append(
            f"| SendOtp Redis round trips {part} the upstream ({len(trips)} sends, one at a "
            f"time) | {_spread(trips, 'per send')} | at most {most} "
            f"| {_verdict(max(trips) <= most)} |"
        )
    send, alone = by_key[("SendOtp", "half")], by_key[("fake Interakt alone", "half")]
    own_p99 = [
        percentile(a.latencies_us, 99) - percentile(b.latencies_us, 99)
        for a, b in zip(send.samples, alone.samples, strict=True)
    ]
    rows.append(
        f"| SendOtp own p99 over the fake Interakt alone, half load ({send.in_flight}) "
        f"| {_spread(own_p99, 'ms', 2)} | under {SEND_OWN_P99_MS:.0f} ms (where it goes: below) "
        f"| {_verdict(statistics.median(own_p99) < SEND_OWN_P99_MS)} |"
    )
    for key, under in PENDING_BYTES.items():
        size = targets["pending_bytes"][key]
        rows.append(
            f"| Redis bytes per pending code, every key a send leaves, {key} | {size:,} "
            f"| under {under} | {_verdict(size < under)} |"
        )
    before, after, verifies = targets["rss_mib"]
    growth_mb = (after - before) * 2**20 / 1e6
    rows.append(
        f"| service RSS growth over {verifies:,} verifies | {growth_mb:+.2f} MB "
        f"| under {RSS_GROWTH_MB:.0f} MB | {_verdict(growth_mb < RSS_GROWTH_MB)} |"
    )
    return rows


def split_rows(split: dict[str, list[int]]) -> list[str]:
    """SendOtp's time by part (microseconds, sorted, per send): p50 and p99 in ms."""
    names = {
        "before": "before the upstream (the client's start -> the fake's arrival)",
        "upstream": "the upstream (arrival -> its answer)",
        "after": "after the upstream (its answer -> the client has the response)",
        "whole": "the whole send, as the client saw it",
    }
    return [
        f"| {name} | {percentile(split[part], 50):.2f} | {percentile(split[part], 99):.2f} |"
        for part, name in names.items()
    ]


def write(results: dict[str, Any], out: Path) -> None:
    figures = results["figures"]
    stats = {(f.route, f.load): summary(f.samples) for f in figures}
    lines = [
        "# otp-service benchmark",
        "",
        "Generated by `make bench` (`python -m bench`); every figure is from the same run on the "
        "machine below. Medians over the rounds; [min-max] is the spread between rounds.",
        "",
        "| machine | |",
        "| --- | --- |",
        *(f"| {k} | {v} |" for k, v in results["machine"].items()),
        "",
        f"Rounds per figure: {results['sizes'].rounds}, the servers compared with each other "
        "taking their rounds in turn. Load generator: "
        f"{'h2load' if results['h2load'] else 'Python client'} (SendOtp: always the Python "
        "client, one new number per request). Loads: gRPC `c16 m8` (16 connections x 8 "
        "streams) and `c4 m16`; REST 64 HTTP/1.1 connections; `light` 1 in flight; `half`: "
        "paced (open loop) at half of the server's own peak. Server: `otp-service serve`, one "
        "worker, production mode, caller token sent, default logging.",
        "",
        "| route | load (in flight) | req/s [min-max] | p50 ms | p99 ms [min-max] | p99.9 ms "
        "| CPU us / req | Redis round trips / req (all commands) | failed |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for f in figures:
        s = stats[(f.route, f.load)]
        redis_cell = (
            f"{f.round_trips:.2f} ({f.commands:.2f})" if f.round_trips is not None else "n/a"
        )
        lines.append(
            f"| {f.route} | {f.load} ({f.in_flight}) | {s['rps']:,.0f} "
            f"[{s['rps_min']:,.0f}-{s['rps_max']:,.0f}] | {s['p50']:.2f} | {s['p99']:.2f} "
            f"[{s['p99_min']:.2f}-{s['p99_max']:.2f}] | {s['p999']:.2f} | {cpu_us(f):.0f} | "
            f"{redis_cell} | {s['failed']} |"
        )
    split = results["targets"]["send_split"]
    lines += [
        "",
        "## Targets (issue 23)",
        "",
        "Judged in this run: a CPU budget on the median of the rounds' differences (round i of "
        "the route minus round i of its reference, which ran next to it); round trips on every "
        "send; SendOtp's own p99 on the median of its rounds' p99 minus the fake Interakt's "
        "own, round by round.",
        "",
        "| what | this run [min-max] | target | |",
        "| --- | --- | --- | --- |",
        *target_rows(results),
        "",
        "Where SendOtp's time goes at half load: every send of its half-load rounds "
        f"({len(split['whole'])} sends), timed from outside the service, the load client "
        "timing each send, the fake Interakt each message's arrival and answer, matched by "
        "number, on one clock (CLOCK_MONOTONIC):",
        "",
        "| part | p50 ms | p99 ms |",
        "| --- | --- | --- |",
        *split_rows(split),
        "",
        "Throughput ratios, round by round (median [min-max] of the rounds), for context:",
        "",
        "| ratio | load | req/s ratio | by CPU per request |",
        "| --- | --- | --- | --- |",
        *ratio_rows(results),
    ]
    lines += [
        "",
        "Notes:",
        "",
        "- VerifyOtp sends one number with a wrong code, so each call runs the verify script's "
        "attempt counting; one EVALSHA either way.",
        "- The Redis references run the product's verify script through the product's own store "
        "and connection (the minimal Protocol one: through a minimal asyncio.Protocol client "
        "instead), with the service's keys and arguments: their Redis columns match the route's "
        "and their sampled answers must equal the service's.",
        "- Redis round trips count top-level commands (EVALSHA, SCRIPT LOAD, connection "
        "set-up), not the servers' readiness PING (once a second, whatever the load); the "
        "commands in brackets also count those our Lua scripts run inside Redis.",
        "- REST verify goes through the JSON gateway inside the server process, which calls the "
        "same wrapped VerifyOtp method in process (so auth, logging and metrics are the gRPC "
        "path's own).",
        "",
        "| memory | |",
        "| --- | --- |",
        *(f"| {k} | {v:,.1f} |" for k, v in results["memory"].items()),
        "",
        "Sampled answers, checked with a real client (h2load counts HTTP 200, not "
        "grpc-status 0); a Redis reference's must equal the service's:",
        "",
        *(
            f"- {name}: {', '.join(sorted(set(codes)))} ({len(codes)} calls)"
            for name, codes in results["checks"].items()
        ),
        "",
    ]
    (out / "results.md").write_text("\n".join(lines))
    _chart(figures, stats, out / "chart.png")


def _chart(figures: list[Any], stats: dict[tuple[str, str], dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(14, 5.5))
    peak = [f for f in figures if f.load not in ("light", "half")]
    labels = [f"{f.route}\n{f.load}" for f in peak]
    rps = [stats[(f.route, f.load)]["rps"] for f in peak]
    spread = [
        [r - stats[(f.route, f.load)]["rps_min"] for f, r in zip(peak, rps, strict=True)],
        [stats[(f.route, f.load)]["rps_max"] - r for f, r in zip(peak, rps, strict=True)],
    ]
    left.barh(labels, rps, xerr=spread, capsize=3, color="#4C72B0")
    left.invert_yaxis()
    left.set_title("Throughput at peak load (median, min-max)")
    left.set_xlabel("requests / s")
    left.tick_params(axis="y", labelsize=7)
    names = list(dict.fromkeys(f.route for f in figures if f.load == "half"))
    keys = [(q, load) for load in ("light", "half") for q in ("p50", "p99")]
    height = 0.2
    for i, (q, load) in enumerate(keys):
        values = [stats.get((n, load), {}).get(q, 0) for n in names]
        positions = [y + (i - len(keys) / 2) * height for y in range(len(names))]
        right.barh(positions, values, height, label=f"{q} {load}")
    right.set_yticks(range(len(names)), names, fontsize=7)
    right.invert_yaxis()
    right.set_xscale("log")
    right.set_xlabel("ms (log scale)")
    right.set_title("Latency at 1 in flight and at half of peak")
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
