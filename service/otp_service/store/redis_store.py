"""The Store on Redis: each rule one Lua script (``lua/``), run by its SHA1.

Every rule that concurrent calls could race past is one Lua script, so it holds across any
number of replicas. A number's keys share the hash tag ``{+E164}`` (keys.py), so the scripts
also run on Redis Cluster. Redis keeps only keyed digests of codes, never a code. Time comes
from Redis' own clock (``TIME``), so replicas with skewed clocks still agree on expiry and
cooldowns.

A send that fails is withdrawn (``Store.withdraw``) in the background until Redis has done it,
whatever happened to the commands of the send: answered, timed out (they may still run), or
still on their way on a dropped connection when the withdrawal arrives on a new one. Send ids
make that exact: the withdrawal removes that send's entries, and when a command of the send went
unanswered it leaves a tombstone; the scripts that store and count a send do nothing for a
withdrawn one, so the order in which Redis sees them does not matter.

A send that Interakt accepted is recorded (``Store.record_sent``: its message id, and the answer
an idempotent repeat gets), in the background until Redis has done it (with replica acks,
until the replicas hold it), like a withdrawal.
Interakt's delivery reports then move the record's state forward (``Store.report_delivery``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import logging
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol

from redis.exceptions import AuthenticationError, NoScriptError, RedisClusterException, RedisError
from redis.exceptions import ConnectionError as RedisConnectionError

from otp_service import metrics
from otp_service.connections.pipelined_redis import NOT_SENT
from otp_service.errors import (
    ErrorReason,
    InvalidInput,
    LimitExceeded,
    StoreUnavailable,
    StoreUnreachable,
)
from otp_service.results import (
    Channel,
    Delivery,
    DeliveryFailure,
    DeliveryReport,
    DeliveryState,
    OtpStatus,
    ReportOutcome,
    VerifyOutcome,
    VerifyResult,
)
from otp_service.store import keys
from otp_service.store.contract import (
    STORE_UNAVAILABLE,
    FirstAnswer,
    InDoubt,
    NumberState,
    Pending,
    Rules,
    Stored,
)
from otp_service.store.scripts import SCRIPTS

log = logging.getLogger(__name__)

SEND_WINDOW_MS = 3_600_000
FAILED_VERIFY_WINDOW_MS = 3_600_000
SEND_BUDGET_WINDOW_MS = 60_000

_OVER_FAILED_VERIFY_BUDGET = 5
_SEND_WITHDRAWN = 4
_FIRST_ANSWERED = 5
_FIRST_RUNNING = 6
_FIRST_IN_DOUBT = 7
_COUNT_WITHDRAWN = 3
_KEY_OF_ANOTHER_NUMBER = 4
# A withdrawal (or a record of a sent message) that Redis did not take is tried again after
# these waits (doubling).
_RETRY_FIRST_SECONDS = 0.1
_RETRY_LAST_SECONDS = 1.0
# Failed sends' withdrawals waiting for Redis, at most (see _Withdrawals), and how many numbers'
# are tried at once.
MAX_WAITING_WITHDRAWALS = 1000
_WITHDRAWALS_PER_ROUND = 100

# Redis may have run the verification before it failed: fail closed, and say so, so callers
# do not promise users a free retry.
_VERIFY_UNAVAILABLE = (
    f"{STORE_UNAVAILABLE}; the check may still have run, counting this attempt or using up the code"
)
_REPORT_OUTCOMES = {
    0: ReportOutcome.UNCHANGED,
    -1: ReportOutcome.UNKNOWN,
}


@dataclass(frozen=True)
class _Durable:
    """Which replies of a script wrote what a failover must not lose (OTP_REDIS_REPLICA_ACKS
    waits for replicas to hold it), and what a caller is told when they did not confirm it."""

    wrote: Callable[[Any], bool]
    unconfirmed: str


# A stored code: it is delivered only once a failover cannot lose it.
_CODE_STORED = _Durable(
    lambda reply: reply[0] == 0,
    "storage is unavailable: no replica confirmed the new code in time; it was not sent",
)
# A used code or a counted attempt (verified, wrong code, too many attempts): losing either
# would let a code verify twice or give a guesser more tries.
_CODE_USED_OR_COUNTED = _Durable(
    lambda reply: reply[0] in (1, 2, 4),
    "storage is unavailable: no replica confirmed this verification in time; it counted as "
    "an attempt (a right code is used up)",
)
# What a sent message's caller was told (its message id, the answer repeats of its key get):
# losing it would have a repeat wait for an answer that never comes, then be refused or sent
# again. The caller is answered all the same (the message is on its way); the record is made
# again until a replica confirms it, on whichever node is primary by then.
_ANSWER_RECORDED = _Durable(
    lambda reply: reply == 1,
    "storage is unavailable: no replica confirmed the record of a sent message in time",
)


class RedisClient(Protocol):
    """What the store needs of a Redis client.

    PipelinedRedis (one Redis, or the primary Sentinel names), redis-py's own clients, and the
    Cluster client of ``redis_backends``: the scripts are the same on each.
    """

    async def execute_command(self, *args: Any) -> Any: ...

    async def ping(self) -> Any: ...

    async def aclose(self) -> None: ...


@dataclass(eq=False)
class _Withdrawal:
    steps: list[Callable[[], Awaitable[Any]]]
    done: asyncio.Future[None]
    until: float  # the loop's time after which it is given up


class _Withdrawals:
    """The withdrawals of failed sends that Redis has not taken yet, tried by one task.

    A Redis outage must not cost a task, a retry loop and a tombstone per failed send: they wait
    by number (a number's are tried together), at most MAX_WAITING_WITHDRAWALS of them (one
    past that is given up at once); a round tries at most _WITHDRAWALS_PER_ROUND numbers, and
    while Redis keeps failing the rounds are _RETRY_FIRST_SECONDS apart, doubling up to
    _RETRY_LAST_SECONDS. Each is given up after one code TTL (the code has expired by then) or
    at close; giving up is counted (otp_send_withdrawals_given_up_total) and logged.
    """

    def __init__(self, keep_seconds: float, closing: asyncio.Event) -> None:
        self._keep = keep_seconds
        self._closing = closing
        self._waiting: dict[str, list[_Withdrawal]] = {}
        self._count = 0
        self._full = False  # the cap was reached: said once, until there is room again
        self._task: asyncio.Task[None] | None = None

    def add(
        self, phone: str, steps: Sequence[Callable[[], Awaitable[Any]]]
    ) -> asyncio.Future[None]:
        loop = asyncio.get_running_loop()
        withdrawal = _Withdrawal(list(steps), loop.create_future(), loop.time() + self._keep)
        if self._count >= MAX_WAITING_WITHDRAWALS or self._closing.is_set():
            # One line for a run of them: an outage can fail thousands of sends.
            _give_up(withdrawal, "too many withdrawals wait for Redis", quiet=self._full)
            self._full = True
            return withdrawal.done
        self._waiting.setdefault(phone, []).append(withdrawal)
        self._counted(1)
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._run())
        return withdrawal.done

    async def closed(self) -> None:
        """Wait for the last round (the closing event makes it the last)."""
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        delay = _RETRY_FIRST_SECONDS
        while self._waiting:
            phones = list(itertools.islice(self._waiting, _WITHDRAWALS_PER_ROUND))
            results = await asyncio.gather(*(self._try(phone) for phone in phones))
            if all(results):
                delay = _RETRY_FIRST_SECONDS
                continue
            if self._closing.is_set():
                for phone in list(self._waiting):
                    for withdrawal in self._waiting.pop(phone):
                        _give_up(withdrawal, "the service stopped before Redis took it")
                self._counted(-self._count)
                return
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._closing.wait()
            delay = min(delay * 2, _RETRY_LAST_SECONDS)

    async def _try(self, phone: str) -> bool:
        """Try the number's withdrawals once; whether Redis took them all."""
        withdrawals = self._waiting.pop(phone)
        now = asyncio.get_running_loop().time()
        results = await asyncio.gather(
            *(step() for w in withdrawals for step in w.steps), return_exceptions=True
        )
        left: list[_Withdrawal] = []
        answers = iter(results)
        for withdrawal in withdrawals:
            failed = [
                (step, answer)
                for step, answer in zip(withdrawal.steps, answers, strict=False)
                if isinstance(answer, BaseException)
            ]
            if not failed:
                withdrawal.done.set_result(None)
            elif now >= withdrawal.until:
                _give_up(withdrawal, repr(failed[0][1]))
            else:
                withdrawal.steps = [step for step, _ in failed]
                left.append(withdrawal)
        self._counted(len(left) - len(withdrawals))
        if left:
            # At the back of the line: the other numbers get their turn first.
            self._waiting.setdefault(phone, []).extend(left)
        return not left

    def _counted(self, change: int) -> None:
        self._count += change
        self._full = self._full and self._count >= MAX_WAITING_WITHDRAWALS
        metrics.WITHDRAWALS_WAITING.inc(change)


def _give_up(withdrawal: _Withdrawal, why: str, *, quiet: bool = False) -> None:
    metrics.WITHDRAWALS_GIVEN_UP.inc()
    if not quiet:
        log.error(
            "could not withdraw a failed send: its code stays until it expires and the send "
            "stays counted against the limits (%s; otp_send_withdrawals_given_up_total counts "
            "every one)",
            why,
            extra={"event": "send_withdraw_failed"},
        )
    withdrawal.done.set_result(None)


class ReplicaAcks(Protocol):
    """Runs a command, then ``WAIT replicas timeout`` on the same connection.

    On the same connection because WAIT counts the replicas that hold that connection's writes.
    """

    replicas: int

    async def execute_then_wait(self, *args: Any) -> tuple[Any, int]:
        """The command's reply and how many replicas acknowledged it; raises its error reply."""

    async def aclose(self) -> None: ...


def _first_answer(expires_at_ms: int, wait_ms: int, channel: int, message_id: bytes) -> FirstAnswer:
    return FirstAnswer(
        int(expires_at_ms), int(wait_ms), Delivery(Channel(channel), message_id.decode())
    )


# What a Redis client raises when Redis fails a command: redis-py's Cluster client raises
# RedisClusterException (not a RedisError) when the nodes are not a Cluster or unreachable.
REDIS_FAILURES = (RedisError, RedisClusterException, OSError)
# A burst of failed commands (an outage) is logged once every this many seconds.
FAILURE_LOG_SECONDS = 10.0


def not_run(error: BaseException) -> bool:
    """Whether a command that failed with ``error`` never reached Redis to run: no connection
    (refused, unknown host), authentication refused, or not the Cluster the URL names."""
    if isinstance(error, AuthenticationError | RedisClusterException):
        return True
    if NOT_SENT in getattr(error, "__notes__", ()):  # PipelinedRedis could open no connection
        return True
    return isinstance(error, RedisConnectionError) and any(
        isinstance(cause, ConnectionRefusedError | socket.gaierror) for cause in _causes(error)
    )


def describe(error: BaseException) -> str:
    """Why Redis failed, for an operator: the kind of trouble first, then redis-py's words
    (which name hosts and ports, never credentials)."""
    causes = _causes(error)
    if any(isinstance(cause, AuthenticationError) for cause in causes):
        kind = "authentication refused (check the user and password in REDIS_URL)"
    elif isinstance(error, RedisClusterException) and "not enabled" in str(error):
        kind = "not a Redis Cluster, though REDIS_URL says redis+cluster://"
    elif any(isinstance(cause, socket.gaierror) for cause in causes):
        kind = "unknown host"
    elif any(isinstance(cause, ConnectionRefusedError) for cause in causes):
        kind = "connection refused"
    elif any(isinstance(cause, TimeoutError) for cause in causes):
        kind = "no answer in time"
    else:
        kind = type(error).__name__
    return f"{kind}: {error}" if str(error) else kind


def _causes(error: BaseException) -> list[BaseException]:
    """``error`` and what it was raised from, in turn (redis-py wraps the socket's error)."""
    chain: list[BaseException] = []
    while error is not None and error not in chain and len(chain) < 10:
        chain.append(error)
        error = error.__cause__ or error.__context__  # type: ignore[assignment]
    return chain


class RedisFailures:
    """Logs why Redis fails commands, at most once every FAILURE_LOG_SECONDS (an outage fails
    every call), with how many failed since the last line."""

    def __init__(self, address: str) -> None:
        self._address = address
        self._next = 0.0
        self._unlogged = 0

    def seen(self, error: BaseException) -> None:
        now = time.monotonic()
        if now < self._next:
            self._unlogged += 1
            return
        log.warning(
            "redis at %s failed a command: %s%s",
            self._address,
            describe(error),
            f" ({self._unlogged} more since the last such line)" if self._unlogged else "",
            extra={"event": "redis_command_failed"},
        )
        self._next, self._unlogged = now + FAILURE_LOG_SECONDS, 0


class _Script:
    """A Lua script run by its SHA1 (EVALSHA), sent whole (EVAL) when Redis answers NOSCRIPT.

    Redis forgets scripts on a restart, a failover or SCRIPT FLUSH; EVAL runs the script and
    caches it again on whichever node serves the keys (on a Cluster, the one the keys' slot maps
    to, where SCRIPT LOAD could not be routed), so the rules keep working. (redis-py's
    AsyncScript does the same, with per-call overhead that was ~5% of VerifyOtp's CPU:
    bench/README.md.) Every Redis failure becomes StoreUnavailable here, the one place the
    store's commands pass through, with the script's own ``unavailable`` message.
    """

    def __init__(
        self,
        client: RedisClient,
        source: str,
        unavailable: str = STORE_UNAVAILABLE,
        *,
        failures: RedisFailures,
        acks: ReplicaAcks | None = None,
        durable: _Durable | None = None,
    ) -> None:
        self._failures = failures
        self._source = source
        self._sha = hashlib.sha1(source.encode(), usedforsecurity=False).hexdigest()
        self._unavailable = unavailable
        self._durable = durable
        # With replica acks, a script whose reply may need them runs with WAIT after it.
        self._acks = acks if durable is not None else None
        self._execute: Callable[..., Awaitable[Any]] = client.execute_command
        if self._acks is not None:
            self._execute = self._acks.execute_then_wait

    async def __call__(self, *, keys: Sequence[str], args: Sequence[object]) -> Any:
        """The script's reply; any Redis failure raises StoreUnavailable.

        With replica acks, a reply that wrote what must survive a failover is returned only
        once the replicas hold it; otherwise StoreUnavailable, the write staying on the primary.
        """
        execute = self._execute
        try:
            try:
                reply = await execute("EVALSHA", self._sha, len(keys), *keys, *args)
            except NoScriptError:
                # Not run: NOSCRIPT is answered before anything executes, so sending it again
                # cannot count anything twice.
                reply = await execute("EVAL", self._source, len(keys), *keys, *args)
        except REDIS_FAILURES as exc:
            metrics.REDIS_ERRORS.inc()
            self._failures.seen(exc)
            if not_run(exc):
                # Nothing reached Redis: the caller may be told that nothing happened.
                raise StoreUnreachable(STORE_UNAVAILABLE) from exc
            raise StoreUnavailable(self._unavailable) from exc
        if self._acks is None:
            return reply
        reply, acked = reply
        if acked < self._acks.replicas and self._durable and self._durable.wrote(reply):
            metrics.REDIS_ERRORS.inc()
            raise StoreUnavailable(self._durable.unconfirmed)
        return reply


class RedisStore:
    """The Store on Redis: one node, the primary Sentinel names, or a Cluster (every script
    touches one hash slot).

    With ``acks`` (OTP_REDIS_REPLICA_ACKS), a stored code is sent, and a verify that used a
    code or counted an attempt is answered, only once ``acks.replicas`` replicas hold it, so a
    failover cannot lose a code a user was given, nor bring back a used code or a spent attempt.
    A sent message's record (what repeats of its idempotency key are answered) is made until
    replicas hold it. Delivery reports, the send budgets and which number a key names are not
    waited for: docs/scaling.md says what a failover may lose of them.
    """

    def __init__(
        self,
        client: RedisClient,
        rules: Rules,
        *,
        acks: ReplicaAcks | None = None,
        address: str = "redis",
    ) -> None:
        self._redis = client
        self._rules = rules
        self._acks = acks
        self._address = address
        self._failures = RedisFailures(address)
        script = partial(_Script, client, failures=self._failures)
        self._send = script(SCRIPTS["send"], acks=acks, durable=_CODE_STORED)
        self._cancel = script(SCRIPTS["withdraw_send"])
        self._verify = script(
            SCRIPTS["verify"], _VERIFY_UNAVAILABLE, acks=acks, durable=_CODE_USED_OR_COUNTED
        )
        self._budget = script(SCRIPTS["count_send"])
        self._unbudget = script(SCRIPTS["withdraw_count"])
        self._sent = script(SCRIPTS["record_sent"], acks=acks, durable=_ANSWER_RECORDED)
        self._first = script(SCRIPTS["first_answer"])
        self._report = script(SCRIPTS["report_delivery"])
        self._status = script(SCRIPTS["status"])
        self._number_state = script(SCRIPTS["number_state"])
        self._unlock = script(SCRIPTS["unlock"])
        self._cancel_codes = script(SCRIPTS["cancel_codes"])
        self._verify_args = (
            rules.max_attempts,
            rules.max_failed_verifies_per_hour,
            FAILED_VERIFY_WINDOW_MS,
        )
        self._budget_args = (
            rules.caller_sends_per_minute,
            rules.account_sends_per_minute,
            SEND_BUDGET_WINDOW_MS,
        )
        self._send_args = (
            rules.ttl_seconds * 1000,
            rules.resend_cooldown_seconds * 1000,
            rules.max_sends_per_hour,
            SEND_WINDOW_MS,
            rules.max_attempts,
            rules.max_failed_verifies_per_hour,
            FAILED_VERIFY_WINDOW_MS,
        )
        self._status_args = (
            rules.resend_cooldown_seconds * 1000,
            rules.max_sends_per_hour,
            SEND_WINDOW_MS,
            rules.max_failed_verifies_per_hour,
            FAILED_VERIFY_WINDOW_MS,
        )
        self._ttl_ms = rules.ttl_seconds * 1000
        # A late command of a failed send can only arrive while withdrawals are still tried.
        self._tombstone_ms = self._ttl_ms
        self._background: set[asyncio.Task[None]] = set()
        self._closing = asyncio.Event()
        self._withdrawals = _Withdrawals(rules.ttl_seconds, self._closing)

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
        reply = await self._send(
            keys=[
                keys.codes(phone),
                keys.sends(phone),
                keys.failures(phone),
                keys.withdrawn(phone, send_id),
                *keys.delivery(phone),
                *keys.idempotency(phone, key),
            ],
            args=[digest, send_id, *self._send_args, lease_ms, caller],
        )
        status, value = reply[0], reply[1]
        if status == 1:
            raise LimitExceeded(
                "cooldown",
                "phone_number: a code was sent moments ago",
                value / 1000,
                {"cooldown_seconds": str(self._rules.resend_cooldown_seconds)},
            )
        if status == 2:
            raise LimitExceeded(
                "hourly",
                f"phone_number: at most {self._rules.max_sends_per_hour} codes an hour",
                value / 1000,
                {"max_sends_per_hour": str(self._rules.max_sends_per_hour)},
            )
        if status == 3:
            raise self._paused(value)
        if status == _SEND_WITHDRAWN:
            raise StoreUnavailable("the send was withdrawn before Redis stored it")
        if status == _FIRST_ANSWERED:
            return _first_answer(*reply[1:])
        if status == _FIRST_RUNNING:
            return Pending.RUNNING
        if status == _FIRST_IN_DOUBT:
            return InDoubt(int(value), int(reply[2]))
        if reply[3]:
            metrics.CODES_EXPIRED.inc(reply[3])
        return Stored(int(value), int(reply[2]))

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
        # Retry n of a send is a request of its own, counted under a member of its own.
        member = send_id if request == 1 else f"{send_id}:{request}"
        status, value = await self._budget(
            keys=keys.budgets(caller, send_id, key),
            args=[*self._budget_args, member, 2 if account else 1, phone, self._ttl_ms],
        )
        if status == 1:
            raise LimitExceeded(
                "caller",
                f"caller: at most {self._rules.caller_sends_per_minute} sends a minute",
                value / 1000,
                {
                    "caller": caller,
                    "max_sends_per_minute": str(self._rules.caller_sends_per_minute),
                },
            )
        if status == 2:
            raise LimitExceeded(
                "account",
                f"the service's WhatsApp budget of {self._rules.account_sends_per_minute} "
                "messages a minute is spent",
                value / 1000,
                {"max_sends_per_minute": str(self._rules.account_sends_per_minute)},
            )
        if status == _COUNT_WITHDRAWN:
            raise StoreUnavailable("the send was withdrawn before Redis counted it")
        if status == _KEY_OF_ANOTHER_NUMBER:
            raise InvalidInput(
                "idempotency_key",
                "was used for another phone number, whose code is still valid; use a new key "
                "for each send",
                ErrorReason.IDEMPOTENCY_KEY_REUSED,
            )

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
        # The tombstone that stops the send's late commands; none is needed when all answered.
        ms = self._tombstone_ms if in_doubt else 0
        steps = [
            partial(
                self._cancel,
                keys=[
                    keys.codes(phone),
                    keys.sends(phone),
                    keys.withdrawn(phone, send_id),
                    *keys.delivery(phone),
                    *keys.idempotency(phone, key),
                ],
                args=[digest, send_id, ms, (2 - refused) if reached else 0],
            )
        ]
        if caller is not None and not (reached and key is None and not in_doubt):
            # A send that reached Interakt keeps its requests counted: only its key is freed.
            steps.append(
                partial(
                    self._unbudget,
                    keys=keys.budgets(caller, send_id, key),
                    args=[send_id, ms, 0 if reached else requests],
                )
            )
        return self._withdrawals.add(phone, steps)

    def record_in_doubt(
        self, send_id: str, *, phone: str, channel: Channel, key: str | None = None
    ) -> asyncio.Task[None]:
        record = partial(
            self._sent,
            keys=[*keys.delivery(phone), *keys.idempotency(phone, key)],
            args=[send_id, channel.value, "", "", "doubt"],
        )

        def gave_up(error: BaseException) -> None:
            log.error(
                "could not record a send in doubt: repeats of its idempotency key wait for an "
                "answer until the key's claim lapses (%r)",
                error,
                extra={"event": "send_record_failed"},
            )

        return self._in_background([record], gave_up)

    async def record_sent(
        self, send_id: str, *, phone: str, delivery: Delivery, key: str | None = None
    ) -> None:
        record = partial(
            self._sent,
            keys=[*keys.delivery(phone), *keys.idempotency(phone, key)],
            args=[send_id, delivery.channel.value, delivery.message_id, delivery.language, "done"],
        )
        try:
            # Inline first: a task per send to retry what almost always works at once was a
            # measurable part of SendOtp's CPU.
            await record()
        except BaseException as exc:
            # Not taken, or the call was cancelled while Redis ran it (or not): running it
            # again changes nothing if it ran.

            def gave_up(error: BaseException) -> None:
                log.error(
                    "could not record a sent message (or no replica confirmed it): its status "
                    "lacks the message id until Interakt reports on it, and repeats of its "
                    "idempotency key wait for an answer until the key's claim lapses (%r)",
                    error,
                    extra={"event": "send_record_failed"},
                )

            self._in_background([record], gave_up)
            if not isinstance(exc, StoreUnavailable):
                raise

    def _in_background(
        self,
        steps: Sequence[Callable[[], Awaitable[Any]]],
        gave_up: Callable[[BaseException], None],
    ) -> asyncio.Task[None]:
        """A task running each of ``steps`` until Redis has run it once (at most one code TTL),
        calling ``gave_up`` with the last error should it give up. The store's close waits for
        it."""
        task = asyncio.get_running_loop().create_task(self._until_done(steps, gave_up))
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def _until_done(
        self,
        steps: Sequence[Callable[[], Awaitable[Any]]],
        gave_up: Callable[[BaseException], None],
    ) -> None:
        loop = asyncio.get_running_loop()
        # After one TTL the code has expired by itself; the count of a send outlives it.
        deadline = loop.time() + self._rules.ttl_seconds
        delay = _RETRY_FIRST_SECONDS
        while True:
            results = await asyncio.gather(*(step() for step in steps), return_exceptions=True)
            failed = [
                (step, result)
                for step, result in zip(steps, results, strict=True)
                if isinstance(result, BaseException)
            ]
            if not failed:
                return
            steps = [step for step, _ in failed]
            if self._closing.is_set() or loop.time() + delay >= deadline:
                gave_up(failed[0][1])
                return
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._closing.wait()
            delay = min(delay * 2, _RETRY_LAST_SECONDS)

    async def first_answer(self, phone: str, key: str) -> FirstAnswer | InDoubt | Pending | None:
        reply = await self._first(keys=keys.idempotency(phone, key), args=[])
        if not reply:
            return None
        if reply[0] == 0:
            return Pending.RUNNING
        if reply[0] == 2:
            return InDoubt(int(reply[1]), int(reply[2]))
        return _first_answer(*reply[1:])

    async def report_delivery(self, report: DeliveryReport) -> ReportOutcome:
        reply = await self._report(
            keys=keys.delivery(report.phone)[:1],
            args=[
                report.message_id,
                report.send_id,
                report.state.value,
                report.reason,
                report.failure.value if report.failure else 0,
                self._ttl_ms,
            ],
        )
        if isinstance(reply, list):
            channel, since_send_ms = reply[1:]
            metrics.count_delivery(
                report.state.name.lower(),
                Channel(channel).name.lower() if channel else "unknown",
                since_send_ms / 1000,
            )
            return ReportOutcome.APPLIED
        return _REPORT_OUTCOMES[reply]

    async def status(self, phone: str) -> tuple[OtpStatus, str] | None:
        reply = await self._status(
            keys=[
                keys.delivery(phone)[0],
                keys.codes(phone),
                keys.sends(phone),
                keys.failures(phone),
            ],
            args=self._status_args,
        )
        if not reply:
            return None
        (state, channel, message_id, reason, expires_at_ms, verified, wait_ms) = reply[:7]
        failure, language, sent_by = reply[7:]
        failed = state == DeliveryState.FAILED.value
        status = OtpStatus(
            state=DeliveryState(state),
            channel=Channel(channel) if channel else None,
            message_id=message_id.decode(),
            failure_reason=reason.decode() if failed else "",
            verified=bool(verified),
            expires_at_ms=int(expires_at_ms),
            # Whole seconds, rounded up: a send after this many seconds is not refused.
            resend_after_seconds=-(-wait_ms // 1000),
            # A failure reported before failures were typed has none: UNKNOWN.
            failure=DeliveryFailure(failure or DeliveryFailure.UNKNOWN.value) if failed else None,
            language=language.decode(),
        )
        return status, sent_by.decode()

    async def verify(self, phone: str, digest: str, previous: str | None = None) -> VerifyResult:
        args = [digest, *self._verify_args]
        if previous is not None:
            args.append(previous)
        outcome, value = await self._verify(
            keys=[keys.codes(phone), keys.failures(phone)], args=args
        )
        if outcome == _OVER_FAILED_VERIFY_BUDGET:
            raise self._paused(value)
        return VerifyResult(VerifyOutcome(outcome), value)

    def _paused(self, wait_ms: int) -> LimitExceeded:
        return LimitExceeded(
            "paused",
            f"phone_number: {self._rules.max_failed_verifies_per_hour} wrong codes in the last "
            "hour; verification is paused",
            wait_ms / 1000,
            {"max_failed_verifies_per_hour": str(self._rules.max_failed_verifies_per_hour)},
        )

    async def number_state(self, phone: str) -> NumberState:
        reply = await self._number_state(
            keys=[
                keys.codes(phone),
                keys.sends(phone),
                keys.failures(phone),
                keys.delivery(phone)[0],
            ],
            args=self._status_args,
        )
        live, newest, used, sends, wrong, cooldown, paused, capped = (int(v) for v in reply[:8])
        state, channel, message_id, reason, expires_at_ms = reply[8:]
        latest = None
        if state:
            latest = OtpStatus(
                state=DeliveryState(state),
                channel=Channel(channel) if channel else None,
                message_id=message_id.decode(),
                failure_reason=reason.decode() if state == DeliveryState.FAILED.value else "",
                verified=False,
                expires_at_ms=int(expires_at_ms),
                resend_after_seconds=-(-max(cooldown, paused, capped) // 1000),
            )
        return NumberState(
            live_codes=live,
            codes_expire_at_ms=newest,
            attempts_used=min(used, self._rules.max_attempts),
            sends_in_window=sends,
            wrong_codes_in_window=wrong,
            cooldown_ms=cooldown,
            paused_ms=paused,
            capped_ms=capped,
            latest=latest,
        )

    async def unlock(self, phone: str) -> tuple[int, int]:
        wrong, used = await self._unlock(keys=[keys.codes(phone), keys.failures(phone)], args=[])
        return int(wrong), min(int(used), self._rules.max_attempts)

    async def cancel_codes(self, phone: str) -> int:
        return int(
            await self._cancel_codes(keys=[keys.codes(phone), *keys.delivery(phone)], args=[])
        )

    async def check(self) -> str | None:
        try:
            if await self._redis.ping():
                return None
            return f"redis at {self._address} did not answer PING"
        except REDIS_FAILURES as exc:
            return f"redis at {self._address}: {describe(exc)}"

    async def close(self) -> None:
        # Work waiting to retry tries once more now; one in flight ends within the timeout.
        self._closing.set()
        await self._withdrawals.closed()
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        await self._redis.aclose()
        if self._acks is not None:
            await self._acks.aclose()
