"""Where codes and counters live. The rooms, in the order a reader needs them:

    contract.py      the Store protocol the domain depends on, and the results it returns
    keys.py          the key schema: every key, built in one place; the hash-slot rule
    lua/             the rules: one Lua script per file, headed by its KEYS, ARGV and reply
                     (send.lua stores a code; the cooldown, the hourly cap and the wrong-code
                     pause are decided in lib/send_waits.lua, which scripts share)
    scripts.py       the loader: each lua/ file as Redis runs it (shared Lua put in front,
                     constants filled in); ``python -m otp_service.store NAME`` prints one
    redis_store.py   the Store on Redis: runs the scripts, turns their replies into results,
                     withdraws failed sends in the background

How the store reaches Redis (one node, Sentinel, Cluster) is otp_service.connections'.
"""

from otp_service.store.contract import (
    STORE_UNAVAILABLE,
    FirstAnswer,
    InDoubt,
    NumberState,
    Pending,
    Rules,
    Store,
    Stored,
)
from otp_service.store.redis_store import (
    RedisClient,
    RedisStore,
    ReplicaAcks,
    describe,
    not_run,
)
from otp_service.store.scripts import SCRIPT_COMMANDS

__all__ = [
    "SCRIPT_COMMANDS",
    "STORE_UNAVAILABLE",
    "FirstAnswer",
    "InDoubt",
    "NumberState",
    "Pending",
    "RedisClient",
    "RedisStore",
    "ReplicaAcks",
    "Rules",
    "Store",
    "Stored",
    "describe",
    "not_run",
]
