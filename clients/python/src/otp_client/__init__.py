"""A client for otp.v1.OtpService: send a one-time code, then verify what the user typed.

``OtpClient`` blocks, ``AsyncOtpClient`` is for asyncio; failures raise an ``OtpError``
subclass. clients/README.md has examples.
"""

from otp_client._client import (
    DEFAULT_TIMEOUT,
    AsyncOtpClient,
    Channel,
    OtpClient,
    SendResult,
    Tls,
    VerifyOutcome,
    VerifyResult,
)
from otp_client._errors import (
    DeliveryRefused,
    InvalidInput,
    NotAllowed,
    OtpError,
    RateLimited,
    Unauthenticated,
    Unavailable,
)

__all__ = [
    "DEFAULT_TIMEOUT",
    "AsyncOtpClient",
    "Channel",
    "DeliveryRefused",
    "InvalidInput",
    "NotAllowed",
    "OtpClient",
    "OtpError",
    "RateLimited",
    "SendResult",
    "Tls",
    "Unauthenticated",
    "Unavailable",
    "VerifyOutcome",
    "VerifyResult",
]
