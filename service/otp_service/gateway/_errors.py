"""Errors on the HTTP side, written as grpc-gateway writes them.

The HTTP status comes from the gRPC code (grpc-gateway's table), and the body is JSON
``{"code", "message", "details"}`` with the code's number. An RPC's error arrives as an
``RpcFailure``; an error the gateway answers itself (bad JSON, 404, 415, ...) is a ``Refusal``.
"""

from __future__ import annotations

import math
from typing import Any

import grpc
from aiohttp import web
from google.protobuf import json_format
from google.rpc import error_details_pb2, status_pb2

from otp_service.gateway._backends import RpcFailure

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


class Refusal(Exception):
    """A request the gateway answers itself with an error, instead of (or before) an RPC.

    ``message`` is for the caller and names what is wrong; ``reason`` is a short fixed name for
    the request log, which never repeats what the caller sent.
    """

    def __init__(
        self,
        status: int,
        code: grpc.StatusCode,
        message: str,
        reason: str,
        headers: dict[str, str] | None = None,
        details: list[dict[str, Any]] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.reason = reason
        self.headers = headers or {}
        self.details = details

    def response(self) -> web.Response:
        return error_response(
            self.status, self.code, self.message, self.details, headers=self.headers
        )


def invalid(message: str, reason: str) -> Refusal:
    """A 400 INVALID_ARGUMENT refusal: the request itself is wrong."""
    return Refusal(400, grpc.StatusCode.INVALID_ARGUMENT, message, reason)


def error_response(
    status: int,
    code: grpc.StatusCode,
    message: str,
    details: list[dict[str, Any]] | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    body = {"code": code.value[0], "message": message, "details": details or []}
    return web.json_response(body, status=status, headers=headers)


def rpc_error_response(exc: RpcFailure) -> web.Response:
    """The RPC's status as grpc-gateway writes it, with Retry-After from a RetryInfo detail."""
    details: list[dict[str, Any]] = []
    headers = {}
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
    return error_response(HTTP_STATUS.get(exc.code, 500), exc.code, exc.message, details, headers)


def refusal_for(exc: web.HTTPException, request: web.Request, max_body_bytes: int) -> Refusal:
    """aiohttp's own refusals (no such path, wrong method, body too large) as a Refusal."""
    headers = {}
    if isinstance(exc, web.HTTPMethodNotAllowed):
        headers["Allow"] = ", ".join(sorted(exc.allowed_methods))
        method = request.method if request.method in KNOWN_METHODS else "this method"
        message = f"{method} is not allowed on {request.path}; use {headers['Allow']}"
        return Refusal(405, grpc.StatusCode.UNIMPLEMENTED, message, "method_not_allowed", headers)
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        message = f"the body must be at most {max_body_bytes} bytes"
        return Refusal(413, grpc.StatusCode.INVALID_ARGUMENT, message, "too_large")
    if isinstance(exc, web.HTTPNotFound):
        # The path is not repeated: it is the caller's to know, and the log must not keep it.
        message = "no such path; the routes are listed in /openapi.json"
        return Refusal(404, grpc.StatusCode.NOT_FOUND, message, "no_such_path")
    return Refusal(exc.status, grpc.StatusCode.INVALID_ARGUMENT, exc.reason, "refused")


# Methods named as they are; any other (HTTP allows any token) is "other" in logs and messages.
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})
