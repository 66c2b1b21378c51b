"""The OTP rules: make a code, keep only its keyed digest, deliver it, check what the user typed."""

from __future__ import annotations

import asyncio
import hmac
import logging
import secrets

from otp_service import context
from otp_service.errors import InvalidInput, NotAllowed
from otp_service.phone import parse_phone
from otp_service.results import SendResult, VerifyResult
from otp_service.sender import Sender
from otp_service.store import Store

log = logging.getLogger(__name__)

# 128 bits of HMAC-SHA256 identify a code; more would only cost Redis memory.
_DIGEST_HEX_CHARS = 32


class OtpService:
    """Sends and verifies one-time codes; transport-agnostic."""

    def __init__(
        self,
        *,
        store: Store,
        sender: Sender,
        secret: bytes,
        code_length: int,
        send_timeout_seconds: float,
        allowed_countries: frozenset[str],
    ) -> None:
        self._store = store
        self._sender = sender
        self._secret = secret
        self._code_length = code_length
        self._send_timeout = send_timeout_seconds
        self._allowed_countries = allowed_countries

    async def send(self, phone_number: str, *, budget: float | None = None) -> SendResult:
        """Store a new code for the number and deliver it within ``budget`` seconds.

        Raises InvalidInput, NotAllowed, LimitExceeded, DeliveryRefused, DeliveryUnavailable or
        StoreUnavailable. A code the provider did not accept is removed again.
        """
        phone = parse_phone(phone_number)
        if phone.country_code[1:] not in self._allowed_countries:
            allowed = ", ".join(f"+{c}" for c in sorted(self._allowed_countries))
            raise NotAllowed(
                f"phone_number: codes are not sent to {phone.country_code} numbers "
                f"(allowed: {allowed})"
            )
        code = "".join(secrets.choice("0123456789") for _ in range(self._code_length))
        digest = self._digest(phone.e164, code)
        # Stored before it is sent, so a code is never in a user's hands without being in Redis.
        # The number's limits are checked first: they refuse far more often than the caller's
        # budget, and then nothing needs undoing.
        expires_at_ms, resend_after_ms = await self._store.add_code(phone.e164, digest)
        caller = context.caller.get()
        ticket: int | None = None
        budget = self._send_timeout if budget is None else min(budget, self._send_timeout)
        try:
            ticket = await self._store.count_caller_send(caller)
            delivery = await self._sender.send(phone, code, budget=budget)
        except BaseException:
            # Shielded: a caller that cancels must still not leave an undelivered code behind.
            await asyncio.shield(self._forget(phone.e164, digest, caller, ticket))
            raise
        return SendResult(
            expires_at_ms=expires_at_ms,
            # Whole seconds, rounded up: a resend after this many seconds is not refused.
            resend_after_seconds=-(-resend_after_ms // 1000),
            delivery=delivery,
        )

    async def verify(self, phone_number: str, otp_code: str) -> VerifyResult:
        """Check a typed code: one atomic store call, attempt counted before comparing."""
        phone = parse_phone(phone_number)
        if not otp_code:
            raise InvalidInput("otp_code", "is required")
        if not (otp_code.isascii() and otp_code.isdigit()):
            raise InvalidInput("otp_code", "must contain only the digits 0-9")
        if len(otp_code) != self._code_length:
            raise InvalidInput("otp_code", f"must be exactly {self._code_length} digits")
        return await self._store.verify(phone.e164, self._digest(phone.e164, otp_code))

    def _digest(self, phone: str, code: str) -> str:
        # Keyed by the number too, so equal codes of two numbers never share a digest.
        # hmac.digest: the one-shot C path, with no HMAC object per call (every login runs this).
        mac = hmac.digest(self._secret, f"{phone}:{code}".encode(), "sha256")
        return mac.hex()[:_DIGEST_HEX_CHARS]

    async def _forget(self, phone: str, digest: str, caller: str, ticket: int | None) -> None:
        """Undo the storing (and the counting, with ``ticket``) of a send that did not happen."""
        undo = [self._store.cancel_code(phone, digest)]
        if ticket is not None:
            undo.append(self._store.uncount_caller_send(caller, ticket))
        for result in await asyncio.gather(*undo, return_exceptions=True):
            if isinstance(result, BaseException):
                log.error("could not undo an unsent code, it expires with its TTL: %r", result)
