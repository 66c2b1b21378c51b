"""A picture of the dashboard's main panels, drawn with matplotlib from what a real Prometheus
answers to the panels' own queries (ops/grafana/otp-service.json) over a run.

tests/test_operations_prometheus.py calls it after its run when OTP_DASHBOARD_PICTURE names the
file to write (docs/operations.md shows the one committed):

    OTP_DASHBOARD_PICTURE=docs/operations-dashboard.png .venv/bin/python -m pytest \\
        tests/test_operations_prometheus.py -k real_prometheus
"""

from __future__ import annotations

import json
import re
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

DASHBOARD = Path(__file__).parent / "grafana" / "otp-service.json"
# The panels drawn, by title: one of each row's.
MAIN_PANELS = (
    "RPC rate by method and code",
    "Latency percentiles by method",
    "Conversion by country",
    "Delivery states",
    "Interakt answers",
    "Interakt latency and the circuit breaker",
    "Redis health",
    "Interakt account: messages a minute against the limit",
)
# A run of a minute, scraped every second: rates over a few scrapes show its shape.
RATE_INTERVAL = "10s"


def render(prometheus_url: str, start: float, end: float, out: Path) -> None:
    """Draw MAIN_PANELS over [start, end] (epoch seconds) into ``out`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = {p["title"]: p for p in json.loads(DASHBOARD.read_text())["panels"]}
    figure, axes = plt.subplots(4, 2, figsize=(14, 13), constrained_layout=True)
    for ax, title in zip(axes.flat, MAIN_PANELS, strict=True):
        panel = panels[title]
        for target in panel["targets"]:
            expr = target["expr"].replace("$__rate_interval", RATE_INTERVAL)
            for series in _query_range(prometheus_url, expr.replace("$job", ".*"), start, end):
                times = [float(t) - start for t, _ in series["values"]]
                values = [float(v) for _, v in series["values"]]
                ax.plot(times, values, label=_legend(target["legendFormat"], series["metric"]))
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("seconds into the run", fontsize=8)
        ax.set_ylabel(panel["fieldConfig"]["defaults"]["unit"], fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6, loc="upper left")
    figure.suptitle(
        "otp-service dashboard (ops/grafana/otp-service.json), main panels: a real Prometheus's "
        "answers to their queries during tests/test_operations_prometheus.py's run",
        fontsize=10,
    )
    figure.savefig(out, dpi=80)
    plt.close(figure)


def _query_range(url: str, expr: str, start: float, end: float) -> list[dict[str, Any]]:
    query = urllib.parse.urlencode({"query": expr, "start": start, "end": end, "step": "1s"})
    with urllib.request.urlopen(f"{url}/api/v1/query_range?{query}", timeout=10) as answer:  # noqa: S310 - the test's own loopback Prometheus
        body = json.load(answer)
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


def _legend(form: str, labels: dict[str, str]) -> str:
    return re.sub(r"\{\{(\w+)\}\}", lambda m: labels.get(m.group(1), ""), form)
