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
    """What the message provider accepted."""

    channel: Channel
    message_id: str


@dataclass(frozen=True, slots=True)
class SendResult:
    """A code that was stored and handed to the provider."""

    expires_at_ms: int
    resend_after_seconds: int
    delivery: Delivery
