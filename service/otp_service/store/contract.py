"""The store's contract: what the domain needs from storage (Store) and the results it returns.

The domain (otp.py, admin.py) depends on this module only; redis_store.py is the implementation,
and tests/test_store_contract.py the test every implementation passes.
"""

from __future__ import annotations

import asyncio
import enum
from dataclasses import dataclass
from typing import Protocol

from otp_service.results import (
    Channel,
    Delivery,
    DeliveryReport,
    OtpStatus,
    ReportOutcome,
    VerifyResult,
)

# What a caller is told when Redis fails it (the domain says the same when Redis is too slow).
STORE_UNAVAILABLE = "storage is unavailable, try again shortly"


@dataclass(frozen=True, kw_only=True)
class Rules:
    """The per-number limits the store enforces."""

    ttl_seconds: int
    max_attempts: int
    resend_cooldown_seconds: int
    max_sends_per_hour: int
    max_failed_verifies_per_hour: int
    caller_sends_per_minute: int
    account_sends_per_minute: int


@dataclass(frozen=True, slots=True)
class Stored:
    """A new code, stored: its expiry (epoch ms) and the ms until the number's next send."""

    expires_at_ms: int
    resend_after_ms: int


@dataclass(frozen=True, slots=True)
class FirstAnswer:
    """What the first send with an idempotency key answered; its repeats answer the same."""

    expires_at_ms: int
    resend_after_ms: int
    delivery: Delivery


@dataclass(frozen=True, slots=True, kw_only=True)
class NumberState:
    """What a support desk may see of a number (AdminService): counts and waits, never a code."""

    live_codes: int
    codes_expire_at_ms: int  # 0 without a live code
    attempts_used: int
    sends_in_window: int
    wrong_codes_in_window: int
    cooldown_ms: int
    paused_ms: int
    capped_ms: int
    latest: OtpStatus | None  # its latest delivery record; ``verified`` is left False


@dataclass(frozen=True, slots=True)
class InDoubt:
    """The first send with an idempotency key ended in doubt (its message may have arrived):
    its code's expiry (epoch ms) and the ms until the number's next send."""

    expires_at_ms: int
    resend_after_ms: int


class Pending(enum.Enum):
    """The first send with an idempotency key has not answered yet."""

    RUNNING = "running"


class Store(Protocol):
    """What the domain needs from storage. Every method but ``withdraw`` and ``record_sent`` is
    atomic.

    An idempotency ``key`` is an id for the calling service's key (the domain makes it): the
    store keeps it beside the number's code, for as long as the code lives.
    """

    async def add_code(
        self,
        phone: str,
        digest: str,
        send_id: str,
        *,
        key: str | None = None,
        lease_ms: int = 0,
        caller: str = "",
    ) -> Stored | FirstAnswer | InDoubt | Pending:
        """Store a new code's digest for send ``send_id`` of ``caller`` if the send limits allow.

        With ``key``: when a send with that key was stored earlier, its answer (FirstAnswer,
        InDoubt, or Pending while it runs) instead, and nothing is stored; a send that claimed
        the key over ``lease_ms`` ago and never answered counts as gone.

        Raises LimitExceeded in the cooldown or over the hourly cap, StoreUnavailable on trouble.
        """

    async def count_caller_send(
        self,
        caller: str,
        send_id: str,
        *,
        account: bool = True,
        phone: str = "",
        key: str | None = None,
        request: int = 1,
    ) -> None:
        """Count request ``request`` of send ``send_id`` (1, or a retry: 2, 3...; each request
        made to Interakt counts) against the caller's budget and, with ``account``, the
        Interakt account's; with ``key``, claim the key for ``phone``.

        Raises LimitExceeded when a budget is spent, InvalidInput when the key was used for
        another number whose code lives, StoreUnavailable on trouble.
        """

    def withdraw(
        self,
        send_id: str,
        *,
        phone: str,
        digest: str,
        caller: str | None,
        in_doubt: bool,
        reached: bool = False,
        refused: bool = False,
        requests: int = 1,
        key: str | None = None,
    ) -> asyncio.Future[None]:
        """Take back a send whose message did not go out: its code, its delivery record, its
        ``key``; and unless it ``reached`` Interakt (which answered without taking it), its
        count against the number's cooldown and cap, and with ``caller`` its ``requests``
        counted in the send budgets. One that reached it holds the number's cooldown only if
        Interakt ``refused`` it (a lasting refusal; a 5xx or a 429 lifts it).

        Done in the background until Redis has done it (at most one code TTL; a bounded number
        wait, see _Withdrawals). ``in_doubt``: a command of the send went unanswered, so Redis
        may run it after the withdrawal; it will then store and count nothing. Returns a future
        done when it is over; nobody need wait for it.
        """

    def record_in_doubt(
        self, send_id: str, *, phone: str, channel: Channel, key: str | None = None
    ) -> asyncio.Task[None]:
        """Record that send ``send_id`` may have reached Interakt without its answer: its
        ``key``'s repeats answer that (in doubt) and send nothing; its code and counts stay.

        Done in the background until Redis has done it (at most one code TTL). Returns the
        task; nobody need wait for it.
        """

    async def record_sent(
        self, send_id: str, *, phone: str, delivery: Delivery, key: str | None = None
    ) -> None:
        """Record that Interakt accepted send ``send_id``: its message id for the delivery
        record, and the answer of its ``key`` for repeats.

        Done once Redis answers (within its timeout; with replica acks, once the replicas hold
        it); if it does not, or the call is cancelled, it goes on in the background until Redis
        has done it (at most one code TTL). Never raises StoreUnavailable: the message went out
        all the same.
        """

    async def first_answer(self, phone: str, key: str) -> FirstAnswer | InDoubt | Pending | None:
        """The answer of the send holding ``key``: Pending while it runs, InDoubt when it ended
        in doubt, None when no send holds it (it failed, or the code expired)."""

    async def report_delivery(self, report: DeliveryReport) -> ReportOutcome:
        """Apply Interakt's report on a message to the delivery record of its number."""

    async def status(self, phone: str) -> tuple[OtpStatus, str] | None:
        """The number's latest code's delivery record and the calling service that sent it;
        None when it has no live code."""

    async def verify(self, phone: str, digest: str, previous: str | None = None) -> VerifyResult:
        """Count one attempt, compare (with ``previous``, the typed code's digest under the
        previous secret, too), and consume the number's codes on a match.

        Raises LimitExceeded while the number is over its hourly budget of wrong codes.
        """

    async def check(self) -> str | None:
        """None when the store answers now; else why not, naming where (never credentials)."""

    async def close(self) -> None:
        """Give withdrawals and records in flight one last try, then release connections."""

    async def number_state(self, phone: str) -> NumberState:
        """The number's codes, attempts, sends, waits and latest delivery (AdminService)."""

    async def unlock(self, phone: str) -> tuple[int, int]:
        """Clear the number's wrong codes and its codes' attempts: how many of each."""

    async def cancel_codes(self, phone: str) -> int:
        """Delete the number's live codes and their delivery record: how many codes."""
