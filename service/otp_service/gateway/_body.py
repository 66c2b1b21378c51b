"""Request bodies: JSON only, small, and every way one can be wrong answered with a 400-class."""

from __future__ import annotations

import json
from typing import Any

import grpc
from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError

from otp_service.gateway._errors import Refusal, invalid

# The requests are two short strings; a few KiB leaves room for new fields.
MAX_BODY_BYTES = 4 * 1024


async def read_body(request: web.Request) -> bytes:
    """The raw body of a JSON request; a Refusal when it is not one or cannot be read.

    A body over MAX_BODY_BYTES makes aiohttp raise HTTPRequestEntityTooLarge (the app's
    ``client_max_size``), which the middleware answers.
    """
    if request.content_type != "application/json":
        got = request.headers.get("Content-Type")
        message = (
            f"Content-Type must be application/json, not {request.content_type[:64]!r}"
            if got
            else "Content-Type must be application/json, and it is missing"
        )
        raise Refusal(415, grpc.StatusCode.INVALID_ARGUMENT, message, "wrong_content_type")
    try:
        return await request.read()
    except RequestPayloadError:
        # Broken chunked framing, a Content-Encoding that does not decode, a short body.
        raise invalid(
            "the body could not be read: its framing or content encoding is malformed",
            "unreadable_body",
        ) from None


def parse_json(body: bytes) -> Any:
    """``body`` as JSON; a Refusal naming the problem when it is not JSON."""
    try:
        return json.loads(body)
    except RecursionError:
        # json's C parser recurses once per level: a few KiB of brackets exhaust the stack.
        raise invalid("the body nests arrays or objects too deeply", "too_deep") from None
    except ValueError:  # also UnicodeDecodeError: not UTF-8
        raise invalid("the body is not valid JSON", "not_json") from None
