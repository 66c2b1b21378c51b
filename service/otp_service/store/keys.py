"""The key schema: every Redis key the store uses is built here, and only here.

The hash-slot rule: every key a script touches shares one ``{hash tag}``, so each script runs
on one Redis Cluster slot. A number's keys share ``{+E164}``; the send budgets, which every
number shares, have the slot ``{senders}`` of their own (so a send takes a second round trip
for them). A function here returns the keys of one slot only.

Keys for one number:
    otp:{+917003848501}:c   hash   <digest> -> expiry in ms (one field per live code),
                                   "n" -> verification attempts used since the last lockout;
                                   expires with the newest code; expired fields are dropped at
                                   each send.
    otp:{+917003848501}:s   zset   send ids scored by send time in ms: the sends of the last
                                   hour ("<send id>:x": one Interakt failed without taking
                                   the message, counted against the cap, not the cooldown).
    otp:{+917003848501}:f   list   times in ms of the latest wrong codes, newest first, at most
                                   the hourly failed-verify budget of them; expires an hour
                                   after the newest.
    otp:{+917003848501}:withdrawn:<send id>
                            string a failed send with an unanswered command was withdrawn:
                                   that command, should Redis run it late, stores and counts
                                   nothing. Lives one code TTL.
    otp:{+917003848501}:d   hash   the latest send's delivery record: "send" (its send id),
                                   "by" (the calling service that sent it), "msg" (Interakt's
                                   message id), "ch" (channel), "ln" (a template's language),
                                   "st" (a DeliveryState), "why" (Interakt's failure reason),
                                   "fc" (a DeliveryFailure, 0 unless failed), "exp" (the
                                   code's expiry in ms). Expires with the code.
    otp:{+917003848501}:d:prev
                            hash   the record a send in flight replaced: back in place if that
                                   send fails, deleted once Interakt accepted it.
    otp:{+917003848501}:k:<key id>
                            hash   an idempotent send (SendOtpRequest.idempotency_key; the id is
                                   a digest of the caller and the key): "send", "at" (when it
                                   was claimed, ms), then its answer: "exp", "wait", and once
                                   Interakt accepted it "ch", "msg", "done". Expires with the
                                   code.

Send budgets shared by every number (the slot ``{senders}``):
    otp:{senders}:caller-sends:billing  zset  send ids of a calling service scored by send time
                                              in ms: its sends of the last minute.
    otp:{senders}:account-sends         zset  the same for the whole Interakt account, whose
                                              rate limit every replica shares.
    otp:{senders}:withdrawn:<send id>   string  the same as above, for the budgets' count.
    otp:{senders}:k:<key id>            hash    the number ("phone") and send an idempotency key
                                                was used for: a key names one number while its
                                                code lives.
"""

from __future__ import annotations


def _number(phone: str) -> str:
    """The prefix of every key of one number: its hash tag is the number."""
    return f"otp:{{{phone}}}"


def codes(phone: str) -> str:
    return f"{_number(phone)}:c"


def sends(phone: str) -> str:
    return f"{_number(phone)}:s"


def failures(phone: str) -> str:
    return f"{_number(phone)}:f"


def withdrawn(phone: str, send_id: str) -> str:
    return f"{_number(phone)}:withdrawn:{send_id}"


def delivery(phone: str) -> list[str]:
    """The delivery record and the one a send in flight replaced."""
    return [f"{_number(phone)}:d", f"{_number(phone)}:d:prev"]


def idempotency(phone: str, key: str | None) -> list[str]:
    """The idempotency key's record beside the number's code (none without a key)."""
    return [] if key is None else [f"{_number(phone)}:k:{key}"]


def budgets(caller: str, send_id: str, key: str | None = None) -> list[str]:
    """The send budgets' keys (the slot ``{senders}``): the caller's sends, the account's, the
    send's withdrawal tombstone there, and the number an idempotency key names (with a key)."""
    return [
        f"otp:{{senders}}:caller-sends:{caller}",
        "otp:{senders}:account-sends",
        f"otp:{{senders}}:withdrawn:{send_id}",
        *([] if key is None else [f"otp:{{senders}}:k:{key}"]),
    ]
