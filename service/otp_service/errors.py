"""The service's own error types. Transports turn each into one status in one place.

    OtpError
    ├── InvalidInput          a request field is malformed             INVALID_ARGUMENT
    ├── NotAuthenticated      no valid caller token                    UNAUTHENTICATED
    ├── LimitExceeded         a number's or caller's limit was hit     RESOURCE_EXHAUSTED
    ├── NotAllowed            policy forbids it (country not allowed)  PERMISSION_DENIED
    ├── NotFound              no live code of the number (status)      NOT_FOUND
    ├── DeliveryRefused       Interakt refused for a lasting reason    FAILED_PRECONDITION
    └── Unavailable           infrastructure trouble, retry later      UNAVAILABLE
        ├── StoreUnavailable      Redis unreachable, slow or failing
        │   └── StoreUnreachable      nothing reached Redis: the command never ran
        ├── SendInProgress        a send with the same idempotency key is still running
        ├── ShuttingDown          the call outlasted the shutdown grace
        └── DeliveryUnavailable   Interakt unreachable, slow, 5xx or rate-limited
            ├── CircuitOpen           Interakt failed repeatedly; not called for a while
            └── DeliveryInDoubt       handed to Interakt, no answer in time: it may arrive

Each error also carries its ``reason`` (an ``ErrorReason``) and ``metadata``, the specifics a
calling program acts on: they become the status' google.rpc.ErrorInfo.
Expected verification results (wrong code, expired, ...) are not errors: see ``otp.VerifyResult``.
Messages are safe to show a caller: they never contain a code, a key or a stack trace.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping


class ErrorReason(enum.Enum):
    """Why a call failed, as ErrorInfo.reason names it (mirrors otp.v1.ErrorReason).

    proto/otp/v1/error_reason.proto documents each one for callers.
    """

    INVALID_PHONE_NUMBER = 1
    INVALID_CODE = 2
    INVALID_REQUEST = 3
    CALLER_NOT_AUTHENTICATED = 4
    COUNTRY_NOT_SERVED = 5
    RESEND_COOLDOWN = 6
    HOURLY_SEND_CAP = 7
    NUMBER_LOCKED = 8
    CALLER_SEND_BUDGET = 9
    ACCOUNT_SEND_BUDGET = 10
    RECIPIENT_NOT_A_CONTACT = 11
    OUTSIDE_24_HOUR_WINDOW = 12
    TEMPLATE_NOT_APPROVED = 13
    PROVIDER_KEY_REJECTED = 14
    PROVIDER_REFUSED = 15
    PROVIDER_UNAVAILABLE = 16
    STORE_UNAVAILABLE = 17
    INTERNAL_ERROR = 18
    INVALID_IDEMPOTENCY_KEY = 19
    IDEMPOTENCY_KEY_REUSED = 20
    SEND_IN_PROGRESS = 21
    PROVIDER_CIRCUIT_OPEN = 22
    NO_CODE_SENT = 23
    DELIVERY_IN_DOUBT = 24
    SERVER_SHUTTING_DOWN = 25


# The reason of a malformed field, by field; any other field is INVALID_REQUEST.
_FIELD_REASONS = {
    "phone_number": ErrorReason.INVALID_PHONE_NUMBER,
    "otp_code": ErrorReason.INVALID_CODE,
    "idempotency_key": ErrorReason.INVALID_IDEMPOTENCY_KEY,
}
# The reason of each limit, by LimitExceeded.kind (the metrics' label).
_LIMIT_REASONS = {
    "cooldown": ErrorReason.RESEND_COOLDOWN,
    "hourly": ErrorReason.HOURLY_SEND_CAP,
    "paused": ErrorReason.NUMBER_LOCKED,
    "caller": ErrorReason.CALLER_SEND_BUDGET,
    "account": ErrorReason.ACCOUNT_SEND_BUDGET,
}


class OtpError(Exception):
    """Base of every error the service reports to a caller."""

    reason: ErrorReason

    def __init__(self, message: str, metadata: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.metadata = dict(metadata or {})


class InvalidInput(OtpError):
    """A request field is malformed; ``field`` names it, ``problem`` says what is wrong.

    The reason follows from the field unless ``reason`` says otherwise.
    """

    def __init__(self, field: str, problem: str, reason: ErrorReason | None = None) -> None:
        super().__init__(f"{field}: {problem}", {"field": field})
        self.field = field
        self.problem = problem
        self.reason = reason or _FIELD_REASONS.get(field, ErrorReason.INVALID_REQUEST)


class NotAuthenticated(OtpError):
    """The call carries no known caller token."""

    reason = ErrorReason.CALLER_NOT_AUTHENTICATED


class LimitExceeded(OtpError):
    """A limit was reached; the caller may try again after ``retry_after`` seconds.

    ``kind`` names the limit (cooldown, hourly, paused, caller, account): the metrics' label,
    from which the reason follows.
    """

    def __init__(
        self,
        kind: str,
        message: str,
        retry_after: float,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message, metadata)
        self.kind = kind
        self.retry_after = retry_after
        self.reason = _LIMIT_REASONS[kind]


class NotAllowed(OtpError):
    """The request is well-formed but policy forbids it (a country outside the allowlist)."""

    reason = ErrorReason.COUNTRY_NOT_SERVED


class NotFound(OtpError):
    """GetOtpStatus: the number has no live code."""

    reason = ErrorReason.NO_CODE_SENT


class DeliveryRefused(OtpError):
    """The message provider refused the message; retrying the same request will not help."""

    def __init__(
        self, reason: ErrorReason, message: str, metadata: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(message, metadata)
        self.reason = reason


class Unavailable(OtpError):
    """A dependency is unreachable or failing; ``retry_after`` is a hint when known."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class StoreUnavailable(Unavailable):
    """Redis did not answer in time or answered with an error."""

    reason = ErrorReason.STORE_UNAVAILABLE


class StoreUnreachable(StoreUnavailable):
    """No command reached Redis (connection refused, unknown host, authentication refused, not
    the Cluster the URL names): nothing was counted, stored or used."""


class ShuttingDown(Unavailable):
    """The server is stopping and the call ran to the end of the shutdown grace."""

    reason = ErrorReason.SERVER_SHUTTING_DOWN


class SendInProgress(Unavailable):
    """A SendOtp with the same idempotency key is still running; retry with the same key."""

    reason = ErrorReason.SEND_IN_PROGRESS


class DeliveryUnavailable(Unavailable):
    """Interakt did not answer in time, failed, or asked us to slow down."""

    reason = ErrorReason.PROVIDER_UNAVAILABLE


class CircuitOpen(DeliveryUnavailable):
    """Interakt failed repeatedly, so it is not called until ``retry_after`` has passed."""

    reason = ErrorReason.PROVIDER_CIRCUIT_OPEN


class DeliveryInDoubt(DeliveryUnavailable):
    """A request reached Interakt and its answer did not come in time: the message may arrive,
    so its code stays valid (README "Faults")."""

    reason = ErrorReason.DELIVERY_IN_DOUBT
