"""What operators see of each RPC: one log line and a few metric updates, and the log format.

``Observability`` wraps every OtpService method outermost, so it sees every call, including
those that caller auth refuses. It sets the request id for the call's whole task, so every log
line written while serving it (the Interakt sender's too) carries that id. This runs on every
login: per call it does a few attribute reads, a dict lookup per metric, and builds one small
``RequestLine``, which ``log_request`` writes.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import json
import logging
import secrets
import sys
import time
from typing import Any, NamedTuple, TextIO

import grpc
from otp.v1 import otp_pb2

from otp_service import context, metrics
from otp_service.errors import InvalidInput
from otp_service.phone import parse_phone
from otp_service.servicer import Behavior

REQUEST_ID_KEY = "x-request-id"
MAX_REQUEST_ID_LENGTH = 128
REQUEST_LOGGER = "otp_service.requests"


# Made-up request ids: a random per-process prefix and a counter, unique without a syscall.
_ID_PREFIX = secrets.token_hex(4)
_ids = itertools.count(1)
# A request line's level by status: a bug is an ERROR; a dependency or the upstream failing
# (UNAVAILABLE, Interakt refusing) a WARNING; anything else, refusals included, INFO.
_LEVELS = {
    "UNKNOWN": logging.ERROR,
    "INTERNAL": logging.ERROR,
    "DATA_LOSS": logging.ERROR,
    "UNAVAILABLE": logging.WARNING,
    "DEADLINE_EXCEEDED": logging.WARNING,
    "FAILED_PRECONDITION": logging.WARNING,
}
_OUTCOME_PREFIX = "VERIFY_OUTCOME_"

_requests_log = logging.getLogger(REQUEST_LOGGER)


class RequestLine(NamedTuple):
    """The fields of one request's log line; the formatters render it.

    ``transport`` is how the call came in (grpc, or http for a JSON route served in process);
    ``outcome`` is VerifyOtp's answer (``verified``, ``wrong_code``, ...), "-" for other calls.
    """

    rpc: str
    transport: str
    caller: str
    phone: str
    status: str
    outcome: str
    duration_ms: float
    request_id: str

    def __str__(self) -> str:
        return (
            f"{self.rpc} {self.status} {self.outcome} {self.duration_ms}ms "
            f"transport={self.transport} phone={self.phone} caller={self.caller} "
            f"request_id={self.request_id}"
        )


class Observability:
    """Logs and counts each call of the service it watches, under the call's request id."""

    def __init__(self, service_name: str) -> None:
        self._service = service_name

    def wrap(self, rpc: str, behavior: Behavior) -> Behavior:
        """``behavior`` observed: the outermost wrapper (see servicer.wrap_methods)."""
        labels = ("unary", self._service, rpc)
        started = metrics.child(metrics.RPCS_STARTED, *labels)
        seconds = metrics.child(metrics.RPC_SECONDS, *labels)
        # The handled counter's child by status, bound at a status's first call.
        handled: dict[str, Any] = {}
        outcomes = _outcomes() if rpc == "VerifyOtp" else None

        async def observed(request: Any, ctx: grpc.aio.ServicerContext[Any, Any]) -> Any:
            start = time.perf_counter()
            started.inc()
            context.request_id.set(request_id_from(ctx.invocation_metadata()))
            outcome = "-"
            finished = False

            def finish(status: str) -> None:
                """Count and log the call, once: at its abort (before the caller sees the
                status), else when the handler is done (before the response is sent)."""
                nonlocal finished
                if finished:
                    return
                finished = True
                elapsed = time.perf_counter() - start
                seconds.observe(elapsed)
                counter = handled.get(status)
                if counter is None:
                    counter = handled[status] = metrics.child(metrics.RPCS_HANDLED, *labels, status)
                counter.inc()
                log_request(
                    _LEVELS.get(status, logging.INFO),
                    RequestLine(
                        rpc,
                        context.transport.get(),
                        context.caller.get(),
                        masked_phone(getattr(request, "phone_number", "")),
                        status,
                        outcome,
                        round(elapsed * 1000, 2),
                        context.request_id.get(),
                    ),
                )

            context.aborting.set(finish)
            try:
                response = await behavior(request, ctx)
                if outcomes is not None:
                    counter, outcome = outcomes[response.outcome]
                    counter.inc()
            except BaseException as exc:
                finish(_status_of(exc, ctx))
                raise
            finish("OK")
            return response

        return observed


def request_id_from(metadata: Any) -> str:
    """The caller's x-request-id from gRPC metadata if it is a sane token, else a new one."""
    for key, value in metadata or ():
        if key == REQUEST_ID_KEY:
            return sane_request_id(value)
    return _new_request_id()


def sane_request_id(value: object) -> str:
    """``value`` if it can serve as a request id (printable ASCII, not too long), else a new one."""
    if (
        isinstance(value, str)
        and 0 < len(value) <= MAX_REQUEST_ID_LENGTH
        and value.isascii()
        and value.isprintable()
    ):
        return value
    return _new_request_id()


def _new_request_id() -> str:
    return f"{_ID_PREFIX}-{next(_ids):x}"


@functools.lru_cache(maxsize=8192)
def masked_phone(raw: str) -> str:
    """The number as logs may show it; "-" when it is not a valid number."""
    try:
        return parse_phone(raw).masked
    except InvalidInput:
        return "-"


@functools.cache
def _outcomes() -> dict[int, tuple[Any, str]]:
    """Each VerifyOutcome's counter and short name (``wrong_code``), for metrics and the log."""
    outcomes: dict[int, tuple[Any, str]] = {}
    for name, value in otp_pb2.VerifyOutcome.items():
        if value != otp_pb2.VERIFY_OUTCOME_UNSPECIFIED:
            short = name.removeprefix(_OUTCOME_PREFIX).lower()
            outcomes[value] = (metrics.VERIFICATIONS.labels(short), short)
    return outcomes


def _status_of(exc: BaseException, ctx: grpc.aio.ServicerContext[Any, Any]) -> str:
    """The status the caller gets for a handler that raised ``exc``.

    A call whose deadline has passed was told DEADLINE_EXCEEDED by its own side, whatever the
    handler was doing: gRPC cancels it, or fails the sending of its error status (which would
    otherwise read as UNKNOWN, a bug of ours, when any caller can cause it).
    """
    if isinstance(exc, grpc.aio.AbortError):
        code = ctx.code()
        return code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN"
    remaining = ctx.time_remaining()
    if remaining is not None and remaining <= 0:
        return "DEADLINE_EXCEEDED"
    if isinstance(exc, asyncio.CancelledError) or ctx.done():
        return "CANCELLED"  # the caller went away
    return "UNKNOWN"


# --- log format ------------------------------------------------------------------------------

# json's own C string encoder: quotes and escapes one string.
_quoted = json.encoder.encode_basestring_ascii

# Attributes every LogRecord has; anything else on a record came from ``extra=``.
_RECORD_ATTRS = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time, level, event, message, then the record's own fields.

    ``event`` is a short stable name to search and alert on: the ``event`` a log call passes in
    ``extra`` (every call in this service does; a test checks), else the logger's name with
    underscores (a library's lines). ``message`` is the prose.
    """

    def format(self, record: logging.LogRecord) -> str:
        if type(record.msg) is RequestLine:
            return _request_json(record.msg, record.levelname, record.created)
        line: dict[str, Any] = {
            "time": _utc(record.created),
            "level": record.levelname,
            "event": getattr(record, "event", None) or record.name.replace(".", "_"),
            "message": record.getMessage(),
            "logger": record.name,
        }
        request_id = context.request_id.get()
        if request_id != "-":
            line["request_id"] = request_id
        for key, value in vars(record).items():
            if key not in _RECORD_ATTRS:
                line[key] = value
        if record.exc_info:
            line["error"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def _request_json(line: RequestLine, level: str, created: float) -> str:
    """One request's line: built directly, what json.dumps of a dict would write.

    Only the caller's name and the request id can hold characters JSON must escape.
    """
    return (
        f'{{"time": "{_utc(created)}", "level": "{level}", '
        f'"event": "rpc", "rpc": "{line.rpc}", "transport": "{line.transport}", '
        f'"caller": {_quoted(line.caller)}, "phone": "{line.phone}", "status": "{line.status}", '
        f'"outcome": "{line.outcome}", "duration_ms": {line.duration_ms}, '
        f'"request_id": {_quoted(line.request_id)}}}'
    )


class DevFormatter(logging.Formatter):
    """Human-readable lines for ``--dev``, with the request id when there is one."""

    def __init__(self) -> None:
        super().__init__(
            "%(asctime)s.%(msecs)03d %(levelname)-7s %(name)s: %(message)s", "%H:%M:%S"
        )

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        request_id = context.request_id.get()
        if request_id != "-" and type(record.msg) is not RequestLine:
            text = f"{text} request_id={request_id}"
        return text


class _BatchingHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A stdout handler that writes its lines in batches, not one write per line.

    Under load the request lines would cost a write() system call each: stdout is often
    unbuffered in containers (PYTHONUNBUFFERED=1, as on this project's machines). Inside a
    running event loop lines are collected and written together at most ``FLUSH_SECONDS``
    after the first of them, or at once when ``MAX_BATCH_LINES`` are waiting. Outside a loop
    (start-up, shutdown) every line is written at once, and ``flush()`` (which
    ``logging.shutdown`` calls at exit) writes whatever is waiting.
    """

    FLUSH_SECONDS = 0.05
    MAX_BATCH_LINES = 512

    def __init__(self, stream: TextIO) -> None:
        super().__init__(stream)
        self._batch: list[str | _Deferred] = []
        self._timer: asyncio.TimerHandle | None = None

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.write(self.format(record))
        except Exception:
            self.handleError(record)

    def write(self, line: str | _Deferred) -> None:
        """Write one line, within ``FLUSH_SECONDS``: formatted, or a request line's fields,
        formatted with the rest of its batch (``log_request``)."""
        self._batch.append(line)
        if self._timer is not None:
            if len(self._batch) >= self.MAX_BATCH_LINES:
                self.flush()
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.flush()
            return
        self._timer = loop.call_later(self.FLUSH_SECONDS, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self.flush()

    def flush(self) -> None:
        if self._batch:
            batch, self._batch = self._batch, []
            lines = [line if type(line) is str else _request_json(*line) for line in batch]
            self.stream.write(self.terminator.join(lines) + self.terminator)
        super().flush()


def configure_logging(*, dev: bool, stream: TextIO | None = None) -> None:
    """Send every log line to ``stream`` (stdout): JSON in production, readable text in dev.

    In production the request lines skip the ``logging`` machinery (see ``log_request``).
    """
    global _direct
    # No line shows them, and each costs work per record: the caller's frame (a stack walk),
    # thread and process. The logging docs' own advice for hot paths.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler = _BatchingHandler(sys.stdout if stream is None else stream)
    handler.setFormatter(DevFormatter() if dev else JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    _direct = None if dev else handler


# A request line's fields, its level's name and its time, until its batch is written.
_Deferred = tuple[RequestLine, str, float]
# The production handler, which request lines are written to directly; None: through logging.
_direct: _BatchingHandler | None = None


def log_request(level: int, line: RequestLine) -> None:
    """Write one request's line, honouring the request logger's level.

    With the production handler in place the line goes straight to it as JSON: no LogRecord,
    no walk up the logger hierarchy, no handler lock: about 15 us less CPU per VerifyOtp
    (bench/README.md). Otherwise (tests, an embedding program's own logging set-up) it is an
    ordinary record on the ``otp_service.requests`` logger.
    """
    handler = _direct
    if handler is None:
        _requests_log.log(level, line)
    elif _requests_log.isEnabledFor(level):
        # Formatted when its batch is written: many lines in one go cost less than each alone.
        handler.write((line, logging.getLevelName(level), time.time()))


# (second, its formatted text): strftime runs once a second, not once a line.
_second_text = (-1, "")


def _utc(created: float) -> str:
    """RFC 3339 UTC time with milliseconds."""
    global _second_text
    second = int(created)
    cached = _second_text
    if cached[0] != second:
        cached = _second_text = (second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)))
    return f"{cached[1]}.{int((created - second) * 1000):03d}Z"
