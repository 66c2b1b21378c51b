"""The OTP rules: make a code, keep only its keyed digest, deliver it, check what the user typed."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import hmac
import logging
import secrets
from collections.abc import AsyncIterator, Mapping

from otp_service import context, metrics
from otp_service.errors import (
    DeliveryInDoubt,
    DeliveryRefused,
    DeliveryUnavailable,
    InvalidInput,
    LimitExceeded,
    NotAllowed,
    NotFound,
    SendInProgress,
    StoreUnavailable,
    StoreUnreachable,
)
from otp_service.languages import check_locale
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
from otp_service.sender import MAX_RETRIES, Attempts, Sender
from otp_service.store import (
    STORE_UNAVAILABLE,
    FirstAnswer,
    InDoubt,
    Pending,
    Store,
    Stored,
)

log = logging.getLogger(__name__)

# 128 bits of HMAC-SHA256 identify a code; more would only cost Redis memory.
_DIGEST_HEX_CHARS = 32
MAX_IDEMPOTENCY_KEY_LENGTH = 128
# A repeat of an idempotent send asks for the first send's answer after these waits (doubling),
# and gives up this long before its deadline, to answer SendInProgress in time.
_FIRST_POLL_SECONDS = 0.02
_LAST_POLL_SECONDS = 0.2
_ANSWER_MARGIN_SECONDS = 0.05
# Kept out of a send's delivery budget when the caller's deadline sets it (this, or a quarter of
# the time left if less): the Redis work its answer needs (the record of what Interakt did, or
# the withdrawal), so the caller is answered before its deadline, never by gRPC's
# DEADLINE_EXCEEDED. A Redis answering within it is the common case; one that does not is left
# to the background, and the caller answered at the deadline less _ANSWER_MARGIN_SECONDS.
_ANSWER_RESERVE_SECONDS = 0.2


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
        status_readers: frozenset[str] = frozenset(),
        previous_secret: bytes | None = None,
    ) -> None:
        self._store = store
        self._sender = sender
        self._secret = secret
        # OTP_SECRET_PREVIOUS: codes made under it still verify (a rotation's live codes).
        self._previous_secret = previous_secret
        self._code_length = code_length
        self._store_timeout = store_timeout_seconds
        self._send_timeout = send_timeout_seconds
        self._allowed_countries = allowed_countries
        # E.164 number -> its fixed code (OTP_TEST_NUMBERS).
        self._test_numbers = dict(test_numbers or {})
        # Callers that may read the status of any caller's sends (OTP_STATUS_READERS).
        self._status_readers = status_readers
        # A send answers within this: its store calls, its delivery and the record of its
        # answer. A send that claimed an idempotency key longer ago and never answered is gone
        # (its process died), and a repeat sends in its place.
        self._key_lease = send_timeout_seconds + 2 * store_timeout_seconds + 1.0

    async def send(
        self,
        phone_number: str,
        *,
        budget: float | None = None,
        idempotency_key: str = "",
        locale: str = "",
    ) -> SendResult:
        """Store a new code for the number and deliver it within ``budget`` seconds.

        Takes at most one Redis timeout plus the delivery budget, and one Redis timeout more for
        what the answer needs in Redis; with ``budget``, answers before it (the delivery leaves
        out the time for that Redis work). Raises InvalidInput, NotAllowed, LimitExceeded,
        DeliveryRefused, DeliveryUnavailable (DeliveryInDoubt: the message may arrive) or
        StoreUnavailable. What a send that fails leaves, however it fails (a cancelled call
        too), once Redis answers (README "The rules"): nothing when it never reached Interakt;
        no code but its counts when Interakt answered without taking it; its code and counts
        when it is in doubt.

        With ``idempotency_key``, a repeat of a send that answered gets that answer again and
        sends nothing (one that ended in doubt: DeliveryInDoubt again); one that arrives while
        that send runs waits for its answer (within ``budget``: else SendInProgress), and sends
        in its place should it fail.

        ``locale`` (BCP 47, optional) chooses the template's language.
        """
        phone = parse_phone(phone_number)
        key = _key_id(idempotency_key)
        check_locale(locale)
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
            sent = await self._send(phone, test_code, key, deadline, locale)
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
                if isinstance(first, InDoubt):
                    raise _in_doubt(first.resend_after_ms / 1000) from None
            raise
        return None

    async def _send(
        self,
        phone: PhoneNumber,
        test_code: str | None,
        key: str | None,
        deadline: float | None,
        locale: str,
    ) -> SendResult | Pending:
        """One try of ``send``: Pending when another send holds ``key``."""
        code = test_code or "".join(secrets.choice("0123456789") for _ in range(self._code_length))
        digest = self._digest(phone.e164, code)
        send_id = secrets.token_hex(8)
        caller = context.caller.get()
        loop = asyncio.get_running_loop()
        started = loop.time()
        # How far the send got, for what a failure must withdraw: each store step that may have
        # run (it did, or its answer never came), when the store was done with, and how far
        # its requests to Interakt got.
        stored = counted = False
        store_done: float | None = None
        attempts = Attempts()
        try:
            # Stored before it is sent, so a code is never in a user's hands without being in
            # Redis. The number's limits are checked first: they refuse far more often than the
            # caller's budget, and then nothing needs undoing. Both calls share one Redis
            # timeout, so a slow Redis cannot hold the caller for more than that before delivery.
            async with _store_deadline(self._store_timeout):
                stored = True
                added = await self._store.add_code(
                    phone.e164,
                    digest,
                    send_id,
                    key=key,
                    lease_ms=int(self._key_lease * 1000),
                    caller=caller,
                )
                if isinstance(added, InDoubt):
                    raise _in_doubt(added.resend_after_ms / 1000)
                if not isinstance(added, Stored):
                    return added if added is Pending.RUNNING else _answer(added)
                counted = True
                # A test number's code goes nowhere: it costs nothing of the Interakt account's
                # budget.
                await self._store.count_caller_send(
                    caller, send_id, account=test_code is None, phone=phone.e164, key=key
                )
            store_done = loop.time()
            if test_code is None:
                budget = self._send_timeout
                if deadline is not None:
                    left = deadline - store_done
                    caller_budget = left - min(_ANSWER_RESERVE_SECONDS, left / 4)
                    attempts.caller_bound = caller_budget < budget
                    budget = min(budget, caller_budget)
                attempts.admit = functools.partial(self._admit, caller, send_id, deadline)
                delivery = await self._sender.send(
                    phone, code, budget=budget, reference=send_id, attempts=attempts, locale=locale
                )
            else:
                delivery = _test_number_used(phone, "SendOtp")
        except BaseException as exc:
            if isinstance(exc, LimitExceeded | InvalidInput | DeliveryInDoubt) and not counted:
                # The store refused (or answered a repeat of a send in doubt): nothing changed.
                raise
            # The step that refused, or that never reached Redis, changed nothing: only a code
            # the caller's budget (or the key's number) refused is withdrawn.
            unchanged = isinstance(exc, LimitExceeded | InvalidInput | StoreUnreachable)
            if unchanged and store_done is None:
                stored, counted = counted, False
            if stored:
                work = self._after_failure(
                    exc,
                    send_id,
                    phone,
                    digest,
                    key,
                    caller if counted else None,
                    attempts,
                    answered=unchanged or store_done is not None,
                )
                if not isinstance(exc, asyncio.CancelledError):
                    # Redis is answering: the caller is told once it is done, so its next call
                    # finds it done, within what is left of the one Redis timeout the send may
                    # spend on the store, and of the caller's deadline. The rest is left to the
                    # background.
                    await asyncio.wait([work], timeout=self._left(started, store_done, deadline))
                if isinstance(exc, DeliveryInDoubt) and isinstance(added, Stored):
                    # The code may be on its way: a new one is worth asking for only once the
                    # number may be sent one.
                    exc.retry_after = max(exc.retry_after or 0.0, added.resend_after_ms / 1000)
            raise
        # Sent: from here on nothing withdraws it, not even a cancelled call. The caller is told
        # once it is recorded (so its status shows the message id, and a repeat of its key finds
        # this answer), within one Redis timeout and the caller's deadline; the rest is left to
        # the background.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._left(started, store_done, deadline, whole=True)):
                await self._store.record_sent(send_id, phone=phone.e164, delivery=delivery, key=key)
        metrics.count_code_sent(caller, self._country(phone))
        return _answer(FirstAnswer(added.expires_at_ms, added.resend_after_ms, delivery))

    def _after_failure(
        self,
        exc: BaseException,
        send_id: str,
        phone: PhoneNumber,
        digest: str,
        key: str | None,
        caller: str | None,
        attempts: Attempts,
        *,
        answered: bool,
    ) -> asyncio.Future[None]:
        """What a failed send leaves (README "Faults"), done in the background: a send that may
        have reached Interakt without its answer keeps its code (in doubt); one Interakt
        answered without taking it loses its code but stays counted; one that never reached
        Interakt is withdrawn whole."""
        refused = isinstance(exc, DeliveryRefused)
        if attempts.in_doubt and not refused:
            if not isinstance(exc, DeliveryInDoubt | asyncio.CancelledError):
                log.warning(
                    "send in doubt after %r: its code stays", exc, extra={"event": "send_in_doubt"}
                )
            return self._store.record_in_doubt(
                send_id, phone=phone.e164, channel=attempts.channel or Channel.TEMPLATE, key=key
            )
        return self._store.withdraw(
            send_id,
            phone=phone.e164,
            digest=digest,
            caller=caller,
            in_doubt=not answered,
            reached=attempts.reached,
            refused=refused,
            requests=MAX_RETRIES + 1,
            key=key,
        )

    def _left(
        self,
        started: float,
        store_done: float | None,
        deadline: float | None,
        *,
        whole: bool = False,
    ) -> float:
        """How long the send may still wait for Redis: what is left of its one Redis timeout
        (a whole one, after delivery), and of the caller's deadline."""
        now = asyncio.get_running_loop().time()
        left = self._store_timeout
        if not whole:
            left -= (store_done or now) - started
        if deadline is not None:
            left = min(left, deadline - now - _ANSWER_MARGIN_SECONDS)
        return max(left, 0.001)

    async def _admit(self, caller: str, send_id: str, deadline: float | None, request: int) -> None:
        """Count retry ``request`` of a send against the send budgets (Attempts.admit)."""
        seconds = self._store_timeout
        if deadline is not None:
            seconds = min(seconds, deadline - asyncio.get_running_loop().time())
        async with _store_deadline(max(seconds, 0.001)):
            await self._store.count_caller_send(caller, send_id, request=request)

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
            if isinstance(first, InDoubt):
                raise _in_doubt(first.resend_after_ms / 1000)
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
        """What became of the number's latest code. Raises InvalidInput, NotFound.

        Only for the calling service that sent it (or one of OTP_STATUS_READERS): to any other,
        a number with a live code is NotFound like one without, so a caller learns nothing of
        another's users (SECURITY.md).
        """
        phone = parse_phone(phone_number)
        found = await self._store.status(phone.e164)
        if found is None or not self._may_read(found[1]):
            raise NotFound(
                "phone_number: no code of this number is live: none was sent, or it expired"
            )
        return found[0]

    def _may_read(self, sent_by: str) -> bool:
        caller = context.caller.get()
        return caller == sent_by or caller in self._status_readers

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
        digest = self._digest(phone.e164, otp_code)
        if self._previous_secret is None:
            result = await self._store.verify(phone.e164, digest)
        else:
            # One call still: the attempt is counted once, whichever secret made the code.
            previous = self._digest(phone.e164, otp_code, self._previous_secret)
            result = await self._store.verify(phone.e164, digest, previous)
        metrics.count_verify(context.caller.get(), self._country(phone), result.outcome.name)
        return result

    def _country(self, phone: PhoneNumber) -> str:
        """The number's calling code as a metric label: one of OTP_ALLOWED_COUNTRIES, or
        "other" (a verify is not refused for its country), so the label set stays bounded."""
        code = phone.country_code[1:]
        return code if code in self._allowed_countries else "other"

    def _digest(self, phone: str, code: str, secret: bytes | None = None) -> str:
        # Keyed by the number too, so equal codes of two numbers never share a digest.
        # hmac.digest: the one-shot C path, with no HMAC object per call (every login runs this).
        mac = hmac.digest(secret or self._secret, f"{phone}:{code}".encode(), "sha256")
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


def _in_doubt(resend_after_seconds: float) -> DeliveryInDoubt:
    """What a repeat of a send that ended in doubt is answered (and sends nothing)."""
    return DeliveryInDoubt(
        "idempotency_key: the send with this key was handed to the message provider without "
        "its answer: the message may still arrive, and its code stays valid until it expires; "
        "nothing more was sent",
        retry_after=max(resend_after_seconds, 1.0),
    )


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
