"""The service's own error types. Transports turn each into one status in one place.

    OtpError
    ├── InvalidInput          a request field is malformed             INVALID_ARGUMENT
    ├── LimitExceeded         a number's or caller's limit was hit     RESOURCE_EXHAUSTED
    ├── NotAllowed            policy forbids it (country not allowed)  PERMISSION_DENIED
    ├── DeliveryRefused       Interakt refused for a lasting reason    FAILED_PRECONDITION
    └── Unavailable           infrastructure trouble, retry later      UNAVAILABLE
        ├── StoreUnavailable      Redis unreachable, slow or failing
        └── DeliveryUnavailable   Interakt unreachable, slow, 5xx or rate-limited

Expected verification results (wrong code, expired, ...) are not errors: see ``otp.VerifyResult``.
Messages are safe to show a caller: they never contain a code, a key or a stack trace.
"""

from __future__ import annotations


class OtpError(Exception):
    """Base of every error the service reports to a caller."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidInput(OtpError):
    """A request field is malformed; ``field`` names it."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field


class LimitExceeded(OtpError):
    """A limit was reached; the caller may try again after ``retry_after`` seconds.

    ``kind`` names the limit (cooldown, hourly, paused, caller, account) for the metrics.
    """

    def __init__(self, kind: str, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.kind = kind
        self.retry_after = retry_after


class NotAllowed(OtpError):
    """The request is well-formed but policy forbids it (a country outside the allowlist)."""


class DeliveryRefused(OtpError):
    """The message provider refused the message; retrying the same request will not help."""


class Unavailable(OtpError):
    """A dependency is unreachable or failing; ``retry_after`` is a hint when known."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class StoreUnavailable(Unavailable):
    """Redis did not answer in time or answered with an error."""


class DeliveryUnavailable(Unavailable):
    """Interakt did not answer in time, failed, or asked us to slow down."""
