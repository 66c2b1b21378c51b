"""The gRPC face of the service: protobuf in, domain call, protobuf out.

Errors become a status in exactly one place (``status_for``, used by ``_with_statuses`` and by
``abort`` for the wrappers); expected verification results are plain responses with status OK.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import weakref
from collections.abc import Callable, Coroutine, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

import grpc
from google.protobuf import duration_pb2, timestamp_pb2
from google.protobuf.message import DecodeError, Message
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status
from otp.v1 import otp_pb2, otp_pb2_grpc

from otp_service import metrics
from otp_service.context import aborting
from otp_service.errors import (
    DeliveryRefused,
    ErrorReason,
    InvalidInput,
    LimitExceeded,
    NotAllowed,
    NotAuthenticated,
    NotFound,
    OtpError,
    ShuttingDown,
    Unavailable,
)
from otp_service.otp import OtpService
from otp_service.results import VerifyOutcome

log = logging.getLogger(__name__)

_Context = grpc.aio.ServicerContext[Any, Any]
# What an OtpService method runs, and what wraps it (see wrap_methods).
Behavior = Callable[[Any, _Context], Coroutine[Any, Any, Any]]
Wrapper = Callable[[str, Behavior], Behavior]

SERVICE = otp_pb2.DESCRIPTOR.services_by_name["OtpService"]
# ErrorInfo.domain of every error the service reports (error_reason.proto).
ERROR_DOMAIN = "otp-service"
_OUTCOMES = {
    VerifyOutcome.VERIFIED: otp_pb2.VERIFY_OUTCOME_VERIFIED,
    VerifyOutcome.WRONG_CODE: otp_pb2.VERIFY_OUTCOME_WRONG_CODE,
    VerifyOutcome.NO_ACTIVE_CODE: otp_pb2.VERIFY_OUTCOME_NO_ACTIVE_CODE,
    VerifyOutcome.TOO_MANY_ATTEMPTS: otp_pb2.VERIFY_OUTCOME_TOO_MANY_ATTEMPTS,
}
# Responses without a per-call field are immutable in practice; build them once.
_VERIFY_RESPONSES = {
    outcome: otp_pb2.VerifyOtpResponse(
        verified=outcome is VerifyOutcome.VERIFIED, outcome=_OUTCOMES[outcome]
    )
    for outcome in VerifyOutcome
    if outcome is not VerifyOutcome.WRONG_CODE
}


class OtpServicer(otp_pb2_grpc.OtpServiceServicer):
    """Implements otp.v1.OtpService on top of the domain's OtpService."""

    def __init__(self, service: OtpService) -> None:
        self._service = service

    async def SendOtp(
        self, request: otp_pb2.SendOtpRequest, context: _Context
    ) -> otp_pb2.SendOtpResponse:
        result = await self._service.send(
            request.phone_number,
            budget=context.time_remaining(),
            idempotency_key=request.idempotency_key,
            locale=request.locale,
        )
        return otp_pb2.SendOtpResponse(
            expires_at=_timestamp(result.expires_at_ms),
            resend_after_seconds=result.resend_after_seconds,
            channel=result.delivery.channel.value,  # type: ignore[arg-type]
            message_id=result.delivery.message_id,
        )

    async def VerifyOtp(
        self, request: otp_pb2.VerifyOtpRequest, context: _Context
    ) -> otp_pb2.VerifyOtpResponse:
        result = await self._service.verify(request.phone_number, request.otp_code)
        if result.outcome is VerifyOutcome.WRONG_CODE:
            return otp_pb2.VerifyOtpResponse(
                verified=False,
                outcome=otp_pb2.VERIFY_OUTCOME_WRONG_CODE,
                attempts_remaining=result.attempts_remaining,
            )
        return _VERIFY_RESPONSES[result.outcome]

    async def GetOtpStatus(
        self, request: otp_pb2.GetOtpStatusRequest, context: _Context
    ) -> otp_pb2.GetOtpStatusResponse:
        status = await self._service.status(request.phone_number)
        return otp_pb2.GetOtpStatusResponse(
            state=status.state.value,  # type: ignore[arg-type]
            channel=status.channel.value if status.channel else 0,  # type: ignore[arg-type]
            message_id=status.message_id,
            failure_reason=status.failure_reason,
            verified=status.verified,
            expires_at=_timestamp(status.expires_at_ms),
            resend_after_seconds=status.resend_after_seconds,
            failure=status.failure.value if status.failure else 0,  # type: ignore[arg-type]
            language=status.language,
        )


def _timestamp(epoch_ms: int) -> timestamp_pb2.Timestamp:
    timestamp = timestamp_pb2.Timestamp()
    timestamp.FromMilliseconds(epoch_ms)
    return timestamp


def wrap_methods(servicer: OtpServicer, wrappers: Sequence[Wrapper] = ()) -> dict[str, Behavior]:
    """Each OtpService method of ``servicer`` inside ``wrappers`` (the first outermost), by name.

    A wrapper takes the RPC's name and its behaviour and returns the behaviour to run instead:
    how request logging, metrics and caller auth see every OtpService call, whether it came in
    over gRPC (``add_to_server``) or from the JSON gateway in this process. They are applied
    here, once, rather than as gRPC interceptors, which cost a coroutine per interceptor per
    call on the hot path (bench/README.md); health and reflection are not wrapped.
    """
    behaviors = {}
    for method in SERVICE.methods:
        behavior = _with_statuses(getattr(servicer, method.name))
        for wrap in reversed(wrappers):
            behavior = wrap(method.name, behavior)
        behaviors[method.name] = behavior
    return behaviors


def add_to_server(behaviors: Mapping[str, Behavior], server: grpc.aio.Server) -> None:
    """Serve ``behaviors`` (from ``wrap_methods``) as otp.v1.OtpService on ``server``.

    A body that is not the request message gets INVALID_ARGUMENT: with the generated
    ``add_OtpServiceServicer_to_server`` it makes gRPC answer UNKNOWN and log a stack trace. Here
    parsing cannot fail: such a body reaches the wrappers as an ``Undecodable``, which the method
    refuses.
    """
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
    for method in SERVICE.methods:
        request_type, response_type = message_types(method.name)
        handlers[method.name] = grpc.unary_unary_rpc_method_handler(
            behaviors[method.name],
            request_deserializer=_tolerant(request_type),
            response_serializer=response_type.SerializeToString,
        )
    # Registered (not generic) handlers: gRPC then finds the method without a per-call lookup.
    server.add_registered_method_handlers(SERVICE.full_name, handlers)


def message_types(rpc: str) -> tuple[type[Message], type[Message]]:
    """The request and response classes of OtpService method ``rpc``."""
    method = SERVICE.methods_by_name[rpc]
    return getattr(otp_pb2, method.input_type.name), getattr(otp_pb2, method.output_type.name)


@dataclass(frozen=True, slots=True)
class Undecodable:
    """Stands in for a request body that is not a valid ``expected`` message."""

    expected: str


def _tolerant(request_type: type[Message]) -> Callable[[bytes], Message | Undecodable]:
    def parse(body: bytes) -> Message | Undecodable:
        try:
            return request_type.FromString(body)
        except DecodeError:
            return Undecodable(request_type.__name__)

    return parse


def _with_statuses(method: Behavior) -> Behavior:
    """``method`` with errors turned into statuses, the one place where that happens.

    A service error aborts with its mapped status, a bug with INTERNAL (the trace goes to the
    log, none to the caller), and an undecodable body with INVALID_ARGUMENT.
    """

    async def handle(request: Any, context: _Context) -> Any:
        try:
            if isinstance(request, Undecodable):
                raise InvalidInput("request", f"is not a valid {request.expected}")
            return await method(request, context)
        except asyncio.CancelledError:
            if not ended_by_grace():
                raise
            await abort(context, SHUTTING_DOWN)
        except OtpError as exc:
            if isinstance(exc, LimitExceeded):
                metrics.count_limit_refusal(exc.kind)
            await abort(context, exc)
        except Exception:
            log.exception(
                "unexpected error while handling an RPC", extra={"event": "rpc_internal_error"}
            )
            await _abort(context, _INTERNAL)

    return handle


# What a call InFlight cut is told.
SHUTTING_DOWN = ShuttingDown(
    "the server is shutting down and the call did not finish in time; retry it", retry_after=1.0
)
# Calls still running this long before the shutdown grace ends are told so (at most; half the
# grace when it is shorter), so that the answer reaches them before gRPC and aiohttp cut them.
_CUT_BEFORE_GRACE_ENDS_SECONDS = 0.25


class InFlight:
    """The calls running now: OtpService's, over gRPC or from the JSON gateway in process, or
    the gateway's to a remote server.

    Just before the shutdown grace ends, ``cut`` ends those still running with UNAVAILABLE and
    an ErrorInfo (SERVER_SHUTTING_DOWN), while their callers can still be told: gRPC's own cut
    (server.stop) and aiohttp's end a call without a word, or drop the connection.
    """

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    @contextlib.contextmanager
    def tracking(self) -> Iterator[None]:
        """The current task is a call in flight inside."""
        task = asyncio.current_task()
        assert task is not None  # a call always runs in a task
        self._tasks.add(task)
        try:
            yield
        finally:
            self._tasks.discard(task)

    def wrap(self, rpc: str, behavior: Behavior) -> Behavior:
        async def tracked(request: Any, context: _Context) -> Any:
            with self.tracking():
                return await behavior(request, context)

        return tracked

    def cut_before(self, grace: float) -> asyncio.TimerHandle:
        """Cut the calls still running just before ``grace`` seconds from now have passed."""
        cut_at = max(grace - _CUT_BEFORE_GRACE_ENDS_SECONDS, grace / 2)
        return asyncio.get_running_loop().call_later(cut_at, self._cut)

    def _cut(self) -> None:
        for task in self._tasks:
            _cut_tasks.add(task)
            task.cancel("the shutdown grace has ended")


# The tasks InFlight cut. By task, not by the CancelledError's message, which a library in
# between (grpc.aio's client call) may replace with one of its own.
_cut_tasks: weakref.WeakSet[asyncio.Task[Any]] = weakref.WeakSet()


def ended_by_grace() -> bool:
    """Whether the current task was cancelled by InFlight, at the end of the shutdown grace."""
    return asyncio.current_task() in _cut_tasks


async def abort(context: _Context, exc: OtpError) -> NoReturn:
    """End the call with the status of ``exc`` (for the wrappers, e.g. caller auth)."""
    await _abort(context, status_for(exc))


def status_for(exc: OtpError) -> status_pb2.Status:
    """The google.rpc.Status a caller sees for ``exc``.

    Its details: an ErrorInfo always, a BadRequest for a malformed field, and a RetryInfo where
    waiting helps.
    """
    retry_after: float | None = None
    if isinstance(exc, InvalidInput):
        code = code_pb2.INVALID_ARGUMENT
    elif isinstance(exc, NotAuthenticated):
        code = code_pb2.UNAUTHENTICATED
    elif isinstance(exc, LimitExceeded):
        code, retry_after = code_pb2.RESOURCE_EXHAUSTED, exc.retry_after
    elif isinstance(exc, NotAllowed):
        code = code_pb2.PERMISSION_DENIED
    elif isinstance(exc, NotFound):
        code = code_pb2.NOT_FOUND
    elif isinstance(exc, DeliveryRefused):
        code = code_pb2.FAILED_PRECONDITION
    elif isinstance(exc, Unavailable):
        code, retry_after = code_pb2.UNAVAILABLE, exc.retry_after
    else:  # pragma: no cover - every OtpError subclass is mapped above
        code = code_pb2.INTERNAL
    status = _status(code, exc.message, exc.reason, exc.metadata)
    if isinstance(exc, InvalidInput):
        violation = error_details_pb2.BadRequest.FieldViolation(
            field=exc.field, description=exc.problem
        )
        status.details.add().Pack(error_details_pb2.BadRequest(field_violations=[violation]))
    if retry_after is not None:
        # Whole seconds, rounded up: a caller that waits the hinted time is never refused again.
        delay = duration_pb2.Duration(seconds=max(1, math.ceil(retry_after)))
        status.details.add().Pack(error_details_pb2.RetryInfo(retry_delay=delay))
    return status


def _status(
    code: int, message: str, reason: ErrorReason, metadata: Mapping[str, str]
) -> status_pb2.Status:
    status = status_pb2.Status(code=code, message=message)
    info = error_details_pb2.ErrorInfo(reason=reason.name, domain=ERROR_DOMAIN, metadata=metadata)
    status.details.add().Pack(info)
    return status


_INTERNAL = _status(code_pb2.INTERNAL, "internal error", ErrorReason.INTERNAL_ERROR, {})


async def _abort(context: _Context, status: status_pb2.Status) -> NoReturn:
    grpc_status = rpc_status.to_status(status)
    finish = aborting.get()
    if finish is not None:
        finish(grpc_status.code.name)
    try:
        await context.abort(grpc_status.code, grpc_status.details, grpc_status.trailing_metadata)
    except grpc.aio.AbortError:
        raise
    except Exception as exc:
        # The status could not be sent: the call ended meanwhile (its deadline passed, the
        # caller left), and the caller has its answer from its own side. As a cancelled call,
        # not a bug: gRPC would log this error with a traceback.
        remaining = context.time_remaining()
        if context.done() or (remaining is not None and remaining <= 0):
            raise asyncio.CancelledError from exc
        raise
    raise AssertionError("abort returned")  # pragma: no cover
