"""The HTTP face: the legacy JSON routes as a gateway to the gRPC service, and the ops endpoints.

Each JSON route is one OtpService call through a ``Backend``: inside ``serve`` the server's own
wrapped methods, called in this process (``LocalBackend``); in ``otp-service gateway`` a remote
server over a gRPC channel (``RemoteBackend``). Either way caller auth, request logs and RPC
metrics are the gRPC service's own wrappers, and nowhere else. Bodies and answers use the
protobuf JSON mapping (proto field names, enums by name): a field added to the proto appears
here with no new code. Errors are grpc-gateway's: the HTTP status from the gRPC code, and a JSON
body ``{"code", "message", "details"}``. Every bad request gets such a body, never HTML.
"""

from __future__ import annotations

import functools
import importlib.resources
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn, Protocol

import grpc
import prometheus_client
from aiohttp import web
from google.protobuf import json_format
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from otp.v1 import otp_pb2_grpc

from otp_service.auth import DENIED, Callers
from otp_service.observability import REQUEST_ID_KEY, sane_request_id
from otp_service.server import SERVICE_NAME
from otp_service.servicer import Behavior, message_types

log = logging.getLogger(__name__)

# The requests are two short strings; a few KiB leaves room for new fields.
MAX_BODY_BYTES = 4 * 1024
# Safety net only: the service bounds its own work (Redis and Interakt timeouts) well below this.
RPC_DEADLINE_SECONDS = 30.0
READY_CHECK_SECONDS = 1.0

# grpc-gateway's runtime.HTTPStatusFromCode.
HTTP_STATUS = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DATA_LOSS: 500,
}
# The gRPC code reported for errors the gateway itself answers (the reverse of the table).
_CODE_FOR_HTTP = {
    404: grpc.StatusCode.NOT_FOUND,
    405: grpc.StatusCode.UNIMPLEMENTED,
    413: grpc.StatusCode.INVALID_ARGUMENT,
    415: grpc.StatusCode.INVALID_ARGUMENT,
}


@dataclass(frozen=True)
class Route:
    """One legacy JSON path and the RPC it stands for, with the RPC's message classes."""

    path: str
    rpc: str
    request_type: type[Message]
    response_type: type[Message]

    @classmethod
    def to(cls, path: str, rpc: str) -> Route:
        return cls(path, rpc, *message_types(rpc))


ROUTES = (
    Route.to("/api/v1/auth/send-otp", "SendOtp"),
    Route.to("/api/v1/auth/verify-otp", "VerifyOtp"),
)

_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_Metadata = Sequence[tuple[str, str | bytes]]
_READY = health_pb2.HealthCheckRequest(service=SERVICE_NAME)


class RpcFailure(Exception):
    """A call that ended with a status other than OK: its code, message and trailing metadata."""

    def __init__(self, code: grpc.StatusCode, message: str, trailing_metadata: _Metadata) -> None:
        super().__init__(code, message)
        self.code = code
        self.message = message
        self.trailing_metadata = trailing_metadata


class Backend(Protocol):
    """Where the gateway's calls go."""

    async def call(self, rpc: str, request: Message, metadata: _Metadata) -> Message:
        """The answer of OtpService method ``rpc``; raise RpcFailure for any other status."""

    async def ready(self) -> bool:
        """Whether the service reports SERVING (the gRPC health status, the one truth)."""


class RemoteBackend:
    """A gRPC server over ``channel``: ``otp-service gateway --target``."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        stub = otp_pb2_grpc.OtpServiceStub(channel)
        self._calls = {route.rpc: getattr(stub, route.rpc) for route in ROUTES}
        self._health: Any = health_pb2_grpc.HealthStub(channel)  # its typing stub lacks methods

    async def call(self, rpc: str, request: Message, metadata: _Metadata) -> Message:
        try:
            response: Message = await self._calls[rpc](
                request, metadata=metadata, timeout=RPC_DEADLINE_SECONDS
            )
        except grpc.aio.AioRpcError as exc:
            trailing = tuple(exc.trailing_metadata() or ())
            raise RpcFailure(exc.code(), exc.details() or "", trailing) from None
        return response

    async def ready(self) -> bool:
        # Asking over the channel also proves the remote server answers at all.
        try:
            answer = await self._health.Check(_READY, timeout=READY_CHECK_SECONDS)
        except grpc.aio.AioRpcError:
            return False
        return bool(answer.status == health_pb2.HealthCheckResponse.SERVING)


class LocalBackend:
    """The server's own wrapped methods, called in this process: ``otp-service serve``.

    The same behaviours a gRPC call runs (request log, metrics, caller auth, errors as
    statuses), without a second trip through gRPC over loopback, which was most of a REST
    call's cost (bench/README.md). aiohttp runs each request in a task of its own with a copy
    of the context, as gRPC does each call, so what a call sets (its caller, its request id)
    is not seen by the next request on the same keep-alive connection.
    """

    def __init__(
        self, behaviors: Mapping[str, Behavior], health: health.aio.HealthServicer
    ) -> None:
        self._behaviors = behaviors
        self._health = health

    async def call(self, rpc: str, request: Message, metadata: _Metadata) -> Message:
        response: Message = await self._run(self._behaviors[rpc], request, metadata)
        return response

    async def ready(self) -> bool:
        try:
            answer = await self._run(self._health.Check, _READY, ())
        except RpcFailure:
            return False
        return bool(answer.status == health_pb2.HealthCheckResponse.SERVING)

    @staticmethod
    async def _run(
        behavior: Callable[[Any, Any], Coroutine[Any, Any, Any]], request: Any, metadata: _Metadata
    ) -> Any:
        call = _LocalCall(metadata)
        try:
            return await behavior(request, call)
        except grpc.aio.AbortError:
            raise RpcFailure(call.code(), call.details, call.trailing_metadata) from None


class _LocalCall:
    """What the wrapped behaviours use of a gRPC ServicerContext, for a call made in-process."""

    def __init__(self, metadata: _Metadata) -> None:
        self._metadata = tuple(metadata)
        self._deadline = time.monotonic() + RPC_DEADLINE_SECONDS
        self._code = grpc.StatusCode.OK
        self.details = ""
        self.trailing_metadata: _Metadata = ()

    def invocation_metadata(self) -> _Metadata:
        return self._metadata

    def time_remaining(self) -> float:
        return max(0.0, self._deadline - time.monotonic())

    def code(self) -> grpc.StatusCode:
        return self._code

    async def abort(
        self, code: grpc.StatusCode, details: str = "", trailing_metadata: _Metadata = ()
    ) -> NoReturn:
        self._code, self.details, self.trailing_metadata = code, details, trailing_metadata
        raise grpc.aio.AbortError(f"aborted with {code.name}")


def create_app(backend: Backend, callers: Callers | None = None) -> web.Application:
    """The HTTP application, calling the service through ``backend``.

    With ``callers``, /metrics and /openapi.json need a caller token too (OTP_METRICS_AUTH).
    """
    app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[_json_errors])
    for route in ROUTES:
        app.router.add_post(route.path, _gateway_handler(route, backend))
    openapi = importlib.resources.files(__package__).joinpath("openapi.json").read_bytes()

    async def openapi_json(request: web.Request) -> web.Response:
        return web.Response(body=openapi, content_type="application/json")

    async def readyz(request: web.Request) -> web.Response:
        # The gRPC health status is the one truth: it follows Redis, and goes NOT_SERVING first
        # on shutdown.
        ready = await backend.ready()
        return web.json_response(
            {"status": "ready" if ready else "not ready"}, status=200 if ready else 503
        )

    app.router.add_get("/openapi.json", _guarded(openapi_json, callers))
    app.router.add_get("/metrics", _guarded(_metrics, callers))
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", readyz)
    return app


def _guarded(handler: _Handler, callers: Callers | None) -> _Handler:
    if callers is None:
        return handler

    async def guarded(request: web.Request) -> web.StreamResponse:
        if callers.authenticate(request.headers.getall("Authorization", [])) is None:
            return _error(401, grpc.StatusCode.UNAUTHENTICATED, DENIED)
        return await handler(request)

    return guarded


def _gateway_handler(route: Route, backend: Backend) -> _Handler:
    async def handle(request: web.Request) -> web.Response:
        request_id = sane_request_id(request.headers.get(REQUEST_ID_KEY))
        headers = {"X-Request-Id": request_id}
        if request.content_type != "application/json":
            got = request.headers.get("Content-Type")
            return _error(
                415,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"Content-Type must be application/json, not {got!r}"
                if got
                else "Content-Type must be application/json, and it is missing",
                headers=headers,
            )
        try:
            data = json.loads(await request.read())
        except ValueError:
            return _invalid("the body is not valid JSON", headers)
        if not isinstance(data, dict):
            return _invalid("the body must be a JSON object", headers)
        try:
            message = _request_from(data, route)
        except json_format.ParseError as exc:
            return _invalid(str(exc).split("\n", 1)[0], headers)

        metadata = [(REQUEST_ID_KEY, request_id)]
        authorization = request.headers.get("Authorization")
        if authorization is not None:
            if not _metadata_safe(authorization):
                return _invalid("the Authorization header must be printable ASCII", headers)
            metadata.append(("authorization", authorization))
        try:
            response = await backend.call(route.rpc, message, metadata)
        except RpcFailure as exc:
            return _rpc_error(exc, headers)
        body = _answer_json(route, response.SerializeToString())
        return web.Response(body=body, content_type="application/json", headers=headers)

    return handle


def _request_from(data: dict[str, Any], route: Route) -> Message:
    """``data`` as the route's request message, by the protobuf JSON mapping.

    A request is a few string fields named by their proto names; those are set directly, as
    ParseDict would set them but without its per-field Python work (about a tenth of a REST
    verify's CPU: bench/README.md). Anything else (camelCase names, other types, unknown
    fields, text protobuf refuses) goes to ParseDict, which also names what is wrong.
    """
    if data.keys() <= _string_fields(route) and all(type(v) is str for v in data.values()):
        try:
            return route.request_type(**data)
        except ValueError:  # e.g. an unpaired surrogate
            pass
    return json_format.ParseDict(data, route.request_type())


@functools.cache
def _string_fields(route: Route) -> frozenset[str]:
    return frozenset(
        field.name
        for field in route.request_type.DESCRIPTOR.fields
        if field.type == field.TYPE_STRING and not field.is_repeated
    )


# VerifyOtp has a handful of distinct answers, so their JSON is made once; an answer seen once
# (each SendOtp's) only costs a re-parse. About a tenth of a REST verify's CPU: bench/README.md.
@functools.lru_cache(maxsize=1024)
def _answer_json(route: Route, serialized: bytes) -> bytes:
    """The answer's JSON: proto field names, enums by name, fields at their defaults included."""
    answer = json_format.MessageToDict(
        route.response_type.FromString(serialized),
        preserving_proto_field_name=True,
        always_print_fields_with_no_presence=True,
    )
    return json.dumps(answer).encode()


def _rpc_error(exc: RpcFailure, headers: dict[str, str]) -> web.Response:
    """The gRPC status as grpc-gateway writes it, with Retry-After from a RetryInfo detail."""
    details: list[dict[str, Any]] = []
    for key, value in exc.trailing_metadata:
        if key != "grpc-status-details-bin" or not isinstance(value, bytes):
            continue
        for detail in status_pb2.Status.FromString(value).details:
            retry = error_details_pb2.RetryInfo()
            if detail.Unpack(retry):
                delay = retry.retry_delay
                headers["Retry-After"] = str(max(0, math.ceil(delay.seconds + delay.nanos / 1e9)))
            try:
                details.append(json_format.MessageToDict(detail, preserving_proto_field_name=True))
            except TypeError:  # a detail type this process does not know: say which it was
                details.append({"@type": detail.type_url})
    return _error(HTTP_STATUS.get(exc.code, 500), exc.code, exc.message, details, headers)


def _error(
    status: int,
    code: grpc.StatusCode,
    message: str,
    details: list[dict[str, Any]] | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    body = {"code": code.value[0], "message": message, "details": details or []}
    return web.json_response(body, status=status, headers=headers)


def _invalid(message: str, headers: dict[str, str]) -> web.Response:
    return _error(400, grpc.StatusCode.INVALID_ARGUMENT, message, headers=headers)


def _metadata_safe(value: str) -> bool:
    """Whether gRPC metadata can carry ``value`` (printable ASCII)."""
    return bool(value) and value.isascii() and value.isprintable()


@web.middleware
async def _json_errors(request: web.Request, handler: _Handler) -> web.StreamResponse:
    """aiohttp's own refusals (404, 405, 413) and any bug as JSON errors instead of text."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        headers = {}
        if isinstance(exc, web.HTTPMethodNotAllowed):
            headers["Allow"] = ", ".join(sorted(exc.allowed_methods))
            message = f"{request.method} is not allowed on {request.path}; use {headers['Allow']}"
        elif isinstance(exc, web.HTTPRequestEntityTooLarge):
            message = f"the body must be at most {MAX_BODY_BYTES} bytes"
        elif isinstance(exc, web.HTTPNotFound):
            message = f"no such path: {request.path}"
        else:
            message = exc.reason
        code = _CODE_FOR_HTTP.get(exc.status, grpc.StatusCode.INVALID_ARGUMENT)
        return _error(exc.status, code, message, headers=headers)
    except Exception:
        log.exception("unexpected error in the HTTP gateway")
        return _error(500, grpc.StatusCode.INTERNAL, "internal error")


async def _metrics(request: web.Request) -> web.Response:
    return web.Response(
        body=prometheus_client.generate_latest(),
        headers={"Content-Type": prometheus_client.CONTENT_TYPE_LATEST},
    )


async def _healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "alive"})


class HttpServer:
    """The HTTP application listening on an address; ``port`` is the one it bound."""

    def __init__(self, runner: web.AppRunner, host: str, port: int) -> None:
        self._runner = runner
        self.port = port
        self.address = f"{host}:{port}"

    @classmethod
    async def start(
        cls,
        address: str,
        backend: Backend,
        *,
        shutdown_timeout: float,
        reuse_port: bool = False,
        callers: Callers | None = None,
    ) -> HttpServer:
        """Listen on ``address`` ("host:port"; port 0 picks a free one).

        ``reuse_port`` lets the worker processes of ``serve --workers N`` share the port;
        ``callers``, when given, guard /metrics and /openapi.json.
        """
        host, _, port = address.rpartition(":")
        runner = web.AppRunner(
            create_app(backend, callers), access_log=None, shutdown_timeout=shutdown_timeout
        )
        await runner.setup()
        try:
            site = web.TCPSite(runner, host.strip("[]"), int(port), reuse_port=reuse_port or None)
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        return cls(runner, host, runner.addresses[0][1])

    async def close(self) -> None:
        """Stop listening and finish the requests in progress (up to the shutdown timeout)."""
        await self._runner.cleanup()
