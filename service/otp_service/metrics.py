"""The service's Prometheus metrics, in the default registry so ``/metrics`` shows every module's.

Labels are small closed sets (method, status code, outcome, channel, result, kind): never a phone
number, a code or a token. Code on the request path uses the pre-bound children below, because
``labels()`` takes a lock and a dict lookup each time.
"""

from __future__ import annotations

import functools
from typing import TypeVar

from prometheus_client import Counter, Histogram
from prometheus_client.metrics import MetricWrapperBase

_M = TypeVar("_M", bound=MetricWrapperBase)

# From well under a Redis round trip up to the longest Interakt budget.
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

# The names and labels of go-grpc-prometheus, so existing gRPC dashboards work unchanged.
RPCS_HANDLED = Counter(
    "grpc_server_handled_total",
    "RPCs completed, by method and status code.",
    ["grpc_service", "grpc_method", "grpc_code"],
)
RPC_SECONDS = Histogram(
    "grpc_server_handling_seconds",
    "Time from an RPC's arrival to its answer, by method.",
    ["grpc_service", "grpc_method"],
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
REDIS_ERRORS = Counter(
    "otp_redis_errors_total", "Redis commands that failed or timed out while serving requests."
)


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
