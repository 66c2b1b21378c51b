"""A fake of Interakt's message API on loopback, answering as docs/interakt.md says.

Tests drive it by queueing answers (``fake.answer(...)``); with none queued it behaves like a
healthy Interakt: it checks the Basic key, validates the body and queues the message.

It also sends delivery reports (webhooks) back, signed as Interakt signs them, to
``webhook_url``: ``report(...)`` posts one and returns the HTTP status it got; with ``reports``
set, each message it queues is reported on by itself, as the switches say (``signature``,
``redeliver``, ``reverse``, ``early``). Every status a report got is in ``report_answers``.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import itertools
import json
import re
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Literal

import aiohttp
from aiohttp import web

API_KEY = "ZmFrZS1pbnRlcmFrdC1rZXk="  # base64 of "fake-interakt-key": a test value only
NOT_A_CONTACT = "Customer is not available for the organization"
OUTSIDE_24H = "Customer has not messaged within last 24 hours"
INVALID_TOKEN = "Invalid token provided"
RATE_LIMITED = "Rate limit exceeded for this resource"
# Where ``FakeInterakt.redirect()`` points: outside the API's base URL, as a moved one would be.
_ELSEWHERE = "/elsewhere/message/"


# Interakt's word for each status, as reports carry it in message_status.
STATUS_WORDS = {"sent": "Sent", "delivered": "Delivered", "read": "Read", "failed": "Failed"}
Signature = Literal["right", "wrong", "none"]
# Where a report carries the send's callbackData: both have been seen (docs/interakt.md).
CallbackAt = Literal["message", "meta_data"]


# Meta's 131008, as Interakt passes it on, for an authentication template sent without the code
# for its OTP button.
BUTTON_PARAMETER_MISSING = "Button at index 0 of type Url requires a parameter"
# Meta's 132000: parameters given that the template has no place for (a button value for a
# template without a button).
PARAMETER_COUNT_MISMATCH = "Number of parameters does not match the expected number of params"
# The approved translations of the test template "Auth" (an authentication template with a
# copy-code button), and "OldAuth", a template approved before authentication templates had
# buttons.
APPROVED_TEMPLATES = frozenset(
    {("Auth", "en"), ("Auth", "en_GB"), ("Auth", "hi"), ("Auth", "pt_BR"), ("OldAuth", "en")}
)
BUTTON_TEMPLATES = frozenset({"Auth"})


def no_template(name: str, language: str) -> str:
    return f"No approved template found with name '{name}' and language '{language}'"


@dataclass
class Answer:
    """One scripted answer; ``delay`` seconds before it is sent, after ``hold`` is set if given.
    ``html`` replaces the JSON body, as a proxy or a wrong base URL would answer."""

    status: int = 200
    body: dict[str, Any] | None = None
    html: str | None = None
    delay: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)
    hold: asyncio.Event | None = None


def refusal(message: str, status: int = 400) -> Answer:
    """Interakt's refusal of a message: ``{"result": false, "message": ...}``."""
    return Answer(status, {"result": False, "message": message})


def accepted(message_id: str, *, delay: float = 0.0, hold: asyncio.Event | None = None) -> Answer:
    """Interakt's acceptance of a message, late as ``delay`` and ``hold`` say. (An Answer
    without a body answers JSON ``null``, which the service counts as a failed upstream.)"""
    body = {"result": True, "message": "Message queued for sending", "id": message_id}
    return Answer(200, body, delay=delay, hold=hold)


@dataclass
class Received:
    """A request as the fake saw it, and when (``time.monotonic()``, the tests' clock too)."""

    headers: dict[str, str]
    body: dict[str, Any]
    at: float = field(default_factory=time.monotonic)

    @property
    def code(self) -> str:
        """The code the message carried, whichever type it was."""
        if self.body["type"] == "Template":
            return str(self.body["template"]["bodyValues"][0])
        found = re.search(r" is (\d+)\. ", self.body["data"]["message"])
        assert found, self.body
        return found.group(1)


@dataclass(frozen=True)
class Queued:
    """A message the fake queued: what its delivery reports name."""

    id: str
    country_code: str
    phone_number: str
    callback_data: str | None


class FakeInterakt:
    """The fake upstream; ``base_url`` goes into INTERAKT_BASE_URL."""

    def __init__(self) -> None:
        self.received: list[Received] = []
        self.queued: list[Queued] = []
        # Delivery reports: where they go, the secret they are signed with, and the switches.
        self.webhook_url = ""
        self.webhook_secret = ""
        # The statuses reported on each message it queues, in order ("sent", "delivered",
        # "read", "failed"); none by default.
        self.reports: tuple[str, ...] = ()
        self.signature: Signature = "right"
        self.redeliver = False  # each report twice
        self.reverse = False  # a message's reports in reverse order
        self.early = False  # reported before the send is answered
        self.callback_at: CallbackAt = "message"
        # The reason and WhatsApp error code of the "failed" reports it sends by itself.
        self.failed_with: tuple[str, int] | None = None
        self.report_answers: list[int] = []
        self._reporting: set[asyncio.Task[None]] = set()
        self._session: aiohttp.ClientSession | None = None
        # Whatever reached the target of ``redirect()``: a client that follows redirects.
        self.followed: list[Received] = []
        self._answers: deque[Answer] = deque()
        self._ids = itertools.count(1)
        self._runner: web.AppRunner | None = None
        self.base_url = ""
        self._origin = ""
        # Contacts who wrote within 24 hours; None means everyone did.
        self.in_window: set[str] | None = None
        # (name, language) pairs approved; the names of those with an OTP button at index 0.
        self.approved_templates: set[tuple[str, str]] = set(APPROVED_TEMPLATES)
        self.button_templates: set[str] = set(BUTTON_TEMPLATES)
        # The account's API keys Interakt accepts now (a rotation in its console changes them).
        self.api_keys = {API_KEY}

    def answer(self, *answers: Answer) -> None:
        """Queue answers for the next requests, in order."""
        self._answers.extend(answers)

    def redirect(self, status: int) -> Answer:
        """A redirect to another route of this fake, which records in ``followed`` what reaches
        it and answers as a healthy Interakt would (so following it looks like a success)."""
        return Answer(status, None, headers={"Location": self._origin + _ELSEWHERE})

    def reset(self) -> None:
        self.received.clear()
        self.followed.clear()
        self._answers.clear()
        self._ids = itertools.count(1)
        self.in_window = None
        self.approved_templates = set(APPROVED_TEMPLATES)
        self.button_templates = set(BUTTON_TEMPLATES)
        self.api_keys = {API_KEY}
        self.queued.clear()
        self.webhook_url = self.webhook_secret = ""
        self.reports = ()
        self.signature = "right"
        self.redeliver = self.reverse = self.early = False
        self.callback_at = "message"
        self.failed_with = None
        self.report_answers.clear()
        for task in self._reporting:  # a test that did not wait for its reports
            task.cancel()

    def send_reports_to(self, url: str, secret: str, *reports: str) -> None:
        """Report on each message it queues from now on: ``reports`` (e.g. "sent", "delivered",
        "read"), posted to ``url`` and signed with ``secret``."""
        self.webhook_url, self.webhook_secret, self.reports = url, secret, reports

    async def report(
        self,
        message: Queued,
        status: str,
        *,
        signature: Signature | None = None,
        reason: str | None = None,
        error_code: int | str | None = None,
        kind: str | None = None,
    ) -> int:
        """Post one delivery report on ``message`` to ``webhook_url``; the HTTP status it got.

        ``status`` is sent, delivered, read or failed (``reason`` and ``error_code``, WhatsApp's
        code, a failure's); ``kind`` replaces the report's type (another kind of report).
        """
        report = report_body(
            message,
            status,
            reason=reason,
            error_code=error_code,
            kind=kind,
            callback_at=self.callback_at,
        )
        body = json.dumps(report, indent=2)
        return await self.post_report(body.encode(), signature=signature)

    async def post_report(self, body: bytes, *, signature: Signature | None = None) -> int:
        """Post ``body`` as a report, signed as ``signature`` says (the switch by default)."""
        headers = {"Content-Type": "application/json"}
        signed = signature or self.signature
        if signed != "none":
            secret = self.webhook_secret if signed == "right" else "not-" + self.webhook_secret
            headers["Interakt-Signature"] = sign(body, secret)
        async with self._client().post(self.webhook_url, data=body, headers=headers) as answer:
            await answer.read()
            self.report_answers.append(answer.status)
            return answer.status

    async def reports_done(self) -> None:
        """Wait until every report it started on its own has been answered."""
        while self._reporting:
            await asyncio.gather(*self._reporting)

    async def _report_on(self, message: Queued) -> None:
        statuses = list(reversed(self.reports) if self.reverse else self.reports)
        reason, code = self.failed_with or (None, None)
        for status in statuses:
            failed = status == "failed"
            for _ in range(2 if self.redeliver else 1):
                await self.report(
                    message,
                    status,
                    reason=reason if failed else None,
                    error_code=code if failed else None,
                )

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        return self._session

    async def start(self) -> FakeInterakt:
        app = web.Application()
        app.router.add_post("/v1/public/message/", self._message)
        app.router.add_route("*", _ELSEWHERE, self._elsewhere)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self._origin = f"http://127.0.0.1:{port}"
        self.base_url = f"{self._origin}/v1/public"
        return self

    async def stop(self) -> None:
        if self._session is not None:
            await self._session.close()
        if self._runner is not None:
            await self._runner.cleanup()

    async def _message(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.received.append(Received(dict(request.headers), body))
        if self._answers:
            scripted = self._answers.popleft()
            if scripted.hold is not None:
                await scripted.hold.wait()
            await asyncio.sleep(scripted.delay)
            if scripted.html is not None:
                return web.Response(
                    text=scripted.html, status=scripted.status, content_type="text/html"
                )
            return web.json_response(
                scripted.body, status=scripted.status, headers=scripted.headers
            )
        if request.headers.get("Authorization") not in {f"Basic {key}" for key in self.api_keys}:
            return _refuse(INVALID_TOKEN, status=401)
        if body.get("type") == "Text":
            number = body["countryCode"] + body["phoneNumber"]
            if self.in_window is not None and number not in self.in_window:
                return _refuse(OUTSIDE_24H)
        elif body.get("type") == "Template":
            template = body["template"]
            if (template["name"], template["languageCode"]) not in self.approved_templates:
                return _refuse(no_template(template["name"], template["languageCode"]))
            buttons = template.get("buttonValues")
            if template["name"] in self.button_templates:
                if not (isinstance(buttons, dict) and buttons.get("0")):
                    return _refuse(BUTTON_PARAMETER_MISSING)
            elif buttons:
                return _refuse(PARAMETER_COUNT_MISMATCH)
        else:
            return _refuse("Invalid message type")
        message = Queued(
            f"msg-{next(self._ids)}",
            body["countryCode"],
            body["phoneNumber"],
            body.get("callbackData"),
        )
        self.queued.append(message)
        if self.reports:
            if self.early:
                # Before the send is answered: the service has not recorded the message id yet.
                await self._report_on(message)
            else:
                task = asyncio.get_running_loop().create_task(self._report_on(message))
                self._reporting.add(task)
                task.add_done_callback(self._reporting.discard)
        return web.json_response(
            {"result": True, "message": "Message queued for sending", "id": message.id}
        )

    async def _elsewhere(self, request: web.Request) -> web.Response:
        # Any method: a 301/302/303 turns the POST into a GET, a 307/308 posts the body again.
        body = await request.json() if request.can_read_body else {}
        self.followed.append(Received(dict(request.headers), body))
        return web.json_response(
            {"result": True, "message": "Message queued for sending", "id": "msg-elsewhere"}
        )


def report_body(
    message: Queued,
    status: str,
    *,
    reason: str | None = None,
    error_code: int | str | None = None,
    kind: str | None = None,
    callback_at: CallbackAt = "message",
) -> dict[str, Any]:
    """A delivery report on ``message`` as Interakt writes it (docs/interakt.md)."""
    reported: dict[str, Any] = {"id": message.id, "message_status": STATUS_WORDS[status]}
    if message.callback_data is not None and callback_at == "message":
        reported["callback_data"] = message.callback_data
    elif message.callback_data is not None:
        source = {"source_type": "API", "callback_data": message.callback_data}
        reported["meta_data"] = {"source_data": source}
    if reason is not None:
        reported["channel_failure_reason"] = reason
    if error_code is not None:
        reported["channel_error_code"] = error_code
    return {
        "version": "1.0",
        "timestamp": "2026-11-30T12:00:00.000000",
        "type": kind or f"message_api_{status}",
        "data": {
            "customer": {
                "channel_phone_number": message.country_code.lstrip("+") + message.phone_number,
                "country_code": message.country_code,
                "phone_number": message.phone_number,
                "traits": {"name": "A customer", "whatsapp_opted_in": True},
            },
            "message": reported,
        },
    }


def sign(body: bytes, secret: str) -> str:
    """The Interakt-Signature header of ``body``."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def _refuse(message: str, status: int = 400) -> web.Response:
    return web.json_response({"result": False, "message": message}, status=status)
