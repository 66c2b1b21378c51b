"""What operators see: /metrics that move with the calls, and one JSON log line per request."""

from __future__ import annotations

import ast
import asyncio
import io
import json
import logging
import re
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from otp.v1 import otp_pb2, otp_pb2_grpc
from prometheus_client import REGISTRY
from prometheus_client.metrics import MetricWrapperBase

from otp_service import metrics, observability
from otp_service.observability import (
    REQUEST_LOGGER,
    DevFormatter,
    JsonFormatter,
    Observability,
    RequestLine,
    configure_logging,
)
from otp_service.server import SERVICE_NAME
from otp_service.servicer import Behavior, OtpServicer, add_to_server, wrap_methods
from tests.conftest import (
    CALLER,
    PHONE,
    SECRET,
    TOKEN,
    MakeGateway,
    MakeServer,
    MakeService,
    SilentRedis,
    delta,
    eventually,
    scrape,
    wrong_code,
)
from tests.fake_interakt import API_KEY, NOT_A_CONTACT, Answer, FakeInterakt

SEND = "/api/v1/auth/send-otp"
VERIFY = "/api/v1/auth/verify-otp"
SERVICE = {"grpc_type": "unary", "grpc_service": "otp.v1.OtpService"}


async def test_metrics_move_with_the_calls(
    make_gateway: MakeGateway, http: aiohttp.ClientSession, interakt: FakeInterakt
) -> None:
    gateway = await make_gateway()
    _, before = await scrape(http, gateway.url)

    interakt.answer(Answer(status=500, body={}))  # one transient failure, then accepted
    async with http.post(gateway.url + SEND, json={"phone_number": PHONE}) as response:
        assert response.status == 200
    async with http.post(gateway.url + SEND, json={"phone_number": PHONE}) as response:
        assert response.status == 429
    code = interakt.received[-1].code
    await gateway.stub.VerifyOtp(
        otp_pb2.VerifyOtpRequest(phone_number=PHONE, otp_code=wrong_code(code)), timeout=10
    )
    await gateway.stub.VerifyOtp(
        otp_pb2.VerifyOtpRequest(phone_number=PHONE, otp_code=code), timeout=10
    )
    with pytest.raises(grpc.aio.AioRpcError):
        await gateway.stub.VerifyOtp(
            otp_pb2.VerifyOtpRequest(phone_number="nope", otp_code=code), timeout=10
        )

    text, after = await scrape(http, gateway.url)
    handled = "grpc_server_handled_total"
    assert delta(before, after, handled, **SERVICE, grpc_method="SendOtp", grpc_code="OK") == 1
    assert (
        delta(
            before, after, handled, **SERVICE, grpc_method="SendOtp", grpc_code="RESOURCE_EXHAUSTED"
        )
        == 1
    )
    assert delta(before, after, handled, **SERVICE, grpc_method="VerifyOtp", grpc_code="OK") == 2
    assert (
        delta(
            before, after, handled, **SERVICE, grpc_method="VerifyOtp", grpc_code="INVALID_ARGUMENT"
        )
        == 1
    )
    seconds = "grpc_server_handling_seconds_count"
    assert delta(before, after, seconds, **SERVICE, grpc_method="SendOtp") == 2
    assert delta(before, after, seconds, **SERVICE, grpc_method="VerifyOtp") == 3
    started = "grpc_server_started_total"
    assert delta(before, after, started, **SERVICE, grpc_method="SendOtp") == 2
    assert delta(before, after, started, **SERVICE, grpc_method="VerifyOtp") == 3
    # The HTTP side counts its own answers by route and status: the 200, the 429, the scrape.
    requests = "http_server_requests_total"
    assert delta(before, after, requests, route=SEND, code="200") == 1
    assert delta(before, after, requests, route=SEND, code="429") == 1
    assert delta(before, after, requests, route="/metrics", code="200") == 1
    assert delta(before, after, "http_server_request_duration_seconds_count", route=SEND) == 2
    assert delta(before, after, "otp_verifications_total", outcome="verified") == 1
    assert delta(before, after, "otp_verifications_total", outcome="wrong_code") == 1
    assert delta(before, after, "otp_sends_total", channel="text", result="server_error") == 1
    assert delta(before, after, "otp_sends_total", channel="text", result="accepted") == 1
    assert delta(before, after, "otp_upstream_request_seconds_count") == 2
    assert delta(before, after, "otp_limit_refusals_total", kind="cooldown") == 1
    assert "otp_redis_errors_total" in text
    # No `_created` timestamps beside every counter and histogram.
    assert "_created" not in text

    # Labels are closed sets: no number, code or key anywhere in the exposition.
    for secret in (PHONE, PHONE[3:], code, API_KEY, SECRET.decode()):
        assert secret not in text


LIMIT_KINDS = ("cooldown", "hourly", "paused", "caller", "account")


async def test_each_limit_refusal_is_counted_under_its_own_kind(
    make_gateway: MakeGateway, http: aiohttp.ClientSession, interakt: FakeInterakt
) -> None:
    gateway = await make_gateway(
        resend_cooldown_seconds=0,
        max_sends_per_hour=1,
        max_failed_verifies_per_hour=1,
        interakt_sends_per_minute=2,
    )

    async def refused(kind: str, call: Coroutine[Any, Any, None]) -> None:
        _, before = await scrape(http, gateway.url)
        with pytest.raises(grpc.aio.AioRpcError) as refusal:
            await call
        assert refusal.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        _, after = await scrape(http, gateway.url)
        counted = {k: delta(before, after, "otp_limit_refusals_total", kind=k) for k in LIMIT_KINDS}
        assert counted == {k: float(k == kind) for k in LIMIT_KINDS}

    # Coroutines, so a call starts only once ``refused`` has scraped the "before".
    async def send(phone: str) -> None:
        await gateway.stub.SendOtp(otp_pb2.SendOtpRequest(phone_number=phone), timeout=10)

    async def verify(code: str) -> None:
        request = otp_pb2.VerifyOtpRequest(phone_number=PHONE, otp_code=code)
        await gateway.stub.VerifyOtp(request, timeout=10)

    await send(PHONE)
    await refused("hourly", send(PHONE))
    await verify(wrong_code(interakt.received[-1].code))
    await refused("paused", verify(interakt.received[-1].code))
    await send("+917003848502")
    await refused("account", send("+917003848503"))


class WrittenLog:
    """What the production log handler has written, as text or as parsed lines."""

    def __init__(self, stream: io.StringIO) -> None:
        self._stream = stream

    def text(self) -> str:
        for handler in logging.getLogger().handlers:
            handler.flush()  # it writes in batches
        return self.written()

    def written(self) -> str:
        """What the handler has written so far, without asking it to flush."""
        return self._stream.getvalue()

    def lines(self) -> list[dict[str, Any]]:
        """Every line, each of which must be one JSON object."""
        return [json.loads(line) for line in self.text().splitlines()]


@pytest.fixture
def json_log(monkeypatch: pytest.MonkeyPatch) -> Iterator[WrittenLog]:
    """The process' log lines as production writes them: ``configure_logging``, JSON."""
    stream = io.StringIO()
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    monkeypatch.setattr(observability, "_direct", None)  # put back after the test
    configure_logging(dev=False, stream=stream)
    yield WrittenLog(stream)
    root.handlers[:] = handlers
    root.setLevel(level)


async def test_one_json_line_per_request_with_the_request_id_in_the_sender_lines(
    make_gateway: MakeGateway,
    http: aiohttp.ClientSession,
    interakt: FakeInterakt,
    json_log: WrittenLog,
) -> None:
    gateway = await make_gateway()
    interakt.answer(Answer(status=503, body={}))  # the sender logs its retry
    async with http.post(
        gateway.url + SEND, json={"phone_number": PHONE}, headers={"X-Request-Id": "req-log-1"}
    ) as response:
        assert response.status == 200
    code = interakt.received[-1].code
    await gateway.stub.VerifyOtp(
        otp_pb2.VerifyOtpRequest(phone_number=PHONE, otp_code=code), timeout=10
    )

    lines = json_log.lines()
    retry, queued = [line for line in lines if line.get("logger") == "otp_service.sender"]
    assert retry["request_id"] == queued["request_id"] == "req-log-1"
    assert retry["reason"] == "HTTP 503"
    assert retry["level"] == "WARNING"
    # The message Interakt queued, with the template's language ("" for Text).
    assert (queued["event"], queued["level"], queued["language"]) == ("interakt_queued", "INFO", "")
    assert queued["message"] == f"interakt queued message {interakt.queued[-1].id} (text)"

    send, verify = [line for line in lines if line["event"] == "rpc"]
    assert list(send) == [
        "time", "level", "event", "rpc", "transport", "caller", "phone", "status", "outcome",
        "duration_ms", "request_id",
    ]  # fmt: skip
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", send["time"])
    assert send["level"] == "INFO"
    assert send["rpc"] == "SendOtp"
    assert send["status"] == "OK"
    assert send["phone"] == "+91******8501"
    # The auth wrapper, inside this one, named the caller before the line was written.
    assert send["caller"] == CALLER
    assert send["request_id"] == "req-log-1"
    assert isinstance(send["duration_ms"], float)
    # It came over HTTP, served in process; a send has no outcome.
    assert (send["transport"], send["outcome"]) == ("http", "-")
    # A direct gRPC call without x-request-id gets one made up.
    assert verify["rpc"] == "VerifyOtp"
    assert verify["request_id"] not in ("", "-", "req-log-1")
    assert (verify["transport"], verify["outcome"]) == ("grpc", "verified")

    text = json_log.text()
    for secret in (PHONE, PHONE[3:], code, API_KEY):
        assert secret not in text


async def test_refused_request_is_logged_with_its_status(
    make_gateway: MakeGateway, json_log: WrittenLog
) -> None:
    gateway = await make_gateway()
    with pytest.raises(grpc.aio.AioRpcError):
        await gateway.stub.SendOtp(
            otp_pb2.SendOtpRequest(phone_number="+91 70038"),
            metadata=[("x-request-id", "bad-1")],
            timeout=10,
        )
    # Logged before the status was sent, the line leaves in a batch within the flush interval.
    async with asyncio.timeout(10):
        while '"rpc"' not in json_log.text():  # noqa: ASYNC110 - nothing to wait on
            await asyncio.sleep(0.01)
    [line] = [line for line in json_log.lines() if line["event"] == "rpc"]
    assert line["status"] == "INVALID_ARGUMENT"
    assert line["phone"] == "-"  # not a valid number: nothing of it is logged
    assert line["request_id"] == "bad-1"


async def test_request_lines_follow_the_request_loggers_level(
    make_gateway: MakeGateway, json_log: WrittenLog
) -> None:
    gateway = await make_gateway()
    requests = logging.getLogger(REQUEST_LOGGER)
    requests.setLevel(logging.WARNING)
    try:
        await gateway.stub.VerifyOtp(
            otp_pb2.VerifyOtpRequest(phone_number=PHONE, otp_code="000000"), timeout=10
        )
        assert '"rpc"' not in json_log.text()
    finally:
        requests.setLevel(logging.NOTSET)
    await gateway.stub.VerifyOtp(
        otp_pb2.VerifyOtpRequest(phone_number=PHONE, otp_code="000000"), timeout=10
    )
    [line] = [line for line in json_log.lines() if line["event"] == "rpc"]
    assert line["status"] == "OK"


async def test_json_calls_on_one_connection_do_not_share_a_caller(
    make_gateway: MakeGateway, json_log: WrittenLog
) -> None:
    gateway = await make_gateway()
    body = {"phone_number": PHONE, "otp_code": "000000"}
    # One keep-alive connection: a known caller, then a call with no usable token.
    connector = aiohttp.TCPConnector(limit=1)
    async with aiohttp.ClientSession(connector=connector) as session:
        for authorization in (f"Bearer {TOKEN}", "Bearer wrong-token"):
            headers = {"Authorization": authorization}
            async with session.post(gateway.url + VERIFY, json=body, headers=headers) as answer:
                await answer.read()
    known, refused = [line for line in json_log.lines() if line["event"] == "rpc"]
    assert (known["caller"], known["status"]) == (CALLER, "OK")
    assert (refused["caller"], refused["status"]) == ("-", "UNAUTHENTICATED")


async def test_lines_leave_in_batches_within_the_flush_interval(json_log: WrittenLog) -> None:
    logger = logging.getLogger("otp_service.test")
    logger.info("first")
    logger.info("second")
    assert json_log.written() == ""  # waiting for the batch, not one write per line
    async with asyncio.timeout(10):
        while json_log.written().count("\n") < 2:  # noqa: ASYNC110 - nothing to wait on
            await asyncio.sleep(0.01)
    assert [json.loads(line)["message"] for line in json_log.written().splitlines()] == [
        "first",
        "second",
    ]
    # A full batch is written at once.
    for i in range(observability._BatchingHandler.MAX_BATCH_LINES):
        logger.info("line %d", i)
    assert json_log.written().count("\n") == 2 + observability._BatchingHandler.MAX_BATCH_LINES


def test_lines_outside_an_event_loop_are_written_at_once(json_log: WrittenLog) -> None:
    logger = logging.getLogger("otp_service.test")
    logger.warning("starting at %d", 9, extra={"event": "starting"})
    line = json.loads(json_log.written())
    assert (line["event"], line["message"]) == ("starting", "starting at 9")
    # A library's line, without an event of its own, is named after its logger.
    logging.getLogger("aiohttp.server").warning("something")
    assert json.loads(json_log.written().splitlines()[-1])["event"] == "aiohttp_server"


def test_dev_format_is_readable() -> None:
    record = logging.makeLogRecord(
        {
            "name": "otp_service.requests",
            "levelno": logging.INFO,
            "levelname": "INFO",
            "msg": RequestLine("SendOtp", "grpc", "-", "+91******8501", "OK", "-", 1.5, "req-9"),
        }
    )
    line = DevFormatter().format(record)
    assert line.endswith(
        "INFO    otp_service.requests: SendOtp OK - 1.5ms transport=grpc phone=+91******8501 "
        "caller=- request_id=req-9"
    )


def test_json_request_line_escapes_what_callers_control() -> None:
    record = logging.makeLogRecord(
        {
            "name": "otp_service.requests",
            "levelno": logging.INFO,
            "levelname": "INFO",
            "created": 1_764_000_000.25,
            "msg": RequestLine(
                "VerifyOtp",
                "http",
                'say "hi"',
                "+91******8501",
                "OK",
                "wrong_code",
                0.42,
                "a\\b\u00e9",
            ),
        }
    )
    line = JsonFormatter().format(record)
    assert json.loads(line) == {
        "time": "2025-11-24T16:00:00.250Z",
        "level": "INFO",
        "event": "rpc",
        "rpc": "VerifyOtp",
        "transport": "http",
        "caller": 'say "hi"',
        "phone": "+91******8501",
        "status": "OK",
        "outcome": "wrong_code",
        "duration_ms": 0.42,
        "request_id": "a\\b\u00e9",
    }
    assert "\n" not in line


async def test_dependency_and_upstream_failures_are_warnings_refusals_info(
    make_gateway: MakeGateway, interakt: FakeInterakt, json_log: WrittenLog
) -> None:
    gateway = await make_gateway()
    interakt.answer(*[Answer(status=503, body={})] * 3)  # Interakt down: UNAVAILABLE
    with pytest.raises(grpc.aio.AioRpcError):
        await gateway.stub.SendOtp(otp_pb2.SendOtpRequest(phone_number=PHONE), timeout=10)
    interakt.answer(Answer(status=400, body={"result": False, "message": NOT_A_CONTACT}))
    with pytest.raises(grpc.aio.AioRpcError):
        await gateway.stub.SendOtp(otp_pb2.SendOtpRequest(phone_number=PHONE), timeout=10)
    with pytest.raises(grpc.aio.AioRpcError):
        await gateway.stub.SendOtp(otp_pb2.SendOtpRequest(phone_number="12"), timeout=10)

    async def three_lines() -> bool:
        return json_log.text().count('"event": "rpc"') == 3

    await eventually(three_lines)
    rpcs = [line for line in json_log.lines() if line["event"] == "rpc"]
    assert [(line["status"], line["level"]) for line in rpcs] == [
        ("UNAVAILABLE", "WARNING"),
        ("FAILED_PRECONDITION", "WARNING"),
        ("INVALID_ARGUMENT", "INFO"),
    ]


async def test_the_gateways_own_refusals_are_request_lines_too(
    make_gateway: MakeGateway, http: aiohttp.ClientSession, json_log: WrittenLog
) -> None:
    gateway = await make_gateway()
    async with http.get(gateway.url + "/no/such/+917003848501", headers={"X-Request-Id": "r-404"}):
        pass
    [line] = [line for line in json_log.lines() if line["event"] == "http_request"]
    assert line == {
        "time": line["time"],
        "level": "INFO",
        "event": "http_request",
        "message": "GET other answered 404: no such path; the routes are listed in /openapi.json",
        "logger": "otp_service.requests",
        "request_id": "r-404",
        "transport": "http",
        "method": "GET",
        "route": "other",
        "http_status": 404,
        "status": "NOT_FOUND",
        "reason": "no_such_path",
        "duration_ms": line["duration_ms"],
    }


SERVICE_SOURCE = Path(observability.__file__).parent
LOG_METHODS = {"debug", "info", "warning", "error", "exception", "critical"}


def test_every_log_call_names_a_stable_event() -> None:
    """Each log call of the service passes ``extra={"event": "snake_case_name", ...}``."""
    calls = 0
    for path in sorted(SERVICE_SOURCE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in LOG_METHODS
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id.endswith("log")
            ):
                continue
            calls += 1
            where = f"{path.name}:{node.lineno}"
            extra = next((k.value for k in node.keywords if k.arg == "extra"), None)
            assert isinstance(extra, ast.Dict), f"{where}: no extra={{'event': ...}}"
            events = [
                value.value
                for key, value in zip(extra.keys, extra.values, strict=True)
                if isinstance(key, ast.Constant) and key.value == "event"
            ]
            assert len(events) == 1, f"{where}: no event in extra"
            assert re.fullmatch(r"[a-z]+(_[a-z]+)*", events[0]), f"{where}: {events[0]!r}"
    assert calls > 20  # the walk found the service's log calls


def test_every_service_metric_is_left_out_of_a_gateway_alone() -> None:
    """A new ``otp_*`` or RPC metric joins SERVICE_METRICS, or a bare gateway would export it."""
    service = {
        value
        for value in vars(metrics).values()
        if isinstance(value, MetricWrapperBase)
        and value.describe()[0].name.startswith(("otp_", "grpc_"))
        and value is not metrics.BUILD
    }
    assert service == set(metrics.SERVICE_METRICS)


async def test_a_deadline_passing_while_an_error_is_answered_is_never_unknown(
    make_service: MakeService,
    interakt: FakeInterakt,
    silent_redis: SilentRedis,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The service gives up on a hung Redis just as the callers' deadlines pass: each call is
    logged and counted as what its caller was told, never as a bug of ours (UNKNOWN)."""
    stub = await make_service(redis_url=silent_redis.url, redis_timeout_seconds=0.2)
    caplog.set_level(logging.INFO, logger=REQUEST_LOGGER)
    unknown = {**SERVICE, "grpc_method": "SendOtp", "grpc_code": "UNKNOWN"}
    before = REGISTRY.get_sample_value("grpc_server_handled_total", unknown) or 0.0
    calls = [
        stub.SendOtp(otp_pb2.SendOtpRequest(phone_number=PHONE), timeout=0.19 + i * 0.001)
        for i in range(40)
    ]
    told = await asyncio.gather(*calls, return_exceptions=True)
    codes = {error.code().name for error in told if isinstance(error, grpc.aio.AioRpcError)}
    assert codes <= {"UNAVAILABLE", "DEADLINE_EXCEEDED"}

    async def all_logged() -> bool:
        return len([r for r in caplog.records if type(r.msg) is RequestLine]) == 40

    await eventually(all_logged)
    lines = [r.msg for r in caplog.records if type(r.msg) is RequestLine]
    # CANCELLED: the caller's side cut the call at its deadline before the server's own
    # (later) copy of it passed; never UNKNOWN, which means a bug of ours.
    statuses = {line.status for line in lines}
    assert statuses <= {"UNAVAILABLE", "DEADLINE_EXCEEDED", "CANCELLED"}, lines
    assert (REGISTRY.get_sample_value("grpc_server_handled_total", unknown) or 0.0) == before
    assert not [r for r in caplog.records if r.exc_info], "no traceback"


async def test_an_aborted_call_is_counted_before_its_caller_sees_the_status(
    make_server: MakeServer,
) -> None:
    """A scrape right after a refused call sees it: the count moves before abort sends the
    status. A wrapper inside holds the handler after the abort, as a busy loop might."""
    service = (await make_server()).service
    released = asyncio.Event()

    def hold_after_abort(_: str, behavior: Behavior) -> Behavior:
        async def held(request: Any, ctx: grpc.aio.ServicerContext[Any, Any]) -> Any:
            try:
                return await behavior(request, ctx)
            except grpc.aio.AbortError:
                await released.wait()
                raise

        return held

    server = grpc.aio.server()
    behaviors = wrap_methods(
        OtpServicer(service), [Observability(SERVICE_NAME).wrap, hold_after_abort]
    )
    add_to_server(behaviors, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    invalid = {**SERVICE, "grpc_method": "VerifyOtp", "grpc_code": "INVALID_ARGUMENT"}
    before = REGISTRY.get_sample_value("grpc_server_handled_total", invalid) or 0.0
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = otp_pb2_grpc.OtpServiceStub(channel)
            request = otp_pb2.VerifyOtpRequest(phone_number="nope", otp_code="123456")
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.VerifyOtp(request, timeout=10)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            after = REGISTRY.get_sample_value("grpc_server_handled_total", invalid)
            assert after == before + 1
    finally:
        released.set()
        await server.stop(None)
