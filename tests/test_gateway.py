"""The legacy JSON routes through the real gateway and the real gRPC server."""

from __future__ import annotations

import asyncio
import importlib.resources
import json
import logging
from collections.abc import AsyncIterator, Mapping
from http import HTTPStatus
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import grpc
import pytest
import redis
from aiohttp import web
from google.protobuf.descriptor import Descriptor
from grpc_health.v1 import health
from multidict import MultiDict
from otp.v1 import otp_pb2, otp_pb2_grpc

from otp_service.connections.embedded_redis import free_port
from otp_service.gateway import (
    ROUTES,
    Backend,
    HttpServer,
    LocalBackend,
    RemoteBackend,
    create_app,
)
from tests.conftest import (
    PATIENCE_SECONDS,
    PHONE,
    TOKEN,
    MakeGateway,
    MakeServer,
    delta,
    eventually,
    redis_snapshot,
    scrape,
    wrong_code,
)
from tests.fake_interakt import NOT_A_CONTACT, Answer, FakeInterakt

SEND = "/api/v1/auth/send-otp"
VERIFY = "/api/v1/auth/verify-otp"


async def post(
    http: aiohttp.ClientSession, url: str, body: Any, **headers: str
) -> tuple[int, Mapping[str, str], Any]:
    """POST ``body`` as JSON; the status, the headers and the decoded JSON answer."""
    async with http.post(url, json=body, headers=headers) as response:
        assert response.content_type == "application/json"
        return response.status, response.headers.copy(), await response.json()


async def test_send_then_verify_with_the_delivered_code(
    make_gateway: MakeGateway, http: aiohttp.ClientSession, interakt: FakeInterakt
) -> None:
    gateway = await make_gateway()
    status, headers, sent = await post(http, gateway.url + SEND, {"phone_number": PHONE})
    assert status == 200
    assert sent["channel"] == "CHANNEL_TEXT"
    assert sent["message_id"] == "msg-1"
    assert sent["resend_after_seconds"] == 30
    assert sent["expires_at"].endswith("Z")
    assert headers["X-Request-Id"]
    code = interakt.received[0].code

    status, _, wrong = await post(
        http, gateway.url + VERIFY, {"phone_number": PHONE, "otp_code": wrong_code(code)}
    )
    # Not verified is never a 200: old clients often look at the status only. Fields with
    # default values are written too, so old clients always find every key.
    assert (status, wrong) == (
        400,
        {
            "verified": False,
            "outcome": "VERIFY_OUTCOME_WRONG_CODE",
            "attempts_remaining": 4,
            "message": "otp_code: wrong code, 4 attempts left",
        },
    )
    assert list(wrong) == ["verified", "outcome", "attempts_remaining", "message"]  # as in README
    status, _, verified = await post(
        http, gateway.url + VERIFY, {"phone_number": PHONE, "otp_code": code}
    )
    assert (status, verified) == (
        200,
        {"verified": True, "outcome": "VERIFY_OUTCOME_VERIFIED", "attempts_remaining": 0},
    )


async def test_limit_is_429_with_retry_after_and_the_error_info_and_retry_info_details(
    make_gateway: MakeGateway, http: aiohttp.ClientSession
) -> None:
    gateway = await make_gateway()
    assert (await post(http, gateway.url + SEND, {"phone_number": PHONE}))[0] == 200
    status, headers, body = await post(http, gateway.url + SEND, {"phone_number": PHONE})
    assert status == 429
    assert headers["Retry-After"] == "30"
    assert body == {
        "code": grpc.StatusCode.RESOURCE_EXHAUSTED.value[0],
        "message": "phone_number: a code was sent moments ago",
        "details": [
            {
                "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                "reason": "RESEND_COOLDOWN",
                "domain": "otp-service",
                "metadata": {"cooldown_seconds": "30"},
            },
            {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retry_delay": "30s"},
        ],
    }


async def test_invalid_input_carries_error_info_and_bad_request_in_the_json_mapping(
    make_gateway: MakeGateway, http: aiohttp.ClientSession
) -> None:
    gateway = await make_gateway()
    status, _, body = await post(http, gateway.url + VERIFY, {"phone_number": PHONE})
    assert status == 400
    assert body["details"] == [
        {
            "@type": "type.googleapis.com/google.rpc.ErrorInfo",
            "reason": "INVALID_CODE",
            "domain": "otp-service",
            "metadata": {"field": "otp_code"},
        },
        {
            "@type": "type.googleapis.com/google.rpc.BadRequest",
            "field_violations": [{"field": "otp_code", "description": "is required"}],
        },
    ]


async def test_service_errors_keep_their_message(
    make_gateway: MakeGateway, http: aiohttp.ClientSession, interakt: FakeInterakt
) -> None:
    gateway = await make_gateway()
    status, _, body = await post(http, gateway.url + SEND, {"phone_number": "12345"})
    assert status == 400
    assert body["code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert body["message"].startswith("phone_number: ")

    interakt.answer(Answer(status=400, body={"result": False, "message": NOT_A_CONTACT}))
    status, _, body = await post(http, gateway.url + SEND, {"phone_number": PHONE})
    assert status == 400
    assert body["code"] == grpc.StatusCode.FAILED_PRECONDITION.value[0]
    assert "not a contact" in body["message"]

    interakt.answer(*[Answer(status=503, body={})] * 3)
    # Another number: the refused one is held in its cooldown.
    status, _, body = await post(http, gateway.url + SEND, {"phone_number": "+917003848502"})
    assert status == 503
    assert body["code"] == grpc.StatusCode.UNAVAILABLE.value[0]


async def test_json_names_and_each_answer_of_the_protobuf_mapping(
    make_gateway: MakeGateway, http: aiohttp.ClientSession, interakt: FakeInterakt
) -> None:
    gateway = await make_gateway()
    # The mapping's lowerCamelCase names are accepted as well as the proto names.
    status, _, sent = await post(http, gateway.url + SEND, {"phoneNumber": PHONE})
    assert status == 200
    assert sent["channel"] == "CHANNEL_TEXT"
    code = interakt.received[-1].code
    wrong = wrong_code(code)
    answers = []
    for body, expected in (
        ({"phone_number": PHONE, "otp_code": wrong}, 400),
        ({"phoneNumber": PHONE, "otpCode": wrong}, 400),
        ({"phone_number": PHONE, "otp_code": code}, 200),
        ({"phone_number": PHONE, "otp_code": code}, 400),
    ):
        status, _, answer = await post(http, gateway.url + VERIFY, body)
        assert status == expected
        answers.append(answer)
    first, second, right, again = answers
    # Answers that differ in one field are not mixed up, and defaults are written out.
    assert first["outcome"] == second["outcome"] == "VERIFY_OUTCOME_WRONG_CODE"
    assert first["attempts_remaining"] == second["attempts_remaining"] + 1
    assert right == {
        "verified": True,
        "outcome": "VERIFY_OUTCOME_VERIFIED",
        "attempts_remaining": 0,
    }
    assert again == {
        "verified": False,
        "outcome": "VERIFY_OUTCOME_NO_ACTIVE_CODE",
        "attempts_remaining": 0,
        "message": "no code is waiting for this number: never sent, expired or already used; "
        "send a new one",
    }


async def test_legacy_verify_is_2xx_only_for_a_verified_code(
    make_gateway: MakeGateway, http: aiohttp.ClientSession, interakt: FakeInterakt
) -> None:
    gateway = await make_gateway(max_attempts=1)
    assert (await post(http, gateway.url + SEND, {"phone_number": PHONE}))[0] == 200
    code = interakt.received[-1].code
    body = {"phone_number": PHONE, "otp_code": wrong_code(code)}
    status, headers, wrong = await post(http, gateway.url + VERIFY, body)
    assert (status, wrong["message"]) == (400, "otp_code: wrong code, 0 attempts left")

    status, headers, locked = await post(http, gateway.url + VERIFY, {**body, "otp_code": code})
    assert status == 429
    # Waiting never makes a code verify again (a new send does): no Retry-After to wait for.
    assert "Retry-After" not in headers
    assert locked == {
        "verified": False,
        "outcome": "VERIFY_OUTCOME_TOO_MANY_ATTEMPTS",
        "attempts_remaining": 0,
        "message": "too many wrong codes: no code verifies until a new one is sent",
    }
    # gRPC keeps its semantics: status OK with the outcome.
    answer = await gateway.stub.VerifyOtp(
        otp_pb2.VerifyOtpRequest(phone_number=PHONE, otp_code=code), timeout=10
    )
    assert answer.outcome == otp_pb2.VERIFY_OUTCOME_TOO_MANY_ATTEMPTS


async def test_old_clients_unknown_fields_and_nulls_are_ignored(
    make_gateway: MakeGateway, http: aiohttp.ClientSession, interakt: FakeInterakt
) -> None:
    gateway = await make_gateway()
    body = {"phone_number": PHONE, "session_id": "abc", "channel": None, "retries": [1, {}]}
    status, _, sent = await post(http, gateway.url + SEND, body)
    assert status == 200
    assert sent["channel"] == "CHANNEL_TEXT"
    code = interakt.received[-1].code
    body = {"phone_number": PHONE, "otp_code": code, "otpCode": None, "session_id": 7}
    status, _, verified = await post(http, gateway.url + VERIFY, body)
    assert (status, verified["verified"]) == (200, True)


async def test_a_numeric_code_is_refused_it_would_lose_its_leading_zeros(
    make_gateway: MakeGateway,
    http: aiohttp.ClientSession,
    interakt: FakeInterakt,
    redis_db: redis.Redis,
) -> None:
    gateway = await make_gateway()
    assert (await post(http, gateway.url + SEND, {"phone_number": PHONE}))[0] == 200
    before = redis_snapshot(redis_db)
    for number in (12345, 12345.0, 1e5, True):
        status, _, answer = await post(
            http, gateway.url + VERIFY, {"phone_number": PHONE, "otp_code": number}
        )
        assert status == 400
        assert answer["code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        assert answer["message"].startswith("otp_code: expected a string, got ")
    assert answer["message"] == "otp_code: expected a string, got true or false"
    assert (
        "leading zeros"
        in (await post(http, gateway.url + VERIFY, {"phone_number": PHONE, "otp_code": 12345}))[2][
            "message"
        ]
    )
    # Refused before the service: no attempt was counted.
    assert redis_snapshot(redis_db) == before


BAD_REQUESTS = [
    pytest.param(
        b'{"phone_number": ', "application/json", 400, "not valid JSON", id="invalid-json"
    ),
    pytest.param(b"\xff\xfe{}", "application/json", 400, "not valid JSON", id="not-utf8"),
    pytest.param(b"[]", "application/json", 400, "must be a JSON object", id="array"),
    pytest.param(b"null", "application/json", 400, "must be a JSON object", id="null"),
    pytest.param(
        b'{"phone_number": 917003848501}',
        "application/json",
        400,
        "phone_number: expected a string, got a number (send it in quotes: as a number it "
        "would lose leading zeros)",
        id="wrong-type",
    ),
    pytest.param(
        b'{"phoneNumber": ["+917003848501"]}',
        "application/json",
        400,
        "phone_number: expected a string, got an array",
        id="wrong-type-camel-case",
    ),
    pytest.param(
        b'{"phone_number": {"e164": "+917003848501"}, "admin": true}',
        "application/json",
        400,
        "phone_number: expected a string, got an object",
        id="wrong-type-and-unknown-field",
    ),
    pytest.param(
        b'{"phone_number": "\\ud800"}',
        "application/json",
        400,
        "phone_number: is not valid Unicode text",
        id="unpaired-surrogate",
    ),
    # 1,200 nested arrays in 2.4 KB: json's parser runs out of stack (a 500 and a trace, once).
    pytest.param(
        b"[" * 1200 + b"]" * 1200,
        "application/json",
        400,
        "the body nests arrays or objects too deeply",
        id="nested-arrays",
    ),
    pytest.param(
        b'{"phone_number": ' + b"[" * 1500 + b"]" * 1500 + b"}",
        "application/json",
        400,
        "the body nests arrays or objects too deeply",
        id="nested-in-a-field",
    ),
    pytest.param(b'{"phone_number": "x"}', "text/plain", 415, "application/json", id="text/plain"),
    pytest.param(
        b"phone_number=%2B917003848501",
        "application/x-www-form-urlencoded",
        415,
        "application/json",
        id="form",
    ),
    pytest.param(
        json.dumps({"phone_number": "+" + "1" * 5000}).encode(),
        "application/json",
        413,
        "at most 4096 bytes",
        id="too-large",
    ),
]


@pytest.mark.parametrize(("body", "content_type", "status", "says"), BAD_REQUESTS)
async def test_bad_input_is_a_json_4xx_that_changes_nothing(
    make_gateway: MakeGateway,
    http: aiohttp.ClientSession,
    interakt: FakeInterakt,
    redis_db: redis.Redis,
    body: bytes,
    content_type: str,
    status: int,
    says: str,
) -> None:
    gateway = await make_gateway()
    before = redis_snapshot(redis_db)
    async with http.post(
        gateway.url + SEND, data=body, headers={"Content-Type": content_type}
    ) as response:
        assert response.status == status
        assert response.content_type == "application/json"
        answer = await response.json()
    assert answer["code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert says in answer["message"]
    assert answer["details"] == []
    assert interakt.received == []
    assert redis_snapshot(redis_db) == before


@pytest.mark.parametrize(
    ("method", "path", "status", "code", "says"),
    [
        ("GET", SEND, 405, grpc.StatusCode.UNIMPLEMENTED, "GET is not allowed"),
        ("PUT", VERIFY, 405, grpc.StatusCode.UNIMPLEMENTED, "use POST"),
        ("POST", "/api/v1/auth/nope", 404, grpc.StatusCode.NOT_FOUND, "no such path"),
        ("GET", "/", 404, grpc.StatusCode.NOT_FOUND, "no such path"),
    ],
)
async def test_wrong_method_and_unknown_path_are_json(
    make_gateway: MakeGateway,
    http: aiohttp.ClientSession,
    method: str,
    path: str,
    status: int,
    code: grpc.StatusCode,
    says: str,
) -> None:
    gateway = await make_gateway()
    async with http.request(method, gateway.url + path, json={}) as response:
        assert response.status == status
        assert response.content_type == "application/json"
        answer = await response.json()
        if status == 405:
            assert response.headers["Allow"] == "POST"
    assert answer["code"] == code.value[0]
    assert says in answer["message"]


async def test_body_without_content_type_is_refused(
    make_gateway: MakeGateway, http: aiohttp.ClientSession
) -> None:
    gateway = await make_gateway()
    # skip_auto_headers: aiohttp would otherwise add a Content-Type to the raw body.
    async with http.post(
        gateway.url + SEND,
        data=b'{"phone_number": "+917003848501"}',
        skip_auto_headers=["Content-Type"],
    ) as response:
        assert response.status == 415
        assert "missing" in (await response.json())["message"]


# --- the status mapping, against a real gRPC server that answers whatever status it is told ---

# grpc-gateway's table (runtime.HTTPStatusFromCode), written out independently of the gateway's.
EXPECTED_HTTP = {
    "CANCELLED": 499,
    "UNKNOWN": 500,
    "INVALID_ARGUMENT": 400,
    "DEADLINE_EXCEEDED": 504,
    "NOT_FOUND": 404,
    "ALREADY_EXISTS": 409,
    "PERMISSION_DENIED": 403,
    "UNAUTHENTICATED": 401,
    "RESOURCE_EXHAUSTED": 429,
    "FAILED_PRECONDITION": 400,
    "ABORTED": 409,
    "OUT_OF_RANGE": 400,
    "UNIMPLEMENTED": 501,
    "INTERNAL": 500,
    "UNAVAILABLE": 503,
    "DATA_LOSS": 500,
}


class Scripted(otp_pb2_grpc.OtpServiceServicer):
    """Fails SendOtp with the status named in phone_number; records each call's metadata."""

    def __init__(self) -> None:
        self.metadata: list[dict[str, str]] = []

    async def SendOtp(
        self, request: otp_pb2.SendOtpRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> otp_pb2.SendOtpResponse:
        self.metadata.append({k: v for k, v in context.invocation_metadata() or ()})
        code = grpc.StatusCode[request.phone_number]
        await context.abort(code, f"scripted {code.name}")
        raise AssertionError("abort returned")


@pytest.fixture(params=["remote", "local"])
async def scripted_gateway(request: pytest.FixtureRequest) -> AsyncIterator[tuple[str, Scripted]]:
    """The gateway in front of ``Scripted``: a real gRPC server, or its methods in process."""
    servicer = Scripted()
    server = grpc.aio.server()
    otp_pb2_grpc.add_OtpServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    backend: Backend
    if request.param == "remote":
        backend = RemoteBackend(channel)
    else:
        methods = {"SendOtp": servicer.SendOtp, "VerifyOtp": servicer.VerifyOtp}
        backend = LocalBackend(methods, health.aio.HealthServicer())
    http = await HttpServer.start("127.0.0.1:0", backend, shutdown_timeout=1)
    yield f"http://127.0.0.1:{http.port}", servicer
    await http.close()
    await channel.close()
    await server.stop(0)


@pytest.mark.parametrize(("code_name", "http_status"), sorted(EXPECTED_HTTP.items()))
async def test_every_grpc_status_maps_as_grpc_gateway_does(
    scripted_gateway: tuple[str, Scripted],
    http: aiohttp.ClientSession,
    code_name: str,
    http_status: int,
) -> None:
    url, _ = scripted_gateway
    status, _, body = await post(http, url + SEND, {"phone_number": code_name})
    assert status == http_status
    assert body == {
        "code": grpc.StatusCode[code_name].value[0],
        "message": f"scripted {code_name}",
        "details": [],
    }


async def test_credential_and_request_id_are_forwarded_as_metadata(
    scripted_gateway: tuple[str, Scripted], http: aiohttp.ClientSession
) -> None:
    url, servicer = scripted_gateway
    status, headers, _ = await post(
        http,
        url + SEND,
        {"phone_number": "UNAUTHENTICATED"},
        Authorization="Bearer caller-token",
        **{"X-Request-Id": "req-42"},
    )
    assert status == 401
    assert headers["X-Request-Id"] == "req-42"
    assert servicer.metadata[-1]["authorization"] == "Bearer caller-token"
    assert servicer.metadata[-1]["x-request-id"] == "req-42"

    # No id, or one gRPC metadata cannot carry: the gateway makes one up and says which.
    # (A client without the test token: no credential is made up either.)
    async with aiohttp.ClientSession() as anonymous:
        for sent in ({}, {"X-Request-Id": "x" * 500}):
            _, headers, _ = await post(
                anonymous, url + SEND, {"phone_number": "UNAVAILABLE"}, **sent
            )
            made_up = headers["X-Request-Id"]
            assert made_up
            assert made_up != sent.get("X-Request-Id")
            assert servicer.metadata[-1]["x-request-id"] == made_up
            assert "authorization" not in servicer.metadata[-1]


async def test_unreachable_server_is_503(http: aiohttp.ClientSession) -> None:
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{free_port()}")
    server = await HttpServer.start("127.0.0.1:0", RemoteBackend(channel), shutdown_timeout=1)
    try:
        status, _, body = await post(
            http, f"http://127.0.0.1:{server.port}{SEND}", {"phone_number": PHONE}
        )
        async with http.get(f"http://127.0.0.1:{server.port}/readyz") as response:
            assert response.status == 503
    finally:
        await server.close()
        await channel.close()
    assert status == 503
    assert body["code"] == grpc.StatusCode.UNAVAILABLE.value[0]


# --- the OpenAPI document ----------------------------------------------------------------------


def openapi() -> dict[str, Any]:
    text = importlib.resources.files("otp_service.gateway").joinpath("openapi.json").read_text()
    document: dict[str, Any] = json.loads(text)
    return document


# Request fields a caller may leave out (the proto says so in their comments).
OPTIONAL_FIELDS = frozenset({"idempotency_key", "locale"})


def test_openapi_document_matches_the_live_routes_and_the_proto() -> None:
    document = openapi()
    app = create_app(RemoteBackend(grpc.aio.insecure_channel("127.0.0.1:1")))
    live = {
        (route.method.lower(), route.resource.canonical)
        for route in app.router.routes()
        if isinstance(route.resource, web.Resource)
        and route.resource.canonical.startswith("/api/")
        and route.method != "HEAD"
    }
    documented = {(method, path) for path, ops in document["paths"].items() for method in ops}
    assert documented == live

    schemas = document["components"]["schemas"]
    service = otp_pb2.DESCRIPTOR.services_by_name["OtpService"]
    for path, ops in document["paths"].items():
        for verb, op in ops.items():
            method = service.methods_by_name[op["operationId"]]
            response_ref = op["responses"]["200"]["content"]["application/json"]["schema"]["$ref"]
            assert response_ref.rsplit("/", 1)[1] == method.output_type.name, path
            assert_schema_matches(schemas[method.output_type.name], method.output_type)
            # Every request field is needed, but for those the proto says are optional.
            needed = [f.name for f in method.input_type.fields if f.name not in OPTIONAL_FIELDS]
            # The answers the gateway itself gives on any route are listed.
            assert {"400", "401", "404", "405", "503"} <= set(op["responses"]), path
            if verb == "get":  # the request in query parameters, no body
                query = [p for p in op["parameters"] if p.get("in") == "query"]
                assert [p["name"] for p in query] == [f.name for f in method.input_type.fields]
                assert [p["name"] for p in query if p["required"]] == needed, path
                assert "requestBody" not in op, path
                continue
            request_ref = op["requestBody"]["content"]["application/json"]["schema"]["$ref"]
            assert request_ref.rsplit("/", 1)[1] == method.input_type.name, path
            assert_schema_matches(schemas[method.input_type.name], method.input_type)
            assert schemas[method.input_type.name]["required"] == needed, path
            assert {"413", "415"} <= set(op["responses"]), path

    # 403 says what it means here.
    send = document["paths"][SEND]["post"]["responses"]["403"]["$ref"].rsplit("/", 1)[1]
    assert "country" in document["components"]["responses"][send]["description"]

    # Each VerifyOtp outcome that is not a success is listed under the status it gets.
    [verify_route] = [route for route in ROUTES if route.rpc == "VerifyOtp"]
    assert verify_route.failure is not None
    verify = document["paths"][VERIFY]["post"]["responses"]
    refusal = schemas["VerifyOtpRefusal"]
    response_fields = {field.name for field in otp_pb2.VerifyOtpResponse.DESCRIPTOR.fields}
    assert set(refusal["properties"]) == response_fields | {"message"}
    for name, _ in otp_pb2.VerifyOutcome.items():
        if name in ("VERIFY_OUTCOME_VERIFIED", "VERIFY_OUTCOME_UNSPECIFIED"):
            continue
        failed = verify_route.failure({"verified": False, "outcome": name, "attempts_remaining": 1})
        assert failed is not None, name
        status = str(failed[0])
        assert name in verify[status]["description"], name
        assert {"$ref": "#/components/schemas/VerifyOtpRefusal"} in verify[status]["content"][
            "application/json"
        ]["schema"]["oneOf"]
        assert name in refusal["properties"]["outcome"]["enum"]
    # An outcome this gateway does not know (a newer server's) is never a false 200.
    unknown = {"verified": False, "outcome": "VERIFY_OUTCOME_NEW", "attempts_remaining": 1}
    assert verify_route.failure(unknown) == (400, "the code was not verified")


def assert_schema_matches(schema: dict[str, Any], message: Descriptor) -> None:
    """Every proto field is documented under its proto name, enums with every value."""
    assert set(schema["properties"]) == {field.name for field in message.fields}, message.name
    for field in message.fields:
        if field.enum_type is not None:
            documented = schema["properties"][field.name]["enum"]
            assert documented == [value.name for value in field.enum_type.values], field.name


async def test_openapi_is_served(make_gateway: MakeGateway, http: aiohttp.ClientSession) -> None:
    gateway = await make_gateway()
    async with http.get(gateway.url + "/openapi.json") as response:
        assert response.status == 200
        assert await response.json() == openapi()


# --- what a caller sends before authenticating ---------------------------------------------

DEEP = b"[" * 1200 + b"]" * 1200  # 2.4 KB


def post_raw(path: str, body: bytes, *headers: bytes) -> bytes:
    """A POST written by hand, for what aiohttp's client would refuse to send."""
    lines = [b"POST " + path.encode() + b" HTTP/1.1", b"Host: x", b"Connection: close", *headers]
    if not any(h.lower().startswith(b"transfer-encoding") for h in headers):
        lines.append(b"Content-Length: %d" % len(body))
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


JSON = b"Content-Type: application/json"
EARLY_REFUSALS = [
    pytest.param(post_raw(VERIFY, DEEP, JSON), 400, "too_deep", VERIFY, id="nested-json"),
    pytest.param(post_raw(VERIFY, b"{", JSON), 400, "not_json", VERIFY, id="not-json"),
    pytest.param(
        post_raw(VERIFY, b"{}", b"Content-Type: text/plain"),
        415,
        "wrong_content_type",
        VERIFY,
        id="content-type",
    ),
    pytest.param(post_raw(VERIFY, b"{" * 5000, JSON), 413, "too_large", VERIFY, id="too-large"),
    pytest.param(post_raw(VERIFY, b"[]", JSON), 400, "not_object", VERIFY, id="not-an-object"),
    pytest.param(
        post_raw(VERIFY, b'{"otp_code": 1}', JSON), 400, "wrong_type", VERIFY, id="wrong-type"
    ),
    pytest.param(
        post_raw(VERIFY, b'{"phone_number": "x"}', JSON, b"Authorization: Bearer caf\xe9"),
        400,
        "bad_header",
        VERIFY,
        id="unprintable-authorization",
    ),
    pytest.param(
        post_raw(VERIFY, b"hello", JSON, b"Content-Encoding: gzip"),
        400,
        "unreadable_body",
        VERIFY,
        id="bad-gzip",
    ),
    pytest.param(
        b"GET /wp-admin/+917003848501 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        404,
        "no_such_path",
        "other",
        id="unknown-path",
    ),
    pytest.param(
        b"DELETE " + SEND.encode() + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        405,
        "method_not_allowed",
        SEND,
        id="wrong-method",
    ),
    # Not HTTP at all: aiohttp answers these itself, before the app sees a request.
    pytest.param(
        b"GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n",
        400,
        "malformed_http",
        "other",
        id="bad-header-line",
    ),
    pytest.param(
        b"GET / HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 9000 + b"\r\n\r\n",
        400,
        "malformed_http",
        "other",
        id="header-too-long",
    ),
    pytest.param(
        post_raw(VERIFY, b"zz\r\nabc\r\n0\r\n\r\n", JSON, b"Transfer-Encoding: chunked"),
        400,
        "malformed_http",
        "other",
        id="bad-chunk-size",
    ),
]


@pytest.mark.parametrize(("raw", "status", "reason", "route"), EARLY_REFUSALS)
async def test_early_refusals_are_logged_and_counted_never_as_errors(
    make_gateway: MakeGateway,
    http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
    raw: bytes,
    status: int,
    reason: str,
    route: str,
) -> None:
    caplog.set_level(logging.DEBUG)
    gateway = await make_gateway()
    _, before = await scrape(http, gateway.url)
    reader, writer = await asyncio.open_connection("127.0.0.1", urlsplit(gateway.url).port)
    writer.write(raw)
    # Read to the end: the server closes the connection once it has logged all it will.
    async with asyncio.timeout(PATIENCE_SECONDS):
        answer = await reader.read()
    writer.close()
    status_line = b" %d %s" % (status, HTTPStatus(status).phrase.encode())
    assert answer.split(b"\r\n", 1)[0].endswith(status_line)

    [line] = [r for r in caplog.records if getattr(r, "event", None) == "http_request"]
    assert (line.reason, line.http_status, line.route) == (reason, status, route)
    assert line.name == "otp_service.requests"
    assert line.levelno == logging.INFO
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert "917003848501" not in caplog.text
    text, after = await scrape(http, gateway.url)
    assert delta(before, after, "http_server_requests_total", route=route, code=str(status)) == 1
    # Labels stay a closed set: a path the caller chose never becomes a series.
    assert "wp-admin" not in text


async def test_a_client_that_leaves_mid_body_is_logged_as_gone(
    make_gateway: MakeGateway, http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    gateway = await make_gateway()
    _, before = await scrape(http, gateway.url)
    _, writer = await asyncio.open_connection("127.0.0.1", urlsplit(gateway.url).port)
    # The body promises 99 bytes and brings 21.
    partial = post_raw(VERIFY, b'{"phone_number": "+91', JSON)
    writer.write(partial.replace(b"Content-Length: 21", b"Content-Length: 99"))
    await writer.drain()
    writer.close()

    async def logged() -> bool:
        return any(getattr(r, "event", None) == "http_request" for r in caplog.records)

    await eventually(logged)
    [line] = [r for r in caplog.records if getattr(r, "event", None) == "http_request"]
    assert (line.reason, line.http_status, line.status) == ("client_closed", 499, "CANCELLED")
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    _, after = await scrape(http, gateway.url)
    assert delta(before, after, "http_server_requests_total", route=VERIFY, code="499") == 1


@pytest.fixture(params=["local", "remote"])
async def real_gateway(
    request: pytest.FixtureRequest, make_server: MakeServer
) -> AsyncIterator[str]:
    """The real service behind the HTTP side, called in process or over gRPC."""
    server = await make_server()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    backend: Backend = (
        LocalBackend(server.behaviors, server.health)
        if request.param == "local"
        else RemoteBackend(channel)
    )
    http = await HttpServer.start("127.0.0.1:0", backend, shutdown_timeout=1)
    yield f"http://127.0.0.1:{http.port}"
    await http.close()
    await channel.close()


async def test_two_authorization_headers_are_refused_as_over_grpc(
    real_gateway: str, redis_db: redis.Redis
) -> None:
    valid, other = f"Bearer {TOKEN}", "Bearer another-token-0123456789"
    body = {"phone_number": PHONE, "otp_code": "123456"}
    async with aiohttp.ClientSession() as anonymous:
        _, before = await scrape(anonymous, real_gateway)
        for pair in ((valid, other), (other, valid), (valid, valid)):
            headers = MultiDict([("Authorization", value) for value in pair])
            async with anonymous.post(real_gateway + VERIFY, json=body, headers=headers) as answer:
                assert answer.status == 401
                refused = await answer.json()
            assert refused["code"] == grpc.StatusCode.UNAUTHENTICATED.value[0]
        _, after = await scrape(anonymous, real_gateway)
    assert delta(before, after, "otp_auth_failures_total", reason="malformed") == 3
    assert redis_db.keys() == []
