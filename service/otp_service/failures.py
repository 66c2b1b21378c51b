"""What a failed delivery report means for the caller: WhatsApp's error, as a DeliveryFailure.

Interakt's ``message_api_failed`` report carries WhatsApp's error code (``channel_error_code``)
when it has one, and a text (``channel_failure_reason``) always. The code decides; without one,
words of the text do. docs/interakt.md has the table, where each code comes from, and what a
caller should do with each kind.
"""

from __future__ import annotations

from otp_service.results import DeliveryFailure

# Meta's error codes for WhatsApp Cloud API messages (developers.facebook.com, "Error codes").
_BY_CODE = {
    # Message undeliverable: not on WhatsApp, an app too old, terms not accepted.
    "131026": DeliveryFailure.NOT_ON_WHATSAPP,
    # More than 24 hours since the user wrote: a Text can no longer reach them.
    "131047": DeliveryFailure.NOT_ON_WHATSAPP,
    # Template missing in that language, parameters missing or not matching, paused, disabled.
    "132001": DeliveryFailure.TEMPLATE_UNAVAILABLE,
    "132000": DeliveryFailure.TEMPLATE_UNAVAILABLE,
    "131008": DeliveryFailure.TEMPLATE_UNAVAILABLE,
    "131009": DeliveryFailure.TEMPLATE_UNAVAILABLE,
    "132012": DeliveryFailure.TEMPLATE_UNAVAILABLE,
    "132015": DeliveryFailure.TEMPLATE_UNAVAILABLE,
    "132016": DeliveryFailure.TEMPLATE_UNAVAILABLE,
    # Not delivered to keep the ecosystem healthy, spam limit, pair limit, throughput limit.
    "131049": DeliveryFailure.RATE_LIMITED,
    "131048": DeliveryFailure.RATE_LIMITED,
    "131056": DeliveryFailure.RATE_LIMITED,
    "130429": DeliveryFailure.RATE_LIMITED,
}
# Without a code: lower-case words of the text, first match wins.
_BY_TEXT = (
    ("expired", DeliveryFailure.EXPIRED),
    ("undeliverable", DeliveryFailure.NOT_ON_WHATSAPP),
    ("not on whatsapp", DeliveryFailure.NOT_ON_WHATSAPP),
    ("not a whatsapp", DeliveryFailure.NOT_ON_WHATSAPP),
    ("template", DeliveryFailure.TEMPLATE_UNAVAILABLE),
    ("parameter", DeliveryFailure.TEMPLATE_UNAVAILABLE),
    ("ecosystem", DeliveryFailure.RATE_LIMITED),
    ("rate limit", DeliveryFailure.RATE_LIMITED),
    ("spam", DeliveryFailure.RATE_LIMITED),
    ("too many", DeliveryFailure.RATE_LIMITED),
)


def failure_of(error_code: object, reason: str) -> DeliveryFailure:
    """The kind of a failed delivery, from WhatsApp's ``error_code`` (a number or its digits,
    anything else is no code) and else Interakt's ``reason``."""
    if isinstance(error_code, int | str) and not isinstance(error_code, bool):
        known = _BY_CODE.get(str(error_code).strip())
        if known is not None:
            return known
    text = reason.lower()
    for words, failure in _BY_TEXT:
        if words in text:
            return failure
    return DeliveryFailure.UNKNOWN
