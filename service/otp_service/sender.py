"""Delivery of codes: Interakt's WhatsApp message API, or the log in development mode."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import random
import secrets
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, Protocol

import aiohttp

from otp_service import metrics
from otp_service.breaker import CircuitBreaker
from otp_service.errors import (
    CircuitOpen,
    DeliveryInDoubt,
    DeliveryRefused,
    DeliveryUnavailable,
    ErrorReason,
    LimitExceeded,
    Unavailable,
)
from otp_service.key_file import KeyFile
from otp_service.languages import TemplateLanguages
from otp_service.phone import PhoneNumber
from otp_service.results import Channel, Delivery

log = logging.getLogger(__name__)

# Transient upstream trouble (429, 5xx, timeouts) is retried this many times more, with
# exponential backoff, as long as the caller's deadline leaves room.
MAX_RETRIES = 2
BACKOFF_BASE_SECONDS = 0.2
# The longest Retry-After believed: a longer one (400 nines, a date years ahead) is the upstream's
# mistake, and the caller is told to wait this long instead.
MAX_RETRY_AFTER_SECONDS = 3600.0

# Interakt's known refusals (docs/interakt.md): the substring of its message, the reason a calling
# program acts on, and what the caller is told. Matching is on a substring because the template
# refusal embeds the template's name.
_NOT_A_CONTACT = "Customer is not available for the organization"
_OUTSIDE_24H = "Customer has not messaged within last 24 hours"
_BAD_TOKEN = "Invalid token provided"  # noqa: S105 - an error message, not a token
_NO_TEMPLATE = "No approved template found"
# Meta's 131008 and 132000: the template's parameters (its OTP button's) do not match the send.
_BUTTON_PARAMETER = "requires a parameter"
_PARAMETER_COUNT = "Number of parameters does not match"
# Not Interakt's words but ours, for a 3xx (see _post): the same path as its refusals.
_REDIRECTED = "a redirect, not followed"
_REFUSALS = {
    _NOT_A_CONTACT: (
        ErrorReason.RECIPIENT_NOT_A_CONTACT,
        "the number is not a contact of the WhatsApp business account",
    ),
    _OUTSIDE_24H: (
        ErrorReason.OUTSIDE_24_HOUR_WINDOW,
        "the user has not messaged the business in the last 24 hours and no template is "
        "configured (set INTERAKT_TEMPLATE_NAME)",
    ),
    _BAD_TOKEN: (
        ErrorReason.PROVIDER_KEY_REJECTED,
        "the message provider rejected the service's credentials (operator: check "
        "INTERAKT_API_KEY)",
    ),
    _NO_TEMPLATE: (
        ErrorReason.TEMPLATE_NOT_APPROVED,
        "the configured WhatsApp template is not approved or not synced (operator: check "
        "INTERAKT_TEMPLATE_NAME and INTERAKT_TEMPLATE_LANGUAGE)",
    ),
    _BUTTON_PARAMETER: (
        ErrorReason.TEMPLATE_NOT_APPROVED,
        "the configured WhatsApp template has an OTP button and the code was not sent for it "
        "(operator: INTERAKT_TEMPLATE_BUTTON must be true for an authentication template)",
    ),
    _PARAMETER_COUNT: (
        ErrorReason.TEMPLATE_NOT_APPROVED,
        "the configured WhatsApp template does not take the parameters sent (operator: an "
        "authentication template has a code button, INTERAKT_TEMPLATE_BUTTON=true; an old "
        "template without one, INTERAKT_TEMPLATE_BUTTON=false)",
    ),
    # A misconfiguration as lasting as a rejected key, but not Interakt's refusal.
    _REDIRECTED: (
        ErrorReason.PROVIDER_REFUSED,
        "INTERAKT_BASE_URL is misconfigured: it answers with a redirect, and redirects are not "
        "followed (operator: point it at Interakt's API itself)",
    ),
}


@dataclass(eq=False)
class Attempts:
    """A send's requests to Interakt: what the domain allows, and how far they got.

    The domain reads it when the send fails (even when its call is cancelled) to know what the
    failure leaves: a send none of whose requests reached Interakt is given back whole; one
    that Interakt answered without taking the message counts against the limits; one whose
    request may have reached Interakt without an answer is in doubt (its code stays).
    """

    # The budget is the caller's deadline, shorter than the service's own: a timeout is then
    # the caller's doing, and says nothing of Interakt's health.
    caller_bound: bool = False
    # Counts request n (2, 3, ...) against the send budgets before it is made; raises
    # LimitExceeded or StoreUnavailable, and the retry is not made. None: retries are free.
    admit: Callable[[int], Awaitable[None]] | None = None
    channel: Channel | None = None  # what the requests carry, once the sender chose it
    reached: bool = False  # a request reached Interakt, or may have (its bytes were written)
    # Such a request ended (or was cut off) without Interakt's answer: the message may arrive.
    in_doubt: bool = False
    in_flight: bool = False  # a request is written and its answer not yet read
    made: int = 0  # requests made (or begun): the first is counted with the send itself


class Sender(Protocol):
    """Hands a code to the user."""

    def check_available(self) -> None:
        """Raise DeliveryUnavailable (CircuitOpen) when a send now would not be attempted."""

    async def send(
        self,
        phone: PhoneNumber,
        code: str,
        *,
        budget: float,
        reference: str,
        attempts: Attempts | None = None,
        locale: str = "",
    ) -> Delivery:
        """Deliver ``code`` within ``budget`` seconds, retries included.

        ``reference`` comes back in the provider's delivery reports on the message.
        ``attempts`` is kept up to date with how far the requests got. ``locale`` (BCP 47,
        checked) is the user's language, if the caller knows it.
        Raises DeliveryRefused, DeliveryInDoubt (a request may have reached Interakt, its
        answer did not come) or DeliveryUnavailable (none did: nothing went out).
        """

    async def close(self) -> None:
        """Release connections."""


class _Refused(Exception):
    """Interakt answered ``result: false``; carries its message for the fallback decision."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class _Transient(Exception):
    """A failure worth retrying; ``retry_after`` is the upstream's hint, if any.

    ``result`` is the metrics label: one of a few fixed words, unlike ``reason``.
    """

    def __init__(self, result: str, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.result = result
        self.reason = reason
        self.retry_after = retry_after


class _NotAdmitted(Exception):
    """The send budgets refused a retry (LimitExceeded), or Redis did not count it: not made."""

    def __init__(self, cause: LimitExceeded | Unavailable) -> None:
        super().__init__(cause.message)
        self.retry_after = cause.retry_after


async def _admitted(admit: Callable[[int], Awaitable[None]], request: int) -> None:
    try:
        await admit(request)
    except (LimitExceeded, Unavailable) as refused:
        raise _NotAdmitted(refused) from refused


class InteraktSender:
    """Sends codes with Interakt's message API over one long-lived aiohttp session, behind
    ``breaker``."""

    def __init__(
        self,
        *,
        api_key: str,
        base_url: str,
        brand: str,
        ttl_seconds: int,
        template_name: str | None,
        languages: TemplateLanguages,
        template_button: bool = True,
        breaker: CircuitBreaker,
        api_key_file: KeyFile | None = None,
    ) -> None:
        self._url = f"{base_url}/message/"
        # The key is already base64 per the contract; it is only ever placed in this header.
        self._headers = {"Authorization": f"Basic {api_key}", "Content-Type": "application/json"}
        # INTERAKT_API_KEY_FILE: the key as the file says now (rotated without a restart).
        self._api_key, self._api_key_file = api_key, api_key_file
        # Split around the code rather than a format string: a brand with braces stays text.
        self._text_before = f"Your OTP for {brand} is "
        self._text_after = (
            f". Valid for {_lifetime(ttl_seconds)}. Do not share this code with anyone."
        )
        self._template_name = template_name
        self._languages = languages
        self._template_button = template_button
        # Languages whose missing translation was logged: once each, not once a send.
        self._untranslated_logged: set[str] = set()
        self._breaker = breaker
        self._session: aiohttp.ClientSession | None = None

    def check_available(self) -> None:
        self._breaker.check()

    async def send(
        self,
        phone: PhoneNumber,
        code: str,
        *,
        budget: float,
        reference: str,
        attempts: Attempts | None = None,
        locale: str = "",
    ) -> Delivery:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + budget
        # A template whenever one is configured: it reaches every user, while Text reaches only
        # users inside WhatsApp's 24-hour window. So a Text refused for that window never has a
        # template to fall back to; the refusal tells the operator to configure one.
        channel = Channel.TEMPLATE if self._template_name else Channel.TEXT
        attempts = attempts or Attempts()
        attempts.channel = channel
        language = self._languages.choose(phone, locale) if self._template_name else ""
        try:
            try:
                return await self._send_in(
                    phone, code, channel, language, reference, deadline, attempts
                )
            except _Refused as exc:
                # Each language of a template is approved on its own: one without an approved
                # translation gets the default language instead, once, within the same deadline.
                default = self._languages.default
                if not (_NO_TEMPLATE in exc.message and language and language != default):
                    raise
                self._untranslated(language)
                if attempts.admit is not None:
                    # Another request: the send budgets count it first, as any retry.
                    try:
                        await _admitted(attempts.admit, attempts.made + 1)
                    except _NotAdmitted:
                        raise exc from None
                return await self._send_in(
                    phone, code, channel, default, reference, deadline, attempts
                )
        except _Refused as exc:
            raise _refusal(exc) from exc

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def _send_in(
        self,
        phone: PhoneNumber,
        code: str,
        channel: Channel,
        language: str,
        reference: str,
        deadline: float,
        attempts: Attempts,
    ) -> Delivery:
        """One send of ``code`` in ``language`` (a template's; "" for Text), retries included."""
        body = self._body(phone, code, channel, language)
        # Interakt echoes it in its delivery reports, as callback_data: a report that arrives
        # before the answer to this request is recorded still finds its message by it.
        body["callbackData"] = reference
        delivery = await self._send_with_retries(body, channel, deadline, attempts)
        log.info(
            "interakt queued message %s (%s%s)",
            delivery.message_id,
            channel.name.lower(),
            f", language {language}" if language else "",
            extra={"event": "interakt_queued", "language": language},
        )
        return dataclasses.replace(delivery, language=language)

    def _untranslated(self, language: str) -> None:
        """Count a send whose template is not approved in ``language``; log it once."""
        label = language if language in self._languages.configured else "other"
        metrics.child(metrics.TEMPLATE_LANGUAGE_FALLBACKS, label).inc()
        if language not in self._untranslated_logged:
            self._untranslated_logged.add(language)
            log.warning(
                "template %s has no approved translation in %s: sends in it go out in %s "
                "(logged once; otp_template_language_fallbacks_total counts them)",
                self._template_name,
                language,
                self._languages.default,
                extra={"event": "template_language_missing", "language": language},
            )

    async def _send_with_retries(
        self, body: dict[str, Any], channel: Channel, deadline: float, attempts: Attempts
    ) -> Delivery:
        loop = asyncio.get_running_loop()
        label = channel.name.lower()
        # A timeout is Interakt's failure only when the service's own budget ran out; the
        # caller's shorter deadline running out says nothing of Interakt.
        failed = _caller_cut_short if attempts.caller_bound else _upstream_failed
        last: _Transient | None = None  # the previous request's failure
        delay = 0.0
        for attempt in range(MAX_RETRIES + 1):
            started = loop.time()
            try:
                # Each request is one call through the breaker: a retry of a send it opened on
                # is refused there (CircuitOpen), not made nor counted.
                with self._breaker.call(failed):
                    if last is not None and attempts.admit is not None:
                        # A retry is a request like any other: the send budgets count it first.
                        await _admitted(attempts.admit, attempts.made + 1)
                    attempts.made += 1
                    message_id = await self._post(body, deadline - started, attempts)
                metrics.count_send(label, "accepted", loop.time() - started)
                return Delivery(channel, message_id)
            except _Refused:
                metrics.count_send(label, "refused", loop.time() - started)
                raise
            except (CircuitOpen, _NotAdmitted) as exc:
                if last is None or not (attempts.in_doubt or isinstance(exc, _NotAdmitted)):
                    raise
                # A retry not made: the send ends as its last request did (in doubt, should an
                # earlier one still deliver its message).
                wait = max(delay, 1.0, exc.retry_after or 0.0)
                raise _unavailable(last, attempts, wait) from exc
            except _Transient as exc:
                metrics.count_send(label, exc.result, loop.time() - started)
                jitter = random.uniform(1, 1.5)  # noqa: S311 - not a secret
                delay = exc.retry_after or BACKOFF_BASE_SECONDS * 2**attempt * jitter
                if attempt == MAX_RETRIES or loop.time() + delay >= deadline - 0.05:
                    raise _unavailable(exc, attempts, max(delay, 1.0)) from exc
                log.warning(
                    "interakt transient failure, retrying",
                    extra={"event": "interakt_retry", "reason": exc.reason},
                )
                last = exc
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _post(self, body: dict[str, Any], seconds: float, attempts: Attempts) -> str:
        """One request: the message id, or _Refused / _Transient. ``attempts`` learns when its
        bytes are written (it may reach Interakt) and when it is answered."""
        if seconds <= 0:
            raise _Transient("timeout", "deadline exceeded")
        if self._api_key_file is not None and self._api_key_file.current() != self._api_key:
            self._api_key = self._api_key_file.current()
            self._headers = {**self._headers, "Authorization": f"Basic {self._api_key}"}
        try:
            with _upstream_errors():
                async with self._client().post(
                    self._url,
                    json=body,
                    headers=self._headers,
                    # Never rounded up to a whole second (aiohttp's default from 5 s on): the
                    # answer to the caller must come before its deadline.
                    timeout=aiohttp.ClientTimeout(total=seconds, ceil_threshold=math.inf),
                    allow_redirects=False,
                    trace_request_ctx=attempts,
                ) as response:
                    if response.status < 200 or response.status >= 300:
                        # Whatever its body, Interakt did not take the message.
                        attempts.in_flight = False
                    if 300 <= response.status < 400:
                        # Never followed: a 307 or 308 would post the code to wherever it
                        # points, and what a 301 or 302 leads to (a GET) says nothing about the
                        # message.
                        raise _Refused(f"HTTP {response.status}, {_REDIRECTED}")
                    if response.status == 429:
                        hint = _retry_after(response.headers.get("Retry-After"))
                        raise _Transient("rate_limited", "rate limited", hint)
                    if response.status >= 500:
                        raise _Transient("server_error", f"HTTP {response.status}")
                    try:
                        answer = await response.json(content_type=None)
                    except ValueError as exc:
                        # A 4xx page that is not Interakt's JSON (a wrong INTERAKT_BASE_URL,
                        # say) will not get better by retrying; the contract lists only 429 and
                        # 5xx.
                        if response.status >= 400:
                            raise _Refused(f"HTTP {response.status}, body not JSON") from exc
                        raise _Transient(
                            "bad_answer", f"HTTP {response.status}, body not JSON"
                        ) from exc
                    # A 2xx whose body was read: an answer, whatever it says.
                    attempts.in_flight = False
        finally:
            # Written and never answered (a timeout, a dropped connection, a cancelled call
            # while the message was in Interakt's hands).
            if attempts.in_flight:
                attempts.in_flight = False
                attempts.in_doubt = True
        if not isinstance(answer, dict):
            raise _Transient("bad_answer", f"HTTP {response.status} with an unexpected body")
        if answer.get("result") is True and response.status < 300:
            return str(answer.get("id", ""))
        raise _Refused(str(answer.get("message", f"HTTP {response.status}")))

    def _body(
        self, phone: PhoneNumber, code: str, channel: Channel, language: str
    ) -> dict[str, Any]:
        body: dict[str, Any] = {
            "countryCode": phone.country_code,
            "phoneNumber": phone.national_number,
        }
        if channel is Channel.TEMPLATE:
            body["type"] = "Template"
            body["template"] = {
                "name": self._template_name,
                "languageCode": language,
                "bodyValues": [code],
            }
            if self._template_button:
                # An authentication template's OTP button (copy code, one-tap) is at index 0 and
                # carries the code too; without it Meta refuses the message (131008).
                body["template"]["buttonValues"] = {"0": [code]}
        else:
            body["type"] = "Text"
            body["data"] = {"message": f"{self._text_before}{code}{self._text_after}"}
        return body

    def _client(self) -> aiohttp.ClientSession:
        # Created on first use so it binds to the running loop; kept for the process' life.
        if self._session is None:
            written = aiohttp.TraceConfig()
            written.on_request_headers_sent.append(_written)
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=100, ttl_dns_cache=300),
                trace_configs=[written],
            )
        return self._session


class LogSender:
    """Development mode: writes the code to the log instead of sending it."""

    def check_available(self) -> None:
        return None

    async def send(
        self,
        phone: PhoneNumber,
        code: str,
        *,
        budget: float,
        reference: str,
        attempts: Attempts | None = None,
        locale: str = "",
    ) -> Delivery:
        log.warning(
            "DEV MODE, NOT SENT: code for %s is %s", phone.e164, code, extra={"event": "dev_code"}
        )
        metrics.count_send("log", "accepted")
        # A message id as Interakt gives one, so that a report (`otp-service dev report`) can
        # find the message.
        return Delivery(Channel.LOG, f"dev-{secrets.token_hex(8)}")

    async def close(self) -> None:
        return None


def _upstream_failed(exc: BaseException) -> bool | None:
    """Whether ``exc`` says the upstream failed (the breaker counts it): a timeout, a connection
    error, a 5xx or an answer that is not Interakt's. A refusal or a 429 is an upstream that
    answers: it is alive. A request not made says nothing (None)."""
    if isinstance(exc, _NotAdmitted):
        return None
    return isinstance(exc, _Transient) and exc.result != "rate_limited"


def _caller_cut_short(exc: BaseException) -> bool | None:
    """``_upstream_failed`` for a request whose time was the caller's: its timeout says
    nothing (None)."""
    if isinstance(exc, _Transient) and exc.result == "timeout":
        return None
    return _upstream_failed(exc)


async def _written(
    session: aiohttp.ClientSession, context: Any, params: aiohttp.TraceRequestHeadersSentParams
) -> None:
    """The request's headers are on their way: from now on it may reach Interakt."""
    attempts = context.trace_request_ctx
    if isinstance(attempts, Attempts):
        attempts.reached = attempts.in_flight = True


def _unavailable(exc: _Transient, attempts: Attempts, retry_after: float) -> DeliveryUnavailable:
    """The error a send that got no acceptance ends with: in doubt when a request may have
    reached Interakt without an answer, else unavailable (nothing went out)."""
    if attempts.in_doubt:
        return DeliveryInDoubt(
            f"the message provider did not answer in time ({exc.reason}): the message may "
            "still arrive, and its code stays valid until it expires; retry with the same "
            "idempotency key, or ask for a new code after the retry delay",
            retry_after=retry_after,
        )
    return DeliveryUnavailable(
        f"the message provider is unavailable ({exc.reason}), try again shortly",
        retry_after=retry_after,
    )


@contextlib.contextmanager
def _upstream_errors() -> Iterator[None]:
    """Translate transport failures at the I/O edge into _Transient."""
    try:
        yield
    except TimeoutError as exc:
        raise _Transient("timeout", "timed out") from exc
    except aiohttp.ClientError as exc:
        raise _Transient("connection_error", type(exc).__name__) from exc


def _refusal(exc: _Refused) -> DeliveryRefused:
    upstream = exc.message[:200]
    details = {"provider_message": upstream}
    for needle, (reason, text) in _REFUSALS.items():
        if needle in upstream:
            return DeliveryRefused(
                reason, f"message not sent: {text} (Interakt: {upstream!r})", details
            )
    return DeliveryRefused(
        ErrorReason.PROVIDER_REFUSED,
        f"message not sent: Interakt refused it ({upstream!r})",
        details,
    )


def _retry_after(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After value, at most MAX_RETRY_AFTER_SECONDS; None when
    there is none or it is neither form RFC 9110 allows (whole seconds, or an HTTP date)."""
    if value is None:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        # Ten digits are centuries already; more are not converted (400 nines make a float inf).
        seconds = float(value) if len(value) <= 10 else MAX_RETRY_AFTER_SECONDS
    else:
        try:
            when = parsedate_to_datetime(value)
        except (ValueError, TypeError, OverflowError):  # garbage, or numbers too big for a date
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)  # an HTTP date is always GMT
        seconds = (when - datetime.now(UTC)).total_seconds()
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_SECONDS)


def _lifetime(ttl_seconds: int) -> str:
    if ttl_seconds % 60 == 0:
        minutes = ttl_seconds // 60
        return f"{minutes} minute{'s' if minutes != 1 else ''}"
    return f"{ttl_seconds} seconds"
