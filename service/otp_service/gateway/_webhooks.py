"""POST /webhooks/interakt: Interakt's delivery reports, checked, acknowledged, then applied.

Interakt posts a report for each step of a message (sent, delivered, read, failed), signed with
the secret both sides know: ``Interakt-Signature: sha256=<hex HMAC-SHA256 of the raw body>``,
checked here in constant time over the bytes received. Not with a caller token: Interakt has
none. An unsigned or wrongly signed request is 401 and changes nothing.

Interakt wants a 200 within 3 seconds, and five failures in a short span disable the webhook
until someone turns it back on. So a report is answered as soon as it is checked and queued,
and applied in Redis afterwards by a few workers: a slow Redis never slows the answer.

What "never lost once answered 200" means here. A queued report lives in this process' memory
until Redis has taken it; while Redis is down it is retried, for as long as its code could live
(OTP_TTL_SECONDS: after that it would apply to nothing). The queue is bounded: once it is full,
a report is answered 503, not taken: Interakt counts a failure and may send it again (five
failures disable the webhook: an operator must then turn it back on). On shutdown the queue is
drained within the grace period; only if Redis stays down for all of it are the
reports still waiting lost, and an ERROR says how many. A process killed outright loses what
is queued, which is next to nothing while Redis answers. Refusing (non-200) every report
whenever Redis is slow was the alternative: it loses nothing in memory, but five refusals turn
the webhook off and lose every report after them, so a short Redis outage would cost far more.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError

from otp_service import context, metrics
from otp_service.errors import InvalidInput, StoreUnavailable
from otp_service.failures import failure_of
from otp_service.gateway._body import parse_json
from otp_service.gateway._errors import Refusal, invalid
from otp_service.phone import parse_phone
from otp_service.results import DeliveryReport, DeliveryState, ReportOutcome

log = logging.getLogger(__name__)

WEBHOOK_PATH = "/webhooks/interakt"
SIGNATURE_HEADER = "Interakt-Signature"
# A report carries the customer's traits too: far more than an OTP request, still small.
MAX_REPORT_BYTES = 64 * 1024
# Reports waiting for Redis: a few MB at most. At Interakt's 600 messages a minute and four
# reports each, about four minutes of them.
QUEUE_CAPACITY = 10_000
# Reports applied at once: enough to keep Redis busy, while one retrying does not hold the rest.
WORKERS = 8
# A report Redis did not take is tried again after these waits (doubling).
_RETRY_FIRST_SECONDS = 0.1
_RETRY_LAST_SECONDS = 2.0

# The report types about a message sent through the API, and the state each reports. Any other
# type (campaigns, incoming messages, button clicks) is acknowledged and ignored.
_STATES = {
    "message_api_sent": DeliveryState.SENT,
    "message_api_delivered": DeliveryState.DELIVERED,
    "message_api_read": DeliveryState.READ,
    "message_api_failed": DeliveryState.FAILED,
}
_MAX_ID_CHARS = 256
_MAX_REASON_CHARS = 200

Apply = Callable[[DeliveryReport], Awaitable[ReportOutcome]]


@dataclass(frozen=True, slots=True)
class _Queued:
    report: DeliveryReport
    request_id: str
    received: float  # loop time


class InteraktWebhook:
    """The route, and the bounded queue of accepted reports with the workers that apply them.

    ``apply`` puts one report into Redis (raising StoreUnavailable when it cannot);
    ``keep_seconds`` is how long a report is retried (the code TTL); ``capacity`` bounds the
    queue.
    """

    def __init__(
        self,
        secret: str,
        apply: Apply,
        *,
        keep_seconds: float,
        capacity: int = QUEUE_CAPACITY,
    ) -> None:
        self._secret = secret.encode()
        self._apply = apply
        self._keep = keep_seconds
        self._queue: asyncio.Queue[_Queued] = asyncio.Queue(capacity)
        self._workers: list[asyncio.Task[None]] = []
        # Accepted and not yet done with: in the queue or being applied.
        self._waiting = 0

    def add_route(self, app: web.Application) -> None:
        app.router.add_post(WEBHOOK_PATH, self._receive)

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._workers = [loop.create_task(self._work()) for _ in range(WORKERS)]

    async def close(self, grace: float) -> None:
        """Apply what is queued within ``grace`` seconds; log what Redis did not take."""
        try:
            async with asyncio.timeout(grace):
                await self._queue.join()
        except TimeoutError:
            pass
        # A report a worker is still retrying stays counted as waiting: it is lost too.
        for worker in self._workers:
            worker.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        if self._waiting:
            metrics.count_delivery_report("lost", self._waiting)
            log.error(
                "%d delivery reports answered 200 were not applied: Redis did not take them "
                "before shutdown",
                self._waiting,
                extra={"event": "delivery_reports_lost", "count": self._waiting},
            )
            self._waiting = 0
            metrics.DELIVERY_REPORTS_WAITING.set(0)

    async def _receive(self, request: web.Request) -> web.Response:
        body = await _read(request)
        if not self._signed(body, request.headers.getall(SIGNATURE_HEADER, [])):
            metrics.count_delivery_report("rejected")
            raise Refusal(
                401,
                grpc.StatusCode.UNAUTHENTICATED,
                f"the {SIGNATURE_HEADER} header is missing or does not sign this body",
                "bad_signature",
            )
        found = _reports_from(body)
        reports = [report for report in found if not isinstance(report, str)]
        for ignored in found:
            if isinstance(ignored, str):  # not a report to apply: acknowledged all the same
                metrics.count_delivery_report(ignored)
        if not reports:
            return web.json_response({"status": "ignored"})
        # All of a body's reports or none: a body refused is posted again whole.
        if self._queue.maxsize - self._queue.qsize() < len(reports):
            metrics.count_delivery_report("refused", len(reports))
            raise Refusal(
                503,
                grpc.StatusCode.UNAVAILABLE,
                "too many delivery reports are waiting to be applied; send it again later",
                "queue_full",
                headers={"Retry-After": "10"},
            )
        received = asyncio.get_running_loop().time()
        for report in reports:
            self._queue.put_nowait(_Queued(report, context.request_id.get(), received))
        self._waiting += len(reports)
        metrics.DELIVERY_REPORTS_WAITING.inc(len(reports))
        return web.json_response({"status": "accepted"})

    def _signed(self, body: bytes, signatures: list[str]) -> bool:
        """Whether the one signature header is the HMAC of ``body`` (constant time)."""
        if len(signatures) != 1:
            return False
        expected = b"sha256=" + hmac.new(self._secret, body, hashlib.sha256).hexdigest().encode()
        presented = signatures[0].strip().lower().encode("ascii", "replace")
        return hmac.compare_digest(expected, presented)

    async def _work(self) -> None:
        while True:
            queued = await self._queue.get()
            try:
                await self._apply_one(queued)
                self._waiting -= 1
                metrics.DELIVERY_REPORTS_WAITING.dec()
            finally:
                self._queue.task_done()

    async def _apply_one(self, queued: _Queued) -> None:
        """Apply one report, retrying while Redis is unavailable, until it is done or too old
        to matter (shutdown cancels the retries)."""
        # Its lines carry the request id of the POST that brought it.
        context.request_id.set(queued.request_id)
        report = queued.report
        loop = asyncio.get_running_loop()
        delay = _RETRY_FIRST_SECONDS
        while True:
            try:
                outcome = await self._apply(report)
                break
            except StoreUnavailable as exc:
                if loop.time() - queued.received >= self._keep:
                    metrics.count_delivery_report("lost")
                    log.error(
                        "a delivery report was not applied: Redis was unavailable for as long "
                        "as its code could live (%r)",
                        exc,
                        extra={"event": "delivery_reports_lost", "count": 1},
                    )
                    return
                await asyncio.sleep(delay)
                delay = min(delay * 2, _RETRY_LAST_SECONDS)
            except Exception:
                metrics.count_delivery_report("lost")
                log.exception(
                    "unexpected error while applying a delivery report",
                    extra={"event": "delivery_report_internal_error"},
                )
                return
        metrics.count_delivery_report(outcome.value)
        log.info(
            "delivery report for %s: %s, %s",
            _masked(report.phone),
            report.state.name.lower(),
            outcome.value,
            extra={
                "event": "delivery_report",
                "phone": _masked(report.phone),
                "state": report.state.name.lower(),
                "result": outcome.value,
            },
        )


async def _read(request: web.Request) -> bytes:
    """The raw body (the signature is over it), up to MAX_REPORT_BYTES."""
    try:
        return await request.clone(client_max_size=MAX_REPORT_BYTES).read()
    except web.HTTPRequestEntityTooLarge:
        message = f"the body must be at most {MAX_REPORT_BYTES} bytes"
        raise Refusal(413, grpc.StatusCode.INVALID_ARGUMENT, message, "too_large") from None
    except RequestPayloadError:
        raise invalid(
            "the body could not be read: its framing or content encoding is malformed",
            "unreadable_body",
        ) from None


def _reports_from(body: bytes) -> list[DeliveryReport | str]:
    """The reports a signed body carries: one JSON object, or an array of them (as some
    integrations see Interakt post them), each checked on its own."""
    try:
        payload = parse_json(body)
    except Refusal:
        return [_malformed("not JSON")]
    return [_report_from(each) for each in (payload if isinstance(payload, list) else [payload])]


def _report_from(payload: Any) -> DeliveryReport | str:
    """The report ``payload`` is; else why it is not applied: "ignored" (another type of
    report) or "malformed" (a report of ours that lacks what is needed)."""
    if not isinstance(payload, dict):
        return _malformed("not a JSON object")
    kind = payload.get("type")
    # Any JSON may stand there: a list or an object is not a type of ours (nor hashable).
    state = _STATES.get(kind) if isinstance(kind, str) else None
    if state is None:
        return "ignored"
    data = _object(payload.get("data"))
    message, customer = _object(data.get("message")), _object(data.get("customer"))
    message_id = message.get("id")
    if not isinstance(message_id, str) or not 0 < len(message_id) <= _MAX_ID_CHARS:
        return _malformed("no data.message.id")
    country, national = customer.get("country_code"), customer.get("phone_number")
    if not (isinstance(country, str) and isinstance(national, str)):
        return _malformed("no data.customer.country_code and phone_number")
    try:
        phone = parse_phone("+" + (country + national).lstrip("+"))
    except InvalidInput:
        return _malformed("data.customer is not a valid phone number")
    # What the send put in callbackData: its send id, seen at either place.
    callback = message.get("callback_data")
    if callback is None:
        source = _object(_object(message.get("meta_data")).get("source_data"))
        callback = source.get("callback_data")
    send_id = callback if isinstance(callback, str) and len(callback) <= _MAX_ID_CHARS else ""
    if state is not DeliveryState.FAILED:
        return DeliveryReport(phone.e164, message_id, send_id, state)
    reason = message.get("channel_failure_reason")
    reason = reason[:_MAX_REASON_CHARS] if isinstance(reason, str) else ""
    failure = failure_of(message.get("channel_error_code"), reason)
    return DeliveryReport(phone.e164, message_id, send_id, state, reason, failure)


def _object(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _malformed(why: str) -> str:
    # Signed by Interakt, so it is theirs: worth a look, not an error of ours or a caller's.
    log.warning(
        "a signed delivery report was not understood: %s; acknowledged and dropped",
        why,
        extra={"event": "delivery_report_malformed"},
    )
    return "malformed"


def _masked(e164: str) -> str:
    return parse_phone(e164).masked
