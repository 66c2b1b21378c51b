"""A client for otp.v1.OtpService: send a one-time code, then verify what the user typed, and
see what became of it.

``OtpClient`` blocks, ``AsyncOtpClient`` is for asyncio; failures raise an ``OtpError``
subclass. clients/README.md has examples.
"""

from otp_client._client import (
    DEFAULT_TIMEOUT,
    SEND_ATTEMPTS,
    AsyncOtpClient,
    Channel,
    DeliveryFailure,
    DeliveryState,
    OtpClient,
    OtpStatus,
    SendResult,
    Tls,
    VerifyOutcome,
    VerifyResult,
)
from otp_client._errors import (
    DeliveryRefused,
    InvalidInput,
    NotAllowed,
    NotFound,
    OtpError,
    RateLimited,
    Unauthenticated,
    Unavailable,
)

__all__ = [
    "DEFAULT_TIMEOUT",
    "SEND_ATTEMPTS",
    "AsyncOtpClient",
    "Channel",
    "DeliveryFailure",
    "DeliveryRefused",
    "DeliveryState",
    "InvalidInput",
    "NotAllowed",
    "NotFound",
    "OtpClient",
    "OtpError",
    "OtpStatus",
    "RateLimited",
    "SendResult",
    "Tls",
    "Unauthenticated",
    "Unavailable",
    "VerifyOutcome",
    "VerifyResult",
]
