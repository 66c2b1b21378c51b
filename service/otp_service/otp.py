"""The OTP rules: make a code, keep only its keyed digest, deliver it, check what the user typed."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import secrets
from collections.abc import AsyncIterator, Mapping

from otp_service import context, metrics
from otp_service.errors import (
    DeliveryUnavailable,
    InvalidInput,
    LimitExceeded,
    NotAllowed,
    NotFound,
    SendInProgress,
    StoreUnavailable,
    StoreUnreachable,
)
from otp_service.phone import PhoneNumber, parse_phone
from otp_service.results import (
    Channel,
    Delivery,
    DeliveryReport,
    OtpStatus,
    ReportOutcome,
    SendResult,
    VerifyResult,
)
from otp_service.sender import Sender
from otp_service.store import STORE_UNAVAILABLE, FirstAnswer, Pending, Store, Stored

log = logging.getLogger(__name__)

# 128 bits of HMAC-SHA256 identify a code; more would only cost Redis memory.
_DIGEST_HEX_CHARS = 32
MAX_IDEMPOTENCY_KEY_LENGTH = 128
# A repeat of an idempotent send asks for the first send's answer after these waits (doubling),
# and gives up this long before its deadline, to answer SendInProgress in time.
_FIRST_POLL_SECONDS = 0.02
_LAST_POLL_SECONDS = 0.2
_ANSWER_MARGIN_SECONDS = 0.05


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
        # A send answers within this: its store calls, its delivery and the record of its
        # answer. A send that claimed an idempotency key longer ago and never answered is gone
        # (its process died), and a repeat sends in its place.
        self._key_lease = send_timeout_seconds + 2 * store_timeout_seconds + 1.0

    async def send(
        self, phone_number: str, *, budget: float | None = None, idempotency_key: str = ""
    ) -> SendResult:
        """Store a new code for the number and deliver it within ``budget`` seconds.

        Takes at most one Redis timeout plus the delivery budget, and one Redis timeout more to
        record what Interakt accepted. Raises InvalidInput, NotAllowed, LimitExceeded,
        DeliveryRefused, DeliveryUnavailable or StoreUnavailable. A send that fails, however (a
        cancelled call too), is withdrawn: once Redis answers, neither its code nor its count
        against any limit is left.

        With ``idempotency_key``, a repeat of a send that answered gets that answer again and
        sends nothing; one that arrives while that send runs waits for its answer (within
        ``budget``: else SendInProgress), and sends in its place should it fail.
        """
        phone = parse_phone(phone_number)
        key = _key_id(idempotency_key)
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
        if test_code is None:
            answered = await self._unless_circuit_open(phone, key)
            if answered is not None:
                return answered
        loop = asyncio.get_running_loop()
        deadline = None if budget is None else loop.time() + budget
        while True:
            sent = await self._send(phone, test_code, key, deadline)
            if sent is not Pending.RUNNING:
                return sent
            # A call with the same key is sending: its answer is this call's too. None: it
            # failed, and the key is free for this call to send.
            assert key is not None  # only a send with a key can be pending
            first = await self._first_answer(phone, key, deadline)
            if first is not None:
                return first

    async def _unless_circuit_open(self, phone: PhoneNumber, key: str | None) -> SendResult | None:
        """None when Interakt may be called. While the circuit breaker keeps it out of reach,
        DeliveryUnavailable before anything is stored or counted; but a repeat of a send that
        answered gets that answer."""
        try:
            self._sender.check_available()
        except DeliveryUnavailable:
            if key is not None:
                async with _store_deadline(self._store_timeout):
                    first = await self._store.first_answer(phone.e164, key)
                if isinstance(first, FirstAnswer):
                    return _answer(first)
            raise
        return None

    async def _send(
        self, phone: PhoneNumber, test_code: str | None, key: str | None, deadline: float | None
    ) -> SendResult | Pending:
        """One try of ``send``: Pending when another send holds ``key``."""
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
                added = await self._store.add_code(
                    phone.e164, digest, send_id, key=key, lease_ms=int(self._key_lease * 1000)
                )
                if not isinstance(added, Stored):
                    return added if added is Pending.RUNNING else _answer(added)
                counted = True
                # A test number's code goes nowhere: it costs nothing of the Interakt account's
                # budget.
                await self._store.count_caller_send(
                    caller, send_id, account=test_code is None, phone=phone.e164, key=key
                )
            store_done = loop.time()
            remaining = self._send_timeout
            if deadline is not None:
                remaining = min(remaining, deadline - store_done)
            if test_code is None:
                delivery = await self._sender.send(phone, code, budget=remaining, reference=send_id)
            else:
                delivery = _test_number_used(phone, "SendOtp")
        except BaseException as exc:
            refused = isinstance(exc, LimitExceeded | InvalidInput)
            if refused:
                # The step that refused changed nothing: only a code the caller's budget (or the
                # key's number) refused is withdrawn.
                stored, counted = counted, False
            elif isinstance(exc, StoreUnreachable) and not counted:
                stored = False  # the code never reached Redis: there is nothing to withdraw
            if stored:
                answered = refused or store_done is not None
                withdrawal = self._store.withdraw(
                    send_id,
                    phone=phone.e164,
                    digest=digest,
                    caller=caller if counted else None,
                    in_doubt=not answered,
                    key=key,
                )
                if answered and not isinstance(exc, asyncio.CancelledError):
                    # Redis is answering: the caller is told once the send is withdrawn, so its
                    # next call finds it gone, within what is left of the one Redis timeout the
                    # send may spend on the store. The rest is left to the background.
                    left = self._store_timeout - ((store_done or loop.time()) - started)
                    await asyncio.wait([withdrawal], timeout=max(left, 0.001))
            raise
        # Sent: from here on nothing withdraws it, not even a cancelled call. The caller is told
        # once it is recorded (so its status shows the message id, and a repeat of its key finds
        # this answer), within one Redis timeout; the rest is left to the background.
        await self._store.record_sent(send_id, phone=phone.e164, delivery=delivery, key=key)
        return _answer(FirstAnswer(added.expires_at_ms, added.resend_after_ms, delivery))

    async def _first_answer(
        self, phone: PhoneNumber, key: str, deadline: float | None
    ) -> SendResult | None:
        """The answer of the send holding ``key``, once it has one; None when that send failed
        (or holds the key past its lease): the key is free.

        Raises SendInProgress when ``deadline`` comes first.
        """
        loop = asyncio.get_running_loop()
        lease_over = loop.time() + self._key_lease
        delay = _FIRST_POLL_SECONDS
        while True:
            async with _store_deadline(self._store_timeout):
                first = await self._store.first_answer(phone.e164, key)
            if first is None:
                return None
            if isinstance(first, FirstAnswer):
                return _answer(first)
            now = loop.time()
            if deadline is not None and now + delay >= deadline - _ANSWER_MARGIN_SECONDS:
                raise SendInProgress(
                    "idempotency_key: a send with this key is still running; retry with the "
                    "same key to get its answer",
                    retry_after=1.0,
                )
            if now >= lease_over:
                return None
            await asyncio.sleep(delay)
            delay = min(delay * 2, _LAST_POLL_SECONDS)

    async def status(self, phone_number: str) -> OtpStatus:
        """What became of the number's latest code. Raises InvalidInput, NotFound."""
        phone = parse_phone(phone_number)
        status = await self._store.status(phone.e164)
        if status is None:
            raise NotFound(
                "phone_number: no code of this number is live: none was sent, or it expired"
            )
        return status

    async def report_delivery(self, report: DeliveryReport) -> ReportOutcome:
        """Apply one of Interakt's delivery reports. Raises StoreUnavailable."""
        return await self._store.report_delivery(report)

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


def _key_id(idempotency_key: str) -> str | None:
    """The store's id of the calling service's idempotency key; None without a key.

    Keys are the caller's own: two services' equal keys are two keys.
    """
    if not idempotency_key:
        return None
    if len(idempotency_key) > MAX_IDEMPOTENCY_KEY_LENGTH:
        raise InvalidInput(
            "idempotency_key", f"must be at most {MAX_IDEMPOTENCY_KEY_LENGTH} characters"
        )
    if not (idempotency_key.isascii() and idempotency_key.isprintable()):
        raise InvalidInput("idempotency_key", "must be printable ASCII characters")
    scoped = f"{context.caller.get()}\n{idempotency_key}".encode()
    return hashlib.sha256(scoped).hexdigest()[:_DIGEST_HEX_CHARS]


def _answer(sent: FirstAnswer) -> SendResult:
    return SendResult(
        expires_at_ms=sent.expires_at_ms,
        # Whole seconds, rounded up: a resend after this many seconds is not refused.
        resend_after_seconds=-(-sent.resend_after_ms // 1000),
        delivery=sent.delivery,
    )


_TEST_DELIVERY = Delivery(Channel.TEST, "")


def _test_number_used(phone: PhoneNumber, rpc: str) -> Delivery:
    """Log and count a call for a test number: one in production is worth noticing.

    In full: test numbers are configuration, not a user's number, and an operator must see
    which one is used. The metric's ``number`` label is bounded by the configured set.
    """
    log.warning(
        "test number %s used by %s: its code is fixed and never sent",
        phone.e164,
        rpc,
        extra={"event": "test_number_used"},
    )
    metrics.child(metrics.TEST_NUMBER_USES, rpc, phone.e164).inc()
    return _TEST_DELIVERY
