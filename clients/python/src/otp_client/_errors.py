"""The errors a caller catches, decoded from the status' google.rpc details.

    OtpError                 any failed call: code, message, reason, metadata, retry_after
    ├── InvalidInput         INVALID_ARGUMENT: ``field`` names the bad field, ``problem`` says why
    ├── Unauthenticated      UNAUTHENTICATED: no valid caller token
    ├── NotAllowed           PERMISSION_DENIED: e.g. a number whose country is not served
    ├── NotFound             NOT_FOUND: GetOtpStatus found no live code for the number
    ├── RateLimited          RESOURCE_EXHAUSTED with a retry delay: ``retry_after`` seconds
    ├── DeliveryRefused      FAILED_PRECONDITION: Interakt refused the message; ``reason`` says why
    └── Unavailable          UNAVAILABLE or DEADLINE_EXCEEDED: try again later

``reason`` is the name of an otp.v1.ErrorReason (proto/otp/v1/error_reason.proto), such as
"RESEND_COOLDOWN", or "" when gRPC itself ended the call (a deadline, no connection).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import grpc
from google.rpc import error_details_pb2, status_pb2

_DETAILS_KEY = "grpc-status-details-bin"


@dataclass(frozen=True)
class _Details:
    """What the google.rpc details of a status say."""

    reason: str = ""
    metadata: Mapping[str, str] = field(default_factory=dict)
    retry_after: float | None = None
    # (field, description) of each google.rpc.BadRequest violation.
    violations: tuple[tuple[str, str], ...] = ()


class OtpError(Exception):
    """A call that did not succeed: its status code and message, and what the details said."""

    def __init__(self, code: grpc.StatusCode, message: str, details: _Details = _Details()) -> None:
        super().__init__(f"{details.reason or code.name}: {message}")
        self.code = code
        self.message = message
        self.reason = details.reason
        self.metadata = dict(details.metadata)
        # Seconds until the same call may succeed (google.rpc.RetryInfo), when the service says.
        self.retry_after = details.retry_after
        self._violations = details.violations


class InvalidInput(OtpError):
    """A request field is malformed: ``field`` names it, ``problem`` says what is wrong."""

    @property
    def field(self) -> str:
        return self._violations[0][0] if self._violations else self.metadata.get("field", "")

    @property
    def problem(self) -> str:
        return self._violations[0][1] if self._violations else self.message


class Unauthenticated(OtpError):
    """The call carried no valid caller token."""


class NotAllowed(OtpError):
    """Policy forbids the call, e.g. codes are not sent to the number's country."""


class NotFound(OtpError):
    """GetOtpStatus: the number has no live code (none was sent, or it expired)."""


class RateLimited(OtpError):
    """A limit was hit; ``retry_after`` says how many seconds to wait, ``reason`` which limit."""

    retry_after: float


class DeliveryRefused(OtpError):
    """The message provider refused the message; ``reason`` is the cause. Retrying will not help."""


class Unavailable(OtpError):
    """The service or one of its dependencies did not answer in time; try again later."""


_BY_CODE: dict[grpc.StatusCode, type[OtpError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidInput,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: NotAllowed,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.FAILED_PRECONDITION: DeliveryRefused,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: Unavailable,
}


def error_from(
    code: grpc.StatusCode,
    message: str,
    trailing_metadata: Sequence[tuple[str, str | bytes]] | None,
) -> OtpError:
    """The typed error for a failed call's status and trailing metadata."""
    details = _decode(trailing_metadata or ())
    kind = _BY_CODE.get(code, OtpError)
    # gRPC itself answers RESOURCE_EXHAUSTED for an oversize request: that is no rate limit.
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and details.retry_after is not None:
        kind = RateLimited
    return kind(code, message, details)


def _decode(trailing_metadata: Sequence[tuple[str, str | bytes]]) -> _Details:
    for key, value in trailing_metadata:
        if key == _DETAILS_KEY and isinstance(value, bytes):
            return _details(status_pb2.Status.FromString(value))
    return _Details()


def _details(status: status_pb2.Status) -> _Details:
    reason, metadata, retry_after = "", {}, None
    violations: list[tuple[str, str]] = []
    info = error_details_pb2.ErrorInfo()
    retry = error_details_pb2.RetryInfo()
    bad_request = error_details_pb2.BadRequest()
    for detail in status.details:
        if detail.Unpack(info):
            reason, metadata = info.reason, dict(info.metadata)
        elif detail.Unpack(retry):
            delay = retry.retry_delay
            retry_after = delay.seconds + delay.nanos / 1e9
        elif detail.Unpack(bad_request):
            violations += [(v.field, v.description) for v in bad_request.field_violations]
    return _Details(reason, metadata, retry_after, tuple(violations))
