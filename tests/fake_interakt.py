"""A fake of Interakt's message API on loopback, answering as docs/interakt.md says.

Tests drive it by queueing answers (``fake.answer(...)``); with none queued it behaves like a
healthy Interakt: it checks the Basic key, validates the body and queues the message.
"""

from __future__ import annotations

import asyncio
import itertools
import re
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

API_KEY = "ZmFrZS1pbnRlcmFrdC1rZXk="  # base64 of "fake-interakt-key": a test value only
NOT_A_CONTACT = "Customer is not available for the organization"
OUTSIDE_24H = "Customer has not messaged within last 24 hours"
INVALID_TOKEN = "Invalid token provided"
RATE_LIMITED = "Rate limit exceeded for this resource"
# Where ``FakeInterakt.redirect()`` points: outside the API's base URL, as a moved one would be.
_ELSEWHERE = "/elsewhere/message/"


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


class FakeInterakt:
    """The fake upstream; ``base_url`` goes into INTERAKT_BASE_URL."""

    def __init__(self) -> None:
        self.received: list[Received] = []
        # Whatever reached the target of ``redirect()``: a client that follows redirects.
        self.followed: list[Received] = []
        self._answers: deque[Answer] = deque()
        self._ids = itertools.count(1)
        self._runner: web.AppRunner | None = None
        self.base_url = ""
        self._origin = ""
        # Contacts who wrote within 24 hours; None means everyone did.
        self.in_window: set[str] | None = None
        self.approved_templates: set[tuple[str, str]] = {("Auth", "en")}

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
        self.approved_templates = {("Auth", "en")}

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
        if request.headers.get("Authorization") != f"Basic {API_KEY}":
            return _refuse(INVALID_TOKEN, status=401)
        if body.get("type") == "Text":
            number = body["countryCode"] + body["phoneNumber"]
            if self.in_window is not None and number not in self.in_window:
                return _refuse(OUTSIDE_24H)
        elif body.get("type") == "Template":
            template = body["template"]
            if (template["name"], template["languageCode"]) not in self.approved_templates:
                return _refuse(no_template(template["name"], template["languageCode"]))
        else:
            return _refuse("Invalid message type")
        return web.json_response(
            {
                "result": True,
                "message": "Message queued for sending",
                "id": f"msg-{next(self._ids)}",
            }
        )

    async def _elsewhere(self, request: web.Request) -> web.Response:
        # Any method: a 301/302/303 turns the POST into a GET, a 307/308 posts the body again.
        body = await request.json() if request.can_read_body else {}
        self.followed.append(Received(dict(request.headers), body))
        return web.json_response(
            {"result": True, "message": "Message queued for sending", "id": "msg-elsewhere"}
        )


def _refuse(message: str, status: int = 400) -> web.Response:
    return web.json_response({"result": False, "message": message}, status=status)
