"""Typed outcomes of the OTP operations: expected results are values, not exceptions."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class VerifyOutcome(enum.Enum):
    """Why a code was or was not accepted (mirrors otp.v1.VerifyOutcome)."""

    VERIFIED = 1
    WRONG_CODE = 2
    NO_ACTIVE_CODE = 3
    TOO_MANY_ATTEMPTS = 4


@dataclass(frozen=True, slots=True)
class VerifyResult:
    """The outcome of one verification; ``attempts_remaining`` is set with WRONG_CODE."""

    outcome: VerifyOutcome
    attempts_remaining: int = 0

    @property
    def verified(self) -> bool:
        return self.outcome is VerifyOutcome.VERIFIED


class Channel(enum.Enum):
    """How a code reached the user (mirrors otp.v1.Channel)."""

    TEXT = 1
    TEMPLATE = 2
    LOG = 3
    TEST = 4


@dataclass(frozen=True, slots=True)
class Delivery:
    """What the message provider accepted; ``language`` is a template's ("" for Text)."""

    channel: Channel
    message_id: str
    language: str = ""


@dataclass(frozen=True, slots=True)
class SendResult:
    """A code that was stored and handed to the provider."""

    expires_at_ms: int
    resend_after_seconds: int
    delivery: Delivery


class DeliveryState(enum.Enum):
    """How far a code's message got, as Interakt reported it (mirrors otp.v1.DeliveryState)."""

    QUEUED = 1
    SENT = 2
    DELIVERED = 3
    READ = 4
    FAILED = 5


class DeliveryFailure(enum.Enum):
    """Why WhatsApp did not deliver a message, for a caller to act on (mirrors
    otp.v1.DeliveryFailure; docs/interakt.md maps WhatsApp's codes to these)."""

    NOT_ON_WHATSAPP = 1
    TEMPLATE_UNAVAILABLE = 2
    RATE_LIMITED = 3
    EXPIRED = 4
    UNKNOWN = 5


@dataclass(frozen=True, slots=True)
class OtpStatus:
    """What became of a number's latest code (GetOtpStatus); never the code itself."""

    state: DeliveryState
    # None while Interakt has not yet accepted the message.
    channel: Channel | None
    message_id: str
    failure_reason: str
    verified: bool
    expires_at_ms: int
    resend_after_seconds: int
    # Set with FAILED.
    failure: DeliveryFailure | None = None
    # The template's language the message went out in ("" for Text, or before it was accepted).
    language: str = ""


@dataclass(frozen=True, slots=True)
class DeliveryReport:
    """One of Interakt's delivery reports (a webhook), about the message sent to ``phone``.

    ``send_id`` is what the send put in Interakt's callbackData ("" when the report has none);
    ``reason`` is Interakt's failure reason, "" when there is none, and ``failure`` what it
    means (set with FAILED).
    """

    phone: str
    message_id: str
    send_id: str
    state: DeliveryState
    reason: str = ""
    failure: DeliveryFailure | None = None


class ReportOutcome(enum.Enum):
    """What a delivery report changed."""

    APPLIED = "applied"  # the message's state moved forward
    UNCHANGED = "unchanged"  # a redelivery, or a report older than the state it has
    UNKNOWN = "unknown"  # no such message: not ours, or its code expired
