"""What operators see of the HTTP side: every answer counted, every refusal logged, no traces.

Every HTTP answer is counted in ``http_server_requests_total{route, code}`` and timed. An
answer that comes from an RPC is logged by the service's own wrappers (in this process under
``serve``, in the target server under ``gateway --target``); the answers the gateway makes
itself (bad JSON, 404, 405, 413, 415, a request that is not HTTP at all) get a request line of
their own here, at INFO: what a caller sends before authenticating never logs an ERROR. Route
labels are the app's own paths, anything else is ``other``, so a scan of random paths adds no
series.
"""

from __future__ import annotations

import logging
import time

import grpc
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.typedefs import Handler, Middleware
from aiohttp.web_protocol import RequestPayloadError

from otp_service import context, metrics
from otp_service.gateway._errors import KNOWN_METHODS, Refusal, error_response, refusal_for
from otp_service.observability import REQUEST_ID_KEY, REQUEST_LOGGER, sane_request_id

OTHER = "other"

log = logging.getLogger(__name__)
_requests_log = logging.getLogger(REQUEST_LOGGER)


def observing(paths: frozenset[str], max_body_bytes: int) -> Middleware:
    """The app's one middleware: request id, refusals as JSON errors, the count of each answer.

    ``paths`` are the app's routes (the only route labels); ``max_body_bytes`` is named in the
    413 message.
    """

    @web.middleware
    async def observe(request: web.Request, handler: Handler) -> web.StreamResponse:
        start = time.perf_counter()
        request_id = sane_request_id(request.headers.get(REQUEST_ID_KEY))
        # For every line logged while serving the request; the JSON routes send it on too.
        context.request_id.set(request_id)
        route = request.path if request.path in paths else OTHER
        response: web.StreamResponse
        try:
            response = await handler(request)
        except Refusal as refusal:
            response = _refused(request, route, refusal, start)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            response = _refused(request, route, refusal_for(exc, request, max_body_bytes), start)
        except ConnectionError:
            # The client went away before its body arrived: nobody will read the answer.
            closed = Refusal(
                499, grpc.StatusCode.CANCELLED, "the client closed the connection", "client_closed"
            )
            response = _refused(request, route, closed, start)
        except Exception:
            log.exception(
                "unexpected error in the HTTP gateway",
                extra={"event": "http_internal_error", "route": route},
            )
            response = error_response(500, grpc.StatusCode.INTERNAL, "internal error")
        response.headers["X-Request-Id"] = request_id
        metrics.count_http(route, response.status, time.perf_counter() - start)
        return response

    return observe


def _refused(request: web.Request, route: str, refusal: Refusal, start: float) -> web.Response:
    method = request.method if request.method in KNOWN_METHODS else OTHER
    log_refusal(method, route, refusal, time.perf_counter() - start)
    return refusal.response()


def log_refusal(method: str, route: str, refusal: Refusal, seconds: float) -> None:
    """The request line of an answer the gateway made itself."""
    _requests_log.info(
        "%s %s answered %d: %s",
        method,
        route,
        refusal.status,
        refusal.message,
        extra={
            "event": "http_request",
            "transport": "http",
            "method": method,
            "route": route,
            "http_status": refusal.status,
            "status": refusal.code.name,
            "reason": refusal.reason,
            "duration_ms": round(seconds * 1000, 2),
        },
    )


class _NotHttp(logging.Filter):
    """Keeps aiohttp from logging a caller's malformed request as an ERROR with a trace.

    aiohttp answers a request that is not valid HTTP (a bad header, a line too long, broken
    chunked framing) with a plain-text 400 before the app sees it, and logs the parser's
    exception at ERROR on its server logger. That is the caller's mistake: it is counted and
    logged here as a refusal, at INFO. When a body the app already answered turns out broken,
    aiohttp logs that too while draining it; that request has its line already.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError) and 400 <= exc.code < 500:
            refusal = Refusal(
                exc.code,
                grpc.StatusCode.INVALID_ARGUMENT,
                "the request is not valid HTTP",
                "malformed_http",
            )
            metrics.count_http(OTHER, exc.code)
            log_refusal(OTHER, OTHER, refusal, 0.0)
            return False
        return not isinstance(exc, RequestPayloadError)


# The logger the app's aiohttp server writes to (``HttpServer``), in place of "aiohttp.server".
PROTOCOL_LOG = logging.getLogger("otp_service.gateway.http")
PROTOCOL_LOG.addFilter(_NotHttp())
