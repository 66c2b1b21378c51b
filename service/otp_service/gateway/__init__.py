"""The HTTP side: the legacy JSON routes as a gateway to the gRPC service, the ops endpoints,
and (where the service runs in this process) Interakt's delivery reports.

Each JSON route is one OtpService call through a ``Backend``: inside ``serve`` the server's own
wrapped methods, called in this process (``LocalBackend``); in ``otp-service gateway`` a remote
server over a gRPC channel (``RemoteBackend``). Either way caller auth, request logs and RPC
metrics are the gRPC service's own wrappers, and nowhere else. Errors are grpc-gateway's: the
HTTP status from the gRPC code, and a JSON body ``{"code", "message", "details"}``. Every bad
request gets such a body, never HTML.

One room per concern:

    _app.py        create_app (assembles the rooms) and HttpServer (listens, drains)
    _backends.py   LocalBackend, RemoteBackend: where a route's RPC goes
    _legacy.py     the legacy JSON routes (/api/v1/auth/...): JSON <-> protobuf, HTTP statuses
    _body.py       reading a JSON request body: content type, size, framing, nesting
    _errors.py     grpc-gateway's status table and error bodies; Refusal, an error we answer
    _observe.py    the middleware: request id, refusals, every answer counted, refusals logged
    _ops.py        /metrics, /healthz, /readyz, /openapi.json
    _webhooks.py   POST /webhooks/interakt: Interakt's delivery reports, checked, queued, applied
    openapi.json   the OpenAPI document of the JSON routes
"""

from otp_service.gateway._app import HttpServer, create_app
from otp_service.gateway._backends import Backend, LocalBackend, RemoteBackend, RpcFailure
from otp_service.gateway._body import MAX_BODY_BYTES
from otp_service.gateway._errors import HTTP_STATUS
from otp_service.gateway._legacy import ROUTES, Route
from otp_service.gateway._webhooks import SIGNATURE_HEADER, WEBHOOK_PATH, InteraktWebhook

__all__ = [
    "HTTP_STATUS",
    "MAX_BODY_BYTES",
    "ROUTES",
    "SIGNATURE_HEADER",
    "WEBHOOK_PATH",
    "Backend",
    "HttpServer",
    "InteraktWebhook",
    "LocalBackend",
    "RemoteBackend",
    "Route",
    "RpcFailure",
    "create_app",
]
