"""otp-service: send one-time codes over WhatsApp (Interakt) and verify them, over gRPC."""

from otp_service.config import ConfigError, Settings
from otp_service.errors import (
    DeliveryRefused,
    DeliveryUnavailable,
    InvalidInput,
    LimitExceeded,
    NotAllowed,
    OtpError,
    StoreUnavailable,
    StoreUnreachable,
    Unavailable,
)
from otp_service.otp import OtpService
from otp_service.results import Channel, Delivery, SendResult, VerifyOutcome, VerifyResult
from otp_service.server import Deps, OtpServer, build_deps, create_server

__all__ = [
    "Channel",
    "ConfigError",
    "Delivery",
    "DeliveryRefused",
    "DeliveryUnavailable",
    "Deps",
    "InvalidInput",
    "LimitExceeded",
    "NotAllowed",
    "OtpError",
    "OtpServer",
    "OtpService",
    "SendResult",
    "Settings",
    "StoreUnavailable",
    "StoreUnreachable",
    "Unavailable",
    "VerifyOutcome",
    "VerifyResult",
    "build_deps",
    "create_server",
]
