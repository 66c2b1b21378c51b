"""The Store contract: what any implementation must do, checked on each one against real Redis.

One Store (RedisStore, the scripts) over every way the service reaches Redis: the pipelined
connection to one node, the same to the primary the sentinels name, redis-py's Cluster client,
each also with replica acknowledgements (OTP_REDIS_REPLICA_ACKS) where there are replicas; and
redis-py's own pooled client.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest
import redis
import redis.asyncio as aioredis

from otp_service.connections.redis_backends import open_store
from otp_service.errors import InvalidInput, LimitExceeded, StoreUnavailable
from otp_service.results import (
    Channel,
    Delivery,
    DeliveryFailure,
    DeliveryReport,
    DeliveryState,
    ReportOutcome,
    VerifyOutcome,
)
from otp_service.store import FirstAnswer, Pending, RedisStore, Rules, Store, Stored
from tests.conftest import RedisBackend, age

PHONE = "+917003848501"
OTHER_PHONE = "+917003848502"
RIGHT = "a" * 32
WRONG = "b" * 32
SEND = "send-1"
CALLER = "billing"
KEY = "k" * 32  # an idempotency key's id, as the domain makes it
LEASE_MS = 60_000
RULES = Rules(
    ttl_seconds=600,
    max_attempts=5,
    resend_cooldown_seconds=30,
    max_sends_per_hour=5,
    max_failed_verifies_per_hour=10,
    caller_sends_per_minute=120,
    account_sends_per_minute=300,
)

# (deployment, how the store reaches it): the service's own client, with or without replica
# acknowledgements, and redis-py's pooled client on one node.
STORES = [
    ("single", "service"),
    ("single", "redis-py"),
    ("cluster", "service"),
    ("cluster", "service, 1 replica ack"),
    ("sentinel", "service"),
    ("sentinel", "service, 1 replica ack"),
]
pytestmark = pytest.mark.parametrize(
    ("redis_backend", "client"), STORES, indirect=True, ids=[" / ".join(s) for s in STORES]
)


@pytest.fixture
def client(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def make_store(
    redis_backend: RedisBackend, client: str, redis_db: redis.Redis
) -> AsyncIterator[Callable[..., Store]]:
    stores: list[Store] = []

    def make(**rules: int) -> Store:
        merged = Rules(**{**RULES.__dict__, **rules})
        if client == "redis-py":
            store = RedisStore(aioredis.Redis.from_url(redis_backend.settings["redis_url"]), merged)
        else:
            acks = 1 if client.endswith("ack") else 0
            store = open_store(redis_backend.target(replica_acks=acks), merged)
        stores.append(store)
        return store

    yield make
    for store in stores:
        await store.close()


async def test_a_stored_code_verifies_once(make_store: Callable[..., Store]) -> None:
    store = make_store()
    await store.add_code(PHONE, RIGHT, SEND)
    assert (await store.verify(PHONE, RIGHT)).outcome is VerifyOutcome.VERIFIED
    assert (await store.verify(PHONE, RIGHT)).outcome is VerifyOutcome.NO_ACTIVE_CODE


async def test_wrong_codes_count_down_then_lock(make_store: Callable[..., Store]) -> None:
    store = make_store(max_attempts=2)
    await store.add_code(PHONE, RIGHT, SEND)
    assert (await store.verify(PHONE, WRONG)).attempts_remaining == 1
    assert (await store.verify(PHONE, WRONG)).attempts_remaining == 0
    assert (await store.verify(PHONE, RIGHT)).outcome is VerifyOutcome.TOO_MANY_ATTEMPTS


async def test_fifty_concurrent_wrong_guesses_spend_exactly_the_budget(
    make_store: Callable[..., Store],
) -> None:
    store = make_store()
    await store.add_code(PHONE, RIGHT, SEND)
    results = await asyncio.gather(*(store.verify(PHONE, f"{i:032x}") for i in range(50)))
    outcomes = [r.outcome for r in results]
    assert outcomes.count(VerifyOutcome.WRONG_CODE) == RULES.max_attempts
    assert outcomes.count(VerifyOutcome.TOO_MANY_ATTEMPTS) == 50 - RULES.max_attempts
    assert sorted(r.attempts_remaining for r in results)[-RULES.max_attempts :] == [0, 1, 2, 3, 4]
    assert (await store.verify(PHONE, RIGHT)).outcome is VerifyOutcome.TOO_MANY_ATTEMPTS


async def test_of_concurrent_right_codes_one_wins(make_store: Callable[..., Store]) -> None:
    store = make_store()
    await store.add_code(PHONE, RIGHT, SEND)
    results = await asyncio.gather(*(store.verify(PHONE, RIGHT) for _ in range(50)))
    assert sum(r.verified for r in results) == 1
    # The others found the code already used, not a wrong one.
    assert sum(r.outcome is VerifyOutcome.NO_ACTIVE_CODE for r in results) == 49


async def test_a_withdrawn_send_leaves_no_code_and_nothing_counted(
    make_store: Callable[..., Store], redis_db: redis.Redis
) -> None:
    store = make_store()
    await store.add_code(PHONE, RIGHT, SEND)
    await store.count_caller_send(CALLER, SEND)
    await store.withdraw(SEND, phone=PHONE, digest=RIGHT, caller=CALLER, in_doubt=False)
    assert (await store.verify(PHONE, RIGHT)).outcome is VerifyOutcome.NO_ACTIVE_CODE
    assert counted(redis_db) == []
    await store.add_code(PHONE, RIGHT, "send-2")  # not held in the cooldown


async def test_a_send_interakt_answered_is_withdrawn_but_stays_counted(
    make_store: Callable[..., Store], redis_db: redis.Redis
) -> None:
    store = make_store()
    await store.add_code(PHONE, RIGHT, SEND)
    await store.count_caller_send(CALLER, SEND)
    await store.count_caller_send(CALLER, SEND, request=2)  # its retry
    await store.withdraw(
        SEND,
        phone=PHONE,
        digest=RIGHT,
        caller=CALLER,
        in_doubt=False,
        reached=True,
        refused=True,
        requests=3,
    )
    assert (await store.verify(PHONE, RIGHT)).outcome is VerifyOutcome.NO_ACTIVE_CODE
    # In the number's sends, and each request in the caller's and the account's budgets.
    assert sorted(counted(redis_db)) == sorted([SEND.encode()] * 3 + [f"{SEND}:2".encode()] * 2)
    with pytest.raises(LimitExceeded) as cooling:
        await store.add_code(PHONE, RIGHT, "send-2")
    assert cooling.value.kind == "cooldown"


async def test_a_send_interakt_failed_is_withdrawn_and_counts_against_the_cap_only(
    make_store: Callable[..., Store], redis_db: redis.Redis
) -> None:
    store = make_store(max_sends_per_hour=2)
    await store.add_code(PHONE, RIGHT, SEND)
    await store.count_caller_send(CALLER, SEND)
    await store.withdraw(
        SEND, phone=PHONE, digest=RIGHT, caller=CALLER, in_doubt=False, reached=True
    )
    assert (await store.verify(PHONE, RIGHT)).outcome is VerifyOutcome.NO_ACTIVE_CODE
    assert sorted(counted(redis_db)) == sorted([f"{SEND}:x".encode(), SEND.encode(), SEND.encode()])
    await store.add_code(PHONE, RIGHT, "send-2")  # not held in the cooldown
    with pytest.raises(LimitExceeded) as cooling:
        await store.add_code(PHONE, RIGHT, "send-3")
    assert cooling.value.kind == "cooldown"


async def test_a_withdrawal_never_gives_back_more_than_its_own_send(
    make_store: Callable[..., Store], redis_db: redis.Redis
) -> None:
    """A late withdrawal of an older send leaves the newer send's delivery record alone."""
    store = make_store(resend_cooldown_seconds=0)
    await store.add_code(PHONE, RIGHT, SEND)
    await store.add_code(PHONE, WRONG, "send-2")
    await store.withdraw(SEND, phone=PHONE, digest=RIGHT, caller=None, in_doubt=False)
    record = f"otp:{{{PHONE}}}:d"
    assert redis_db.hget(record, "send") == b"send-2"
    assert (await store.verify(PHONE, WRONG)).outcome is VerifyOutcome.VERIFIED


async def test_a_withdrawn_code_leaves_no_attempts_behind(
    make_store: Callable[..., Store], redis_db: redis.Redis
) -> None:
    """The codes hash outlives no code: attempts left over would answer WRONG_CODE."""
    store = make_store()
    await store.add_code(PHONE, RIGHT, SEND)
    assert (await store.verify(PHONE, WRONG)).outcome is VerifyOutcome.WRONG_CODE
    await store.withdraw(SEND, phone=PHONE, digest=RIGHT, caller=None, in_doubt=False)
    assert redis_db.exists(f"otp:{{{PHONE}}}:c") == 0
    assert (await store.verify(PHONE, WRONG)).outcome is VerifyOutcome.NO_ACTIVE_CODE


async def test_a_withdrawn_code_takes_its_expiry_with_it(
    make_store: Callable[..., Store], redis_db: redis.Redis
) -> None:
    """The codes hash then expires with the newest code left, not the withdrawn one."""
    store = make_store(resend_cooldown_seconds=0)
    first = await store.add_code(PHONE, RIGHT, SEND)
    assert isinstance(first, Stored)
    codes = f"otp:{{{PHONE}}}:c"
    # The first code was sent 500 s ago, as the clock would have it (its field is its expiry).
    redis_db.hset(codes, RIGHT, first.expires_at_ms - 500_000)
    await store.add_code(PHONE, WRONG, "send-2")
    assert redis_db.pttl(codes) > 500_000
    await store.withdraw("send-2", phone=PHONE, digest=WRONG, caller=None, in_doubt=False)
    assert 0 < redis_db.pttl(codes) <= 100_000


async def test_a_send_withdrawn_before_redis_ran_it_stores_and_counts_nothing(
    make_store: Callable[..., Store], redis_db: redis.Redis
) -> None:
    """A failed send's own commands may reach Redis after its withdrawal (a dropped connection
    delivers them late): they must find the tombstone and do nothing."""
    store = make_store()
    await store.withdraw(SEND, phone=PHONE, digest=RIGHT, caller=CALLER, in_doubt=True)
    with pytest.raises(StoreUnavailable):
        await store.add_code(PHONE, RIGHT, SEND)
    with pytest.raises(StoreUnavailable):
        await store.count_caller_send(CALLER, SEND)
    assert (await store.verify(PHONE, RIGHT)).outcome is VerifyOutcome.NO_ACTIVE_CODE
    assert counted(redis_db) == []
    # Another send is not affected by that tombstone.
    await store.add_code(PHONE, RIGHT, "send-2")
    await store.count_caller_send(CALLER, "send-2")
    assert (await store.verify(PHONE, RIGHT)).verified


def counted(db: redis.Redis) -> list[bytes]:
    """Every send counted against the number's limits or the caller's and account's budgets."""
    return [
        member
        for key in (
            f"otp:{{{PHONE}}}:s",
            f"otp:{{senders}}:caller-sends:{CALLER}",
            "otp:{senders}:account-sends",
        )
        for member in db.zrange(key, 0, -1)
    ]


async def test_a_second_send_in_the_cooldown_is_refused_with_the_wait(
    make_store: Callable[..., Store],
) -> None:
    store = make_store()
    await store.add_code(PHONE, RIGHT, SEND)
    with pytest.raises(LimitExceeded) as refused:
        await store.add_code(PHONE, WRONG, "send-2")
    assert 29 <= refused.value.retry_after <= 30


async def test_scripts_are_loaded_again_after_script_flush(
    make_store: Callable[..., Store], redis_db: redis.Redis
) -> None:
    store = make_store()
    await store.add_code(PHONE, RIGHT, SEND)
    redis_db.script_flush()
    assert (await store.verify(PHONE, WRONG)).outcome is VerifyOutcome.WRONG_CODE
    redis_db.script_flush()
    assert (await store.verify(PHONE, RIGHT)).verified


async def test_sends_older_than_the_window_are_forgotten(
    make_store: Callable[..., Store], redis_db: redis.Redis
) -> None:
    """A number's sends are kept for the hourly cap's window only: a regular number's record
    stays small however long it is used."""
    store = make_store(resend_cooldown_seconds=0)
    await store.add_code(PHONE, RIGHT, SEND)
    age(redis_db, f"otp:{{{PHONE}}}:s", 3_600)
    await store.add_code(PHONE, WRONG, "send-2")
    assert redis_db.zrange(f"otp:{{{PHONE}}}:s", 0, -1) == [b"send-2"]


async def test_an_idempotent_send_answers_its_repeats_once_recorded(
    make_store: Callable[..., Store],
) -> None:
    store = make_store()
    stored = await store.add_code(PHONE, RIGHT, SEND, key=KEY, lease_ms=LEASE_MS)
    assert isinstance(stored, Stored)
    await store.count_caller_send(CALLER, SEND, phone=PHONE, key=KEY)
    # While the first send runs, a repeat is told so, and stores nothing.
    assert await store.add_code(PHONE, WRONG, "send-2", key=KEY, lease_ms=LEASE_MS) is (
        Pending.RUNNING
    )
    assert await store.first_answer(PHONE, KEY) is Pending.RUNNING
    delivery = Delivery(Channel.TEXT, "msg-1")
    await store.record_sent(SEND, phone=PHONE, delivery=delivery, key=KEY)
    first = FirstAnswer(stored.expires_at_ms, stored.resend_after_ms, delivery)
    assert await store.first_answer(PHONE, KEY) == first
    assert await store.add_code(PHONE, WRONG, "send-2", key=KEY, lease_ms=LEASE_MS) == first
    # The key names its number while the code lives.
    with pytest.raises(InvalidInput):
        await store.count_caller_send(CALLER, "send-3", phone=OTHER_PHONE, key=KEY)
    assert (await store.verify(PHONE, WRONG)).outcome is VerifyOutcome.WRONG_CODE
    assert (await store.verify(PHONE, RIGHT)).verified


async def test_delivery_reports_move_the_status_forward_only(
    make_store: Callable[..., Store],
) -> None:
    store = make_store()
    await store.add_code(PHONE, RIGHT, SEND, caller=CALLER)
    found = await store.status(PHONE)
    assert found is not None
    queued, sent_by = found
    assert (queued.state, queued.channel, queued.message_id) == (DeliveryState.QUEUED, None, "")
    assert (sent_by, queued.language, queued.failure) == (CALLER, "", None)
    delivery = Delivery(Channel.TEMPLATE, "msg-1", language="pt_BR")
    await store.record_sent(SEND, phone=PHONE, delivery=delivery)

    def report(
        state: DeliveryState, message_id: str = "msg-1", failure: DeliveryFailure | None = None
    ) -> DeliveryReport:
        return DeliveryReport(
            phone=PHONE, message_id=message_id, send_id=SEND, state=state, failure=failure
        )

    failed = report(DeliveryState.FAILED, failure=DeliveryFailure.NOT_ON_WHATSAPP)
    assert await store.report_delivery(failed) is ReportOutcome.APPLIED
    found = await store.status(PHONE)
    assert found is not None
    assert (found[0].failure, found[0].language) == (DeliveryFailure.NOT_ON_WHATSAPP, "pt_BR")

    assert await store.report_delivery(report(DeliveryState.DELIVERED)) is ReportOutcome.APPLIED
    assert await store.report_delivery(report(DeliveryState.SENT)) is ReportOutcome.UNCHANGED
    assert await store.report_delivery(report(DeliveryState.READ, "msg-0")) is (
        ReportOutcome.UNKNOWN
    )
    found = await store.status(PHONE)
    assert found is not None
    status = found[0]
    assert (status.state, status.channel, status.message_id, status.verified) == (
        DeliveryState.DELIVERED,
        Channel.TEMPLATE,
        "msg-1",
        False,
    )
    assert status.failure is None
    assert await store.status(OTHER_PHONE) is None
