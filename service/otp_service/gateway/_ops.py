"""The endpoints operators and platforms use: /metrics, /healthz, /readyz, /openapi.json."""

from __future__ import annotations

import importlib.resources
from collections.abc import Awaitable, Callable

import grpc
import prometheus_client
from aiohttp import web
from google.protobuf import json_format

from otp_service import metrics
from otp_service.auth import DENIED, Callers
from otp_service.errors import NotAuthenticated
from otp_service.gateway._backends import Backend
from otp_service.gateway._errors import Refusal
from otp_service.servicer import status_for

_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# The details of an RPC refused for its token, in the JSON mapping: /metrics refuses the same way.
_DENIED = [
    json_format.MessageToDict(detail, preserving_proto_field_name=True)
    for detail in status_for(NotAuthenticated(DENIED)).details
]


class Readiness:
    """Whether /readyz may say ready: off for good once shutdown begins (``HttpServer.unready``)."""

    def __init__(self) -> None:
        self.shutting_down = False


def add_ops_routes(
    app: web.Application,
    backend: Backend,
    readiness: Readiness,
    *,
    callers: Callers | None,
    service_metrics: bool,
) -> None:
    """The ops endpoints; with ``callers``, /metrics and /openapi.json need a caller token.

    The probes never do: a kubelet has no token. ``service_metrics``: whether this process
    serves OtpService, so that its RPC and ``otp_*`` series belong in /metrics.
    """
    openapi = importlib.resources.files(__package__).joinpath("openapi.json").read_bytes()

    async def openapi_json(request: web.Request) -> web.Response:
        return web.Response(body=openapi, content_type="application/json")

    async def metrics_text(request: web.Request) -> web.Response:
        return web.Response(
            body=metrics.exposition(service=service_metrics),
            headers={"Content-Type": prometheus_client.CONTENT_TYPE_LATEST},
        )

    async def readyz(request: web.Request) -> web.Response:
        # The gRPC health status is the one truth: it follows Redis, and goes NOT_SERVING first
        # on shutdown. A gateway in front of a remote server goes unready on its own shutdown.
        ready = not readiness.shutting_down and await backend.ready()
        return web.json_response(
            {"status": "ready" if ready else "not ready"}, status=200 if ready else 503
        )

    app.router.add_get("/openapi.json", _guarded(openapi_json, callers))
    app.router.add_get("/metrics", _guarded(metrics_text, callers))
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", readyz)


def _guarded(handler: _Handler, callers: Callers | None) -> _Handler:
    if callers is None:
        return handler

    async def guarded(request: web.Request) -> web.StreamResponse:
        if callers.authenticate(request.headers.getall("Authorization", [])) is None:
            raise Refusal(
                401, grpc.StatusCode.UNAUTHENTICATED, DENIED, "unauthenticated", details=_DENIED
            )
        return await handler(request)

    return guarded


async def _healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "alive"})
