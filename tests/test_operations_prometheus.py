"""The dashboard and the alert rules (ops/) against the service: `promtool test rules`, every
metric they name is one the service exports, and a real Prometheus scraping a running service
answers every panel's query and every rule, the alerts that should fire firing.

Prometheus and promtool come from Debian's `prometheus` package. Without them these tests skip,
saying so, except in CI (CI=true), where they must run.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from ops.render_dashboard import render
from otp_service.connections.embedded_redis import EmbeddedRedis, free_port
from tests.conftest import (
    PATIENCE_SECONDS,
    Gateway,
    MakeGateway,
    code_sent_to,
    delta,
    eventually,
    scrape,
    send,
    status_of,
    verify,
    wrong_code,
)
from tests.fake_interakt import Answer, FakeInterakt
from tests.test_delivery_status import reporting

OPS = Path(__file__).resolve().parent.parent / "ops"
RULES = OPS / "prometheus" / "rules.yml"
RULES_TEST = OPS / "prometheus" / "rules_test.yml"
DASHBOARD = OPS / "grafana" / "otp-service.json"
JOB = "otp"
# What the dashboard's Grafana variables stand for when its queries are sent as they are.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$job": ".*"}
FAILING = Answer(503, None)
# The one alert that cannot hold in a test of a minute: it compares the last half hour with the
# last day. Its two sides are recording rules, which must return data like every other.
NEEDS_A_DAY = {"OtpConversionDropping"}


def tool(name: str) -> str:
    """The path of ``name`` (prometheus, promtool); skips without it, except in CI."""
    path = shutil.which(name)
    if path is None:
        why = f"{name} is not installed (Debian package: prometheus)"
        if os.environ.get("CI") == "true":
            pytest.fail(why)
        pytest.skip(why)
    return path


# --- what the queries name ----------------------------------------------------------------------

_KEYWORDS = {"and", "or", "unless", "bool", "offset", "group_left", "group_right", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """The metric (and recording rule) names a PromQL expression selects."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings
    expr = re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", expr)  # label matchers, ranges
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    names = set()
    for word in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", expr):
        if expr[word.end() :].lstrip().startswith("(") or word.group() in _KEYWORDS:
            continue  # a function or an operator
        names.add(word.group())
    return names


def rule_exprs() -> dict[str, str]:
    """Each rule of rules.yml (its record or alert name) and its expression: YAML's plain and
    ``|`` block forms, the only ones the file uses."""
    rules: dict[str, str] = {}
    lines = RULES.read_text().splitlines()
    name = ""
    for i, line in enumerate(lines):
        named = re.match(r"\s*- (?:record|alert): (\S+)", line)
        if named:
            name = named.group(1)
        found = re.match(r"(\s*)expr: (.*)", line)
        if not found:
            continue
        if found.group(2) != "|":
            rules[name] = found.group(2)
            continue
        indent, block = len(found.group(1)), []
        for following in lines[i + 1 :]:
            if following.strip() and len(following) - len(following.lstrip()) <= indent:
                break
            block.append(following.strip())
        rules[name] = " ".join(block)
    return rules


def dashboard_exprs() -> list[tuple[str, str]]:
    """Each query of the dashboard: (panel title, expression with Grafana's variables)."""
    dashboard = json.loads(DASHBOARD.read_text())
    return [
        (panel["title"], target["expr"])
        for panel in dashboard["panels"]
        for target in panel.get("targets", ())
    ]


def as_sent(expr: str) -> str:
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    return expr


def exported(metrics_text: str) -> set[str]:
    """The names of every series /metrics can carry, by each family's type."""
    suffixes = {
        "counter": ("_total",),
        "histogram": ("_bucket", "_count", "_sum"),
        "summary": ("", "_count", "_sum"),
        "info": ("_info",),
    }
    return {
        family.name + suffix
        for family in text_string_to_metric_families(metrics_text)
        for suffix in suffixes.get(family.type, ("",))
    }


# --- without Prometheus ------------------------------------------------------------------------


def test_the_rules_unit_tests_pass() -> None:
    promtool = tool("promtool")
    checked = subprocess.run(
        [promtool, "check", "rules", str(RULES)], capture_output=True, text=True, check=False
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = subprocess.run(
        [promtool, "test", "rules", str(RULES_TEST)],
        capture_output=True,
        text=True,
        check=False,
        cwd=RULES_TEST.parent,
    )
    assert tested.returncode == 0, tested.stdout + tested.stderr


def test_every_alert_names_its_runbook_section() -> None:
    text = RULES.read_text()
    alerts = re.findall(r"- alert: (\S+)", text)
    runbooks = re.findall(r"runbook_url: docs/operations\.md#(\S+)", text)
    assert runbooks == [alert.lower() for alert in alerts]
    operations = (OPS.parent / "docs" / "operations.md").read_text()
    headings = re.findall(r"^#+ (Otp\w+)$", operations, re.MULTILINE)
    assert sorted(headings) == sorted(alerts)


async def test_no_panel_or_rule_names_a_metric_the_service_does_not_export(
    make_gateway: MakeGateway, http: aiohttp.ClientSession
) -> None:
    gateway = await make_gateway()
    text, _ = await scrape(http, gateway.url)
    known = exported(text) | set(re.findall(r"- record: (\S+)", RULES.read_text()))
    queries = [*dashboard_exprs(), *rule_exprs().items()]
    assert len(queries) > 30
    unknown = {
        (where, name) for where, expr in queries for name in metric_names(expr) if name not in known
    }
    assert unknown == set()


def test_metric_names_finds_every_selected_metric_and_nothing_else() -> None:
    expr = (
        'histogram_quantile(0.95, sum by (le, grpc_method) (rate(a_bucket{job=~"$job", x="y"}'
        "[$__rate_interval]))) / on (job) group_left b:ratio and c_total > 0.5 or max_over_time"
        '(d{state="open"}[5m]) == bool 1'
    )
    assert metric_names(expr) == {"a_bucket", "b:ratio", "c_total", "d"}


# --- a real Prometheus scraping a running service ----------------------------------------------


@dataclass
class Prometheus:
    url: str
    http: aiohttp.ClientSession

    async def api(self, path: str, **params: str) -> Any:
        async with self.http.get(self.url + path, params=params) as answer:
            body = await answer.json()
        assert body["status"] == "success", (path, params, body)
        return body["data"]

    async def query(self, expr: str) -> list[dict[str, Any]]:
        data = await self.api("/api/v1/query", query=expr)
        result: list[dict[str, Any]] = data["result"]
        return result

    async def scraped_since(self, moment: float) -> bool:
        """Whether it scraped the service after ``moment`` (time.time())."""
        found = await self.query(f'timestamp(up{{job="{JOB}"}})')
        return bool(found) and float(found[0]["value"][1]) > moment

    async def holds(self, expr: str) -> bool:
        return bool(await self.query(expr))


async def start_prometheus(
    binary: str, directory: Path, address: str, target: str, http: aiohttp.ClientSession
) -> tuple[Prometheus, asyncio.subprocess.Process]:
    """Prometheus on ``address`` scraping ``target`` every second, with the rules loaded."""
    config = directory / "prometheus.yml"
    config.write_text(
        json.dumps(
            {
                "global": {
                    "scrape_interval": "1s",
                    "scrape_timeout": "1s",
                    "evaluation_interval": "1s",
                },
                "rule_files": [str(RULES)],
                "scrape_configs": [
                    {"job_name": JOB, "static_configs": [{"targets": [target]}]},
                ],
            }
        )
    )
    log = directory / "prometheus.log"
    with log.open("wb") as output:
        process = await asyncio.create_subprocess_exec(
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={directory / 'data'}",
            f"--web.listen-address={address}",
            "--log.level=warn",
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    prometheus = Prometheus(f"http://{address}", http)

    async def ready() -> bool:
        assert process.returncode is None, log.read_text()
        try:
            async with http.get(prometheus.url + "/-/ready") as answer:
                return answer.status == 200
        except aiohttp.ClientConnectionError:
            return False

    await eventually(ready)
    return prometheus, process


async def test_a_real_prometheus_answers_every_panel_and_rule_and_fires_the_alerts(
    make_gateway: MakeGateway,
    interakt: FakeInterakt,
    private_redis: EmbeddedRedis,
    tmp_path: Path,
    http: aiohttp.ClientSession,
) -> None:
    binary = tool("prometheus")
    redis_server = private_redis
    gateway = reporting(
        await make_gateway(
            redis_url=redis_server.url,
            breaker_failures=4,
            breaker_cooloff_seconds=1,
            # Every request made counts (README "The rules"): phase 1 makes 5 (two sends, and
            # one of three tries), phase 2 one (the breaker refuses the rest before a request),
            # phase 3 ten; the eleventh send of phase 3 is refused.
            interakt_sends_per_minute=16,
            allowed_countries=frozenset({"91"}),
        ),
        interakt,
    )
    prometheus, process = await start_prometheus(
        binary, tmp_path, f"127.0.0.1:{free_port()}", gateway.url.removeprefix("http://"), http
    )
    try:
        started = time.time()
        await drive(gateway, interakt, prometheus, redis_server, http)
        await check_every_query(prometheus)
        picture = os.environ.get("OTP_DASHBOARD_PICTURE")
        if picture:  # docs/operations.md's picture (ops/render_dashboard.py)
            await asyncio.to_thread(render, prometheus.url, started, time.time(), Path(picture))
    finally:
        process.terminate()
        async with asyncio.timeout(PATIENCE_SECONDS):
            await process.wait()


def phone(n: int) -> str:
    return f"+9170038486{n:02d}"


async def drive(
    gateway: Gateway,
    interakt: FakeInterakt,
    prometheus: Prometheus,
    redis_server: EmbeddedRedis,
    http: aiohttp.ClientSession,
) -> None:
    """Traffic that makes every series of the dashboard and the rules, and the conditions of
    the alerts; each phase's series exist in Prometheus before the next (a counter's first
    scraped value is its start: only what comes after it is a rate)."""

    async def next_scrape() -> None:
        moment = time.time()
        await eventually(lambda: prometheus.scraped_since(moment))

    async def delivered(n: int, *reports: str) -> None:
        [message] = [m for m in interakt.queued if m.country_code + m.phone_number == phone(n)]
        for report in reports:
            reason = "not on WhatsApp" if report == "failed" else None
            assert await interakt.report(message, report, reason=reason) == 200

    # 1. One of each: a code verified, a wrong code, each report, a send Interakt fails (three
    # failures: one short of the breaker's threshold).
    _, before = await scrape(http, gateway.url)  # the process' counters, other tests' included
    await next_scrape()
    await send(gateway.stub, phone(0))
    assert (await verify(gateway.stub, code_sent_to(interakt, phone(0)), phone(0))).verified
    await send(gateway.stub, phone(1))
    await verify(gateway.stub, wrong_code(code_sent_to(interakt, phone(1))), phone(1))
    await delivered(0, "sent", "delivered", "read")
    await delivered(1, "failed")
    interakt.answer(FAILING, FAILING, FAILING)
    assert await status_of(send(gateway.stub, phone(2))) == grpc.StatusCode.UNAVAILABLE
    await next_scrape()

    # 2. Interakt fails: the breaker opens, and sends are refused at once.
    interakt.answer(FAILING)
    for n in range(3, 8):
        assert await status_of(send(gateway.stub, phone(n))) == grpc.StatusCode.UNAVAILABLE
    await eventually(lambda: prometheus.holds('otp_interakt_circuit_state{state="open"} == 1'))

    # 3. Interakt is back (the cool-off is a second: the first send after it is the trial):
    # ten sends, seven verified, three reported failed, up to the account's budget (16).
    async def trial_sent() -> bool:
        return await status_of(send(gateway.stub, phone(10))) == grpc.StatusCode.OK

    await eventually(trial_sent)
    for n in range(11, 20):
        await send(gateway.stub, phone(n))
    for n in range(10, 20):
        if n < 17:
            assert (await verify(gateway.stub, code_sent_to(interakt, phone(n)), phone(n))).verified
            await delivered(n, "sent", "delivered", "read")
        else:
            await delivered(n, "sent", "failed")
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await send(gateway.stub, phone(20))
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

    async def reports_applied() -> bool:
        _, after = await scrape(http, gateway.url)
        return delta(before, after, "otp_deliveries_total", state="failed", channel="text") == 4

    await eventually(reports_applied)

    # 4. Redis goes and comes back twice, then goes.
    async def redis_up(value: float) -> bool:
        _, samples = await scrape(http, gateway.url)
        return samples.get(("otp_redis_up", frozenset())) == value

    for _ in range(2):
        await asyncio.to_thread(redis_server.stop)
        await eventually(lambda: redis_up(0))
        await asyncio.to_thread(redis_server.start)
        await eventually(lambda: redis_up(1))
    await asyncio.to_thread(redis_server.stop)
    await eventually(lambda: redis_up(0))
    await eventually(lambda: prometheus.holds(f'otp_redis_up{{job="{JOB}"}} == 0'))


async def check_every_query(prometheus: Prometheus) -> None:
    empty = [
        (title, expr)
        for title, expr in dashboard_exprs()
        if not await prometheus.query(as_sent(expr))
    ]
    assert empty == [], "dashboard queries without data"

    groups = (await prometheus.api("/api/v1/rules"))["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    assert {rule["name"] for rule in rules} == set(rule_exprs())
    quiet = []
    for rule in rules:
        if rule["type"] == "alerting" and rule["name"] in NEEDS_A_DAY:
            await prometheus.query(rule["query"])  # it evaluates
        elif not await prometheus.query(rule["query"]):
            quiet.append(rule["name"])
    assert quiet == [], "rules without data (an alert's: its condition does not hold)"

    await eventually(
        lambda: prometheus.holds('ALERTS{alertname="OtpInteraktCircuitOpen",alertstate="firing"}')
    )
