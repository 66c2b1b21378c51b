"""The legacy JSON routes: each one OtpService call, tolerant of old clients, never a false 200.

Bodies (a GET route's query parameters) and answers use the protobuf JSON mapping (proto field
names, enums by name), so a field added to the proto appears here with no new code. Old clients
are loose, as grpc-gateway lets them be: unknown fields are ignored and ``null`` means unset. A
value of the wrong JSON type is refused with the field's name and the type it needs. An answer
that is not a success is not a 200 either: a VerifyOtp outcome other than VERIFIED is a 4xx
(see ``_not_verified``), because many old clients look only at the HTTP status.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler
from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from otp_service import context
from otp_service.gateway._backends import Backend, Metadata, RpcFailure
from otp_service.gateway._body import parse_json, read_body
from otp_service.gateway._errors import invalid, rpc_error_response
from otp_service.observability import REQUEST_ID_KEY
from otp_service.servicer import message_types

# What a failed answer's status and message are, from its JSON; None for a success (200).
_Failure = Callable[[Mapping[str, Any]], tuple[int, str] | None]


@dataclass(frozen=True)
class Route:
    """One legacy JSON path and the RPC it stands for, with the RPC's message classes.

    A POST route takes the request in its JSON body, a GET route in its query parameters.
    """

    path: str
    rpc: str
    request_type: type[Message]
    response_type: type[Message]
    # Which answers, though the RPC's status is OK, are not a success over HTTP.
    failure: _Failure | None = None
    method: str = "POST"

    @classmethod
    def to(
        cls, path: str, rpc: str, failure: _Failure | None = None, *, method: str = "POST"
    ) -> Route:
        return cls(path, rpc, *message_types(rpc), failure, method)


def _not_verified(answer: Mapping[str, Any]) -> tuple[int, str] | None:
    """VerifyOtp's outcomes over HTTP: only VERIFIED is a 200 (README, openapi.json).

    No Retry-After with TOO_MANY_ATTEMPTS: waiting never makes a code verify again, only a new
    send does.
    """
    if answer["verified"]:
        return None
    outcome = answer["outcome"]
    if outcome == "VERIFY_OUTCOME_WRONG_CODE":
        left = answer["attempts_remaining"]
        return 400, f"otp_code: wrong code, {left} attempt{'' if left == 1 else 's'} left"
    if outcome == "VERIFY_OUTCOME_TOO_MANY_ATTEMPTS":
        return 429, "too many wrong codes: no code verifies until a new one is sent"
    if outcome == "VERIFY_OUTCOME_NO_ACTIVE_CODE":
        return 400, (
            "no code is waiting for this number: never sent, expired or already used; "
            "send a new one"
        )
    return 400, "the code was not verified"


ROUTES = (
    Route.to("/api/v1/auth/send-otp", "SendOtp"),
    Route.to("/api/v1/auth/verify-otp", "VerifyOtp", _not_verified),
    Route.to("/api/v1/auth/otp-status", "GetOtpStatus", method="GET"),
)


def add_legacy_routes(app: web.Application, backend: Backend) -> None:
    for route in ROUTES:
        app.router.add_route(route.method, route.path, _handler(route, backend))


def _handler(route: Route, backend: Backend) -> Handler:
    async def handle(request: web.Request) -> web.Response:
        get = route.method == "GET"
        data = _query(request) if get else parse_json(await read_body(request))
        message = _request_from(data, route)
        metadata: Metadata = [
            (REQUEST_ID_KEY, context.request_id.get()),  # set by the middleware
            *_authorization(request),
        ]
        try:
            response = await backend.call(route.rpc, message, metadata)
        except RpcFailure as exc:
            return rpc_error_response(exc)
        status, body = _answer_json(route, response.SerializeToString())
        return web.Response(status=status, body=body, content_type="application/json")

    return handle


def _query(request: web.Request) -> dict[str, str]:
    """The query parameters, each given once, as the fields of a request."""
    data = {}
    for name in request.query:
        values = request.query.getall(name)
        if len(values) > 1:
            raise invalid(f"{name[:64]}: given more than once", "repeated_parameter")
        data[name] = values[0]
    for name in ("phone_number", "phoneNumber"):
        number = data.get(name)
        if number is None or number.startswith("+"):
            continue
        if number[:1] == " " and number[1:2].isdigit():
            # A + in a query string means a space: "?phone_number=+91..." sent unencoded.
            data[name] = "+" + number[1:]
        elif number:
            raise invalid(
                "phone_number: must be in E.164 form: a leading + (written %2B in a URL's "
                "query) and country code, then digits",
                "bad_phone_number",
            )
    return data


def _authorization(request: web.Request) -> list[tuple[str, str]]:
    """Every Authorization header as metadata: two of them are refused, as over gRPC."""
    values = request.headers.getall("Authorization", [])
    for value in values:
        if not (value and value.isascii() and value.isprintable()):  # gRPC metadata cannot
            raise invalid("the Authorization header must be printable ASCII", "bad_header")
    return [("authorization", value) for value in values]


def _request_from(data: Any, route: Route) -> Message:
    """``data`` as the route's request message, by the protobuf JSON mapping.

    A request is a few string fields named by their proto names; those are set directly, as
    ParseDict would set them but without its per-field Python work (about a tenth of a REST
    verify's CPU: bench/README.md). Anything else takes the careful path below.
    """
    if type(data) is not dict:
        raise invalid("the body must be a JSON object", "not_object")
    if data.keys() <= _string_fields(route) and all(type(v) is str for v in data.values()):
        try:
            return route.request_type(**data)
        except ValueError:  # e.g. an unpaired surrogate: the careful path names the field
            pass
    return _careful_request_from(data, route)


def _careful_request_from(data: dict[str, Any], route: Route) -> Message:
    message = route.request_type()
    for key, value in data.items():
        field = _fields(route).get(key)
        if field is None or value is None:
            continue  # unknown fields are ignored and null is unset, as grpc-gateway does
        if field.type == FieldDescriptor.TYPE_STRING and not field.is_repeated:
            if type(value) is not str:
                raise invalid(_wrong_type(field.name, "a string", value), "wrong_type")
            try:
                setattr(message, field.name, value)
            except ValueError:
                raise invalid(f"{field.name}: is not valid Unicode text", "wrong_type") from None
            continue
        # Fields of other kinds (none in today's requests): the protobuf JSON mapping's rules.
        try:
            json_format.ParseDict({field.name: value}, message)
        except json_format.ParseError:
            raise invalid(f"{field.name}: not a valid value for this field", "wrong_type") from None
    return message


def _wrong_type(name: str, expected: str, value: Any) -> str:
    got = _JSON_KINDS.get(type(value), "another type")
    problem = f"{name}: expected {expected}, got {got}"
    if type(value) in (int, float):
        problem += " (send it in quotes: as a number it would lose leading zeros)"
    return problem


_JSON_KINDS = {
    bool: "true or false",
    int: "a number",
    float: "a number",
    str: "a string",
    list: "an array",
    dict: "an object",
}


@functools.cache
def _fields(route: Route) -> dict[str, Any]:
    """The request's fields by every name the JSON mapping accepts: proto and lowerCamelCase."""
    fields = route.request_type.DESCRIPTOR.fields
    return {name: field for field in fields for name in (field.name, field.json_name)}


@functools.cache
def _string_fields(route: Route) -> frozenset[str]:
    return frozenset(
        field.name
        for field in route.request_type.DESCRIPTOR.fields
        if field.type == FieldDescriptor.TYPE_STRING and not field.is_repeated
    )


# VerifyOtp has a handful of distinct answers, so their JSON is made once; an answer seen once
# (each SendOtp's) only costs a re-parse. About a tenth of a REST verify's CPU: bench/README.md.
@functools.lru_cache(maxsize=1024)
def _answer_json(route: Route, serialized: bytes) -> tuple[int, bytes]:
    """The HTTP status and JSON of an answer: proto field names, enums by name, defaults kept.

    An answer that is not a success gets the route's status for it and a ``message``.
    """
    unordered = json_format.MessageToDict(
        route.response_type.FromString(serialized),
        preserving_proto_field_name=True,
        always_print_fields_with_no_presence=True,
    )
    # In the proto's order, whichever fields are at their defaults.
    fields = route.response_type.DESCRIPTOR.fields
    answer = {field.name: unordered[field.name] for field in fields if field.name in unordered}
    failed = route.failure(answer) if route.failure is not None else None
    if failed is None:
        return 200, json.dumps(answer).encode()
    status, message = failed
    return status, json.dumps({**answer, "message": message}).encode()
