"""The OTP rules: make a code, keep only its keyed digest, deliver it, check what the user typed."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import secrets
from collections.abc import AsyncIterator, Mapping

from otp_service import context, metrics
from otp_service.errors import InvalidInput, LimitExceeded, NotAllowed, StoreUnavailable
from otp_service.phone import PhoneNumber, parse_phone
from otp_service.results import Channel, Delivery, SendResult, VerifyResult
from otp_service.sender import Sender
from otp_service.store import STORE_UNAVAILABLE, Store

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
        store_timeout_seconds: float,
        send_timeout_seconds: float,
        allowed_countries: frozenset[str],
        test_numbers: Mapping[str, str] | None = None,
    ) -> None:
        self._store = store
        self._sender = sender
        self._secret = secret
        self._code_length = code_length
        self._store_timeout = store_timeout_seconds
        self._send_timeout = send_timeout_seconds
        self._allowed_countries = allowed_countries
        # E.164 number -> its fixed code (OTP_TEST_NUMBERS).
        self._test_numbers = dict(test_numbers or {})

    async def send(self, phone_number: str, *, budget: float | None = None) -> SendResult:
        """Store a new code for the number and deliver it within ``budget`` seconds.

        Takes at most one Redis timeout plus the delivery budget. Raises InvalidInput,
        NotAllowed, LimitExceeded, DeliveryRefused, DeliveryUnavailable or StoreUnavailable.
        A send that fails, however (a cancelled call too), is withdrawn: once Redis answers,
        neither its code nor its count against any limit is left.
        """
        phone = parse_phone(phone_number)
        if phone.country_code[1:] not in self._allowed_countries:
            allowed = ", ".join(f"+{c}" for c in sorted(self._allowed_countries))
            raise NotAllowed(
                f"phone_number: codes are not sent to {phone.country_code} numbers "
                f"(allowed: {allowed})",
                {
                    "country_code": phone.country_code,
                    "allowed_country_codes": allowed.replace(" ", ""),
                },
            )
        test_code = self._test_numbers.get(phone.e164)
        code = test_code or "".join(secrets.choice("0123456789") for _ in range(self._code_length))
        digest = self._digest(phone.e164, code)
        send_id = secrets.token_hex(8)
        caller = context.caller.get()
        loop = asyncio.get_running_loop()
        started = loop.time()
        # How far the send got, for what a failure must withdraw: each store step that may have
        # run (it did, or its answer never came), and when the store was done with.
        stored = counted = False
        store_done: float | None = None
        try:
            # Stored before it is sent, so a code is never in a user's hands without being in
            # Redis. The number's limits are checked first: they refuse far more often than the
            # caller's budget, and then nothing needs undoing. Both calls share one Redis
            # timeout, so a slow Redis cannot hold the caller for more than that before delivery.
            async with _store_deadline(self._store_timeout):
                stored = True
                expires_at_ms, resend_after_ms = await self._store.add_code(
                    phone.e164, digest, send_id
                )
                counted = True
                # A test number's code goes nowhere: it costs nothing of the Interakt account's
                # budget.
                await self._store.count_caller_send(caller, send_id, account=test_code is None)
            store_done = loop.time()
            remaining = self._send_timeout
            if budget is not None:
                remaining = min(remaining, budget - (store_done - started))
            if test_code is None:
                delivery = await self._sender.send(phone, code, budget=remaining)
            else:
                delivery = _test_number_used(phone, "SendOtp")
        except BaseException as exc:
            refused = isinstance(exc, LimitExceeded)
            if refused:
                # The step that refused changed nothing: only a code the caller's budget refused
                # is withdrawn.
                stored, counted = counted, False
            if stored:
                answered = refused or store_done is not None
                withdrawal = self._store.withdraw(
                    send_id,
                    phone=phone.e164,
                    digest=digest,
                    caller=caller if counted else None,
                    in_doubt=not answered,
                )
                if answered and not isinstance(exc, asyncio.CancelledError):
                    # Redis is answering: the caller is told once the send is withdrawn, so its
                    # next call finds it gone, within what is left of the one Redis timeout the
                    # send may spend on the store. The rest is left to the background.
                    left = self._store_timeout - ((store_done or loop.time()) - started)
                    await asyncio.wait([withdrawal], timeout=max(left, 0.001))
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
        if phone.e164 in self._test_numbers:
            _test_number_used(phone, "VerifyOtp")
        return await self._store.verify(phone.e164, self._digest(phone.e164, otp_code))

    def _digest(self, phone: str, code: str) -> str:
        # Keyed by the number too, so equal codes of two numbers never share a digest.
        # hmac.digest: the one-shot C path, with no HMAC object per call (every login runs this).
        mac = hmac.digest(self._secret, f"{phone}:{code}".encode(), "sha256")
        return mac.hex()[:_DIGEST_HEX_CHARS]


@contextlib.asynccontextmanager
async def _store_deadline(seconds: float) -> AsyncIterator[None]:
    """Store calls inside must all be answered within ``seconds``, or StoreUnavailable."""
    try:
        async with asyncio.timeout(seconds):
            yield
    except TimeoutError as exc:
        raise StoreUnavailable(STORE_UNAVAILABLE) from exc


_TEST_DELIVERY = Delivery(Channel.TEST, "")


def _test_number_used(phone: PhoneNumber, rpc: str) -> Delivery:
    """Log and count a call for a test number: one in production is worth noticing."""
    log.warning(
        "test number %s used by %s: its code is fixed and never sent",
        phone.masked,
        rpc,
        extra={"event": "test_number_used"},
    )
    metrics.child(metrics.TEST_NUMBER_USES, rpc).inc()
    return _TEST_DELIVERY
