"""The service's Prometheus metrics, in the default registry so ``/metrics`` shows every module's.

Labels are small closed sets (method, status code, outcome, channel, result, kind, route): never
a phone number, a code, a token or a path a caller chose. Code on the request path uses the
pre-bound children below, because ``labels()`` takes a lock and a dict lookup each time.
"""

from __future__ import annotations

import functools
import importlib.metadata
import platform
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import TypeVar

import grpc
from prometheus_client import (
    REGISTRY,
    Counter,
    Gauge,
    Histogram,
    Info,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

_M = TypeVar("_M", bound=MetricWrapperBase)

# Each counter and histogram would carry a `_created` series too: a timestamp per label set
# that no dashboard reads, doubling what Prometheus scrapes and stores.
disable_created_metrics()  # type: ignore[no-untyped-call]

# From well under a Redis round trip up to the longest Interakt budget.
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

# The names and labels of go-grpc-prometheus, so existing gRPC dashboards work unchanged. Every
# OtpService method is unary: grpc_type is always "unary".
RPCS_STARTED = Counter(
    "grpc_server_started_total",
    "RPCs started on the server.",
    ["grpc_type", "grpc_service", "grpc_method"],
)
RPCS_HANDLED = Counter(
    "grpc_server_handled_total",
    "RPCs completed on the server, regardless of success or failure.",
    ["grpc_type", "grpc_service", "grpc_method", "grpc_code"],
)
RPC_SECONDS = Histogram(
    "grpc_server_handling_seconds",
    "Time from an RPC's arrival to its answer.",
    ["grpc_type", "grpc_service", "grpc_method"],
    buckets=_LATENCY_BUCKETS,
)
VERIFICATIONS = Counter(
    "otp_verifications_total", "VerifyOtp answers with status OK, by outcome.", ["outcome"]
)
SENDS = Counter(
    "otp_sends_total",
    "Delivery attempts, by channel and what the upstream answered.",
    ["channel", "result"],
)
TEMPLATE_LANGUAGE_FALLBACKS = Counter(
    "otp_template_language_fallbacks_total",
    "Template sends refused for a language without an approved translation and sent again in "
    "INTERAKT_TEMPLATE_LANGUAGE, by the language refused (one configured, or other).",
    ["language"],
)
UPSTREAM_SECONDS = Histogram(
    "otp_upstream_request_seconds",
    "Duration of one request to the message provider (Interakt).",
    buckets=_LATENCY_BUCKETS,
)
LIMIT_REFUSALS = Counter(
    "otp_limit_refusals_total", "Requests refused by a limit, by kind of limit.", ["kind"]
)
AUTH_FAILURES = Counter(
    "otp_auth_failures_total",
    "Calls refused with UNAUTHENTICATED, by why: missing, malformed or unknown credential.",
    ["reason"],
)
TEST_NUMBER_USES = Counter(
    "otp_test_number_uses_total",
    "SendOtp and VerifyOtp calls for a test number (OTP_TEST_NUMBERS), by method and number.",
    ["rpc", "number"],
)
REDIS_ERRORS = Counter(
    "otp_redis_errors_total", "Redis commands that failed or timed out while serving requests."
)
CIRCUIT_STATE = Gauge(
    "otp_interakt_circuit_state",
    "The circuit breaker in front of Interakt, in this process: 1 for its state, 0 for the others.",
    ["state"],
)
_CIRCUIT_STATES = ("closed", "open", "half_open")
DELIVERY_REPORTS = Counter(
    "otp_delivery_reports_total",
    "Interakt's delivery reports (POST /webhooks/interakt), by what became of them. Answered "
    "200: applied (the state moved), unchanged (a redelivery or a late report), unknown (no "
    "live code of that message), lost (not applied before shutdown), ignored (not about a "
    "message's delivery), malformed. Not: rejected (bad signature, 401), refused (too many "
    "waiting, 503).",
    ["result"],
)
DELIVERY_REPORTS_WAITING = Gauge(
    "otp_delivery_reports_waiting",
    "Delivery reports accepted (answered 200) and not yet applied in Redis.",
)
# Conversion: codes sent and verifies answered, by calling service (the configured callers) and
# the number's country calling code ("91"; "other" outside OTP_ALLOWED_COUNTRIES). A verify of a
# code sent by one caller counts under the caller that verifies it.
CODES_SENT = Counter(
    "otp_codes_sent_total",
    "Codes sent (SendOtp answered OK with a new code), by calling service and country code.",
    ["caller", "country"],
)
VERIFIES = Counter(
    "otp_verifies_total",
    "VerifyOtp answers with status OK, by calling service, country code and outcome.",
    ["caller", "country", "outcome"],
)
# From Interakt's delivery reports: each state a message reached, counted once (the state only
# moves forward), and how long after its send it was delivered or read.
DELIVERIES = Counter(
    "otp_deliveries_total",
    "Messages whose reported state moved forward, by the state reached (sent, delivered, read, "
    "failed) and the message's channel (text, template).",
    ["state", "channel"],
)
DELIVERY_SECONDS = Histogram(
    "otp_delivery_seconds",
    "Time from a code's send to Interakt's report that its message was delivered or read.",
    ["state"],
    buckets=(0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800),
)
CODES_EXPIRED = Counter(
    "otp_codes_expired_unused_total",
    "Codes found expired and never verified, when the number's next send clears them away. A "
    "lower bound: a number that is never sent another code while an earlier code lives is not "
    "seen (docs/operations.md).",
)
# Redis as the readiness watcher sees it (a ping about once a second), and how often readiness
# changed: a count, so a flap between two scrapes is still seen.
REDIS_UP = Gauge("otp_redis_up", "1 when Redis answered the readiness watcher's last ping.")
REDIS_PING_SECONDS = Histogram(
    "otp_redis_ping_seconds",
    "Time Redis took to answer the readiness watcher's ping (a ping that timed out is not seen).",
    buckets=_LATENCY_BUCKETS,
)
READINESS_CHANGES = Counter(
    "otp_readiness_changes_total",
    "Times readiness (/readyz, the gRPC health status) changed because Redis went or came back.",
)
# The configured limit, so a dashboard and an alert can set the account's use against it.
ACCOUNT_SEND_LIMIT = Gauge(
    "otp_account_sends_per_minute_limit",
    "INTERAKT_SENDS_PER_MINUTE: messages a minute all replicas together may send.",
)
ADMIN_ACTIONS = Counter(
    "otp_admin_actions_total",
    "AdminService actions done (show, unlock, cancel); the log names the admin.",
    ["action"],
)
WITHDRAWALS_WAITING = Gauge(
    "otp_send_withdrawals_waiting",
    "Failed sends whose withdrawal waits for Redis to take it (at most "
    "store.redis_store.MAX_WAITING_WITHDRAWALS).",
)
WITHDRAWALS_GIVEN_UP = Counter(
    "otp_send_withdrawals_given_up_total",
    "Failed sends whose withdrawal was given up: Redis did not take it within the code's TTL, "
    "the process stopped, or too many were waiting. Their code stays until it expires, and "
    "the send stays counted.",
)
# What only a process serving OtpService has: `otp-service gateway --target` leaves them out of
# its /metrics rather than export series that stay zero there (tests keep this list complete).
SERVICE_METRICS: tuple[MetricWrapperBase, ...] = (
    RPCS_STARTED,
    RPCS_HANDLED,
    RPC_SECONDS,
    VERIFICATIONS,
    SENDS,
    TEMPLATE_LANGUAGE_FALLBACKS,
    UPSTREAM_SECONDS,
    LIMIT_REFUSALS,
    AUTH_FAILURES,
    REDIS_ERRORS,
    TEST_NUMBER_USES,
    CIRCUIT_STATE,
    DELIVERY_REPORTS,
    DELIVERY_REPORTS_WAITING,
    CODES_SENT,
    VERIFIES,
    DELIVERIES,
    DELIVERY_SECONDS,
    CODES_EXPIRED,
    REDIS_UP,
    REDIS_PING_SECONDS,
    READINESS_CHANGES,
    ACCOUNT_SEND_LIMIT,
    ADMIN_ACTIONS,
    WITHDRAWALS_WAITING,
    WITHDRAWALS_GIVEN_UP,
)

# The HTTP side's own, in every process that listens on OTP_HTTP_ADDRESS. `route` is one of the
# app's paths or "other".
HTTP_REQUESTS = Counter(
    "http_server_requests_total",
    "HTTP requests answered, by route and status code.",
    ["route", "code"],
)
HTTP_SECONDS = Histogram(
    "http_server_request_duration_seconds",
    "Time from an HTTP request's arrival to its answer, by route.",
    ["route"],
    buckets=_LATENCY_BUCKETS,
)
BUILD = Info("otp_service_build", "The running build: version, git commit, Python, grpcio.")


def child(metric: _M, *labels: str) -> _M:
    """The labelled child of ``metric``, bound once per label combination."""
    return _child(metric, labels)  # type: ignore[return-value]


@functools.cache
def _child(metric: MetricWrapperBase, labels: tuple[str, ...]) -> MetricWrapperBase:
    return metric.labels(*labels)


def count_send(channel: str, result: str, seconds: float | None = None) -> None:
    """One delivery attempt: its channel, the upstream's answer and, if it made one, its time."""
    child(SENDS, channel, result).inc()
    if seconds is not None:
        UPSTREAM_SECONDS.observe(seconds)


def count_limit_refusal(kind: str) -> None:
    """A request refused by the limit named ``kind`` (LimitExceeded.kind)."""
    child(LIMIT_REFUSALS, kind).inc()


def circuit_state(state: str) -> None:
    """The Interakt circuit breaker is now in ``state``: closed, open or half_open."""
    for name in _CIRCUIT_STATES:
        child(CIRCUIT_STATE, name).set(1 if name == state else 0)


def count_delivery_report(result: str, reports: int = 1) -> None:
    """Delivery reports, by what became of them (DELIVERY_REPORTS' results)."""
    child(DELIVERY_REPORTS, result).inc(reports)


def count_code_sent(caller: str, country: str) -> None:
    """A code sent for ``caller`` to a number of ``country`` (a calling code without "+")."""
    child(CODES_SENT, caller, country).inc()


def count_verify(caller: str, country: str, outcome: str) -> None:
    """A VerifyOtp answer (a VerifyOutcome's name) for ``caller``, by ``country``."""
    _verify_child(caller, country, outcome).inc()


# VerifyOtp is the hot path: one cached lookup of the child, the label made once.
@functools.cache
def _verify_child(caller: str, country: str, outcome: str) -> Counter:
    return child(VERIFIES, caller, country, outcome.lower())


def count_delivery(state: str, channel: str, seconds: float | None) -> None:
    """A message reported in ``state`` (moved forward), ``seconds`` after its send if known."""
    child(DELIVERIES, state, channel).inc()
    if seconds is not None and state in ("delivered", "read"):
        child(DELIVERY_SECONDS, state).observe(max(seconds, 0.0))


def count_http(route: str, status: int, seconds: float | None = None) -> None:
    """One HTTP answer; ``seconds`` unless it never reached the app (not HTTP at all)."""
    answers, durations = _http_children(route, status)
    answers.inc()
    if seconds is not None:
        durations.observe(seconds)


# Every HTTP answer is counted: one lookup by (route, status), both closed sets, instead of
# building and hashing two label keys a request.
@functools.cache
def _http_children(route: str, status: int) -> tuple[Counter, Histogram]:
    return child(HTTP_REQUESTS, route, str(status)), child(HTTP_SECONDS, route)


def record_build_info() -> None:
    """Fill the build-info series; once at start-up (it may run ``git``)."""
    BUILD.info(
        {
            "version": importlib.metadata.version("otp-service"),
            "commit": _git_commit(),
            "python": platform.python_version(),
            "grpcio": grpc.__version__,
        }
    )


def _git_commit() -> str:
    """The commit of the checkout this package runs from, or "unknown" (an installed copy)."""
    try:
        done = subprocess.run(
            ["git", "rev-parse", "HEAD"],  # noqa: S607 - git from PATH, if there is one
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return done.stdout.strip() or "unknown"


def exposition(*, service: bool) -> bytes:
    """/metrics in the Prometheus text format; without ``service``, no SERVICE_METRICS."""
    return generate_latest(REGISTRY if service else _WITHOUT_SERVICE)


class _Without(Collector):
    """The default registry's families except some: a view, so nothing is unregistered."""

    def __init__(self, left_out: tuple[MetricWrapperBase, ...]) -> None:
        self._left_out = frozenset(family.name for m in left_out for family in m.describe())

    def collect(self) -> Iterator[Metric]:
        for family in REGISTRY.collect():
            if family.name not in self._left_out:
                yield family


_WITHOUT_SERVICE = _Without(SERVICE_METRICS)
