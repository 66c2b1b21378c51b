"""Rotation without downtime: OTP_SECRET_PREVIOUS keeps the codes sent before a rotation
verifiable, and INTERAKT_API_KEY_FILE is re-read while running."""

from __future__ import annotations

import base64
import os
from pathlib import Path

import grpc
import pytest
from otp.v1 import otp_pb2

from otp_service import Settings
from otp_service.config import ConfigError
from otp_service.key_file import RELOAD_INTERVAL_SECONDS, KeyFile
from tests.conftest import (
    PHONE,
    SECRET,
    MakeService,
    code_sent_to,
    eventually,
    send,
    status_of,
    verify,
    wrong_code,
)
from tests.fake_interakt import API_KEY, FakeInterakt

NEW_SECRET = b"the-new-secret-0123456789abcdef"


async def test_a_code_sent_before_a_rotation_verifies_after_it(
    make_service: MakeService, interakt: FakeInterakt
) -> None:
    before = await make_service(otp_secret=SECRET)
    await send(before)
    code = code_sent_to(interakt, PHONE)
    after = await make_service(otp_secret=NEW_SECRET, otp_secret_previous=SECRET)
    # A wrong code is one attempt, though two secrets were tried.
    wrong = await verify(after, wrong_code(code))
    assert wrong.attempts_remaining == Settings().max_attempts - 1
    assert (await verify(after, code)).verified


async def test_without_the_previous_secret_the_rotation_kills_live_codes(
    make_service: MakeService, interakt: FakeInterakt
) -> None:
    before = await make_service(otp_secret=SECRET)
    await send(before)
    after = await make_service(otp_secret=NEW_SECRET)
    answer = await verify(after, code_sent_to(interakt, PHONE))
    assert answer.outcome == otp_pb2.VERIFY_OUTCOME_WRONG_CODE


async def test_new_codes_use_the_new_secret(
    make_service: MakeService, interakt: FakeInterakt
) -> None:
    rotated = await make_service(otp_secret=NEW_SECRET, otp_secret_previous=SECRET)
    await send(rotated)
    code = code_sent_to(interakt, PHONE)
    only_new = await make_service(otp_secret=NEW_SECRET)
    assert (await verify(only_new, code)).verified


@pytest.mark.parametrize(
    ("previous", "problem"),
    [
        ("short", "OTP_SECRET_PREVIOUS: must be at least 16 characters"),
        (SECRET.decode(), "OTP_SECRET_PREVIOUS: is OTP_SECRET itself; unset it"),
    ],
)
def test_a_bad_previous_secret_is_a_configuration_error(previous: str, problem: str) -> None:
    env = {"OTP_SECRET": SECRET.decode(), "OTP_SECRET_PREVIOUS": previous}
    with pytest.raises(ConfigError) as refused:
        Settings.from_env(env, dev=True)
    assert refused.value.problems == [problem]


def write_atomically(path: Path, text: str) -> None:
    """As a mounted Kubernetes Secret changes: a new file renamed over the old one."""
    fresh = path.with_suffix(".new")
    fresh.write_text(text)
    os.replace(fresh, path)


async def test_a_changed_key_file_is_used_without_a_restart(
    make_service: MakeService, interakt: FakeInterakt, tmp_path: Path
) -> None:
    key_file = tmp_path / "interakt-key"
    key_file.write_text(API_KEY + "\n")
    stub = await make_service(interakt_api_key=API_KEY, interakt_api_key_file=str(key_file))
    await send(stub)
    # Rotated in Interakt's console: the old key is refused from now on.
    new_key = base64.b64encode(b"rotated-interakt-key").decode()
    interakt.api_keys = {new_key}
    assert await status_of(send(stub, "+917003848502")) != grpc.StatusCode.OK

    write_atomically(key_file, new_key + "\n")
    # A refused send stays counted against its number: each try is to a number of its own.
    numbers = (f"+9170038486{i:02d}" for i in range(100))

    async def sent() -> bool:
        return await status_of(send(stub, next(numbers))) == grpc.StatusCode.OK

    await eventually(sent)
    assert interakt.received[-1].headers["Authorization"] == f"Basic {new_key}"


@pytest.mark.parametrize(
    ("content", "extra", "problem"),
    [
        (None, {}, "INTERAKT_API_KEY_FILE: cannot read {path!r}: FileNotFoundError"),
        ("\n", {}, "INTERAKT_API_KEY_FILE: {path!r} is empty"),
        (
            API_KEY,
            {"INTERAKT_API_KEY": API_KEY},
            "INTERAKT_API_KEY, INTERAKT_API_KEY_FILE: set one, not both",
        ),
    ],
)
def test_a_bad_key_file_is_a_configuration_error(
    tmp_path: Path, content: str | None, extra: dict[str, str], problem: str
) -> None:
    path = tmp_path / "interakt-key"
    if content is not None:
        path.write_text(content)
    env = {"INTERAKT_API_KEY_FILE": str(path), **extra}
    with pytest.raises(ConfigError) as refused:
        Settings.from_env(env, dev=True)
    assert refused.value.problems == [problem.format(path=str(path))]


def test_the_key_file_gives_the_key_at_start_up(tmp_path: Path) -> None:
    path = tmp_path / "interakt-key"
    path.write_text(f"  {API_KEY}\n")
    settings = Settings.from_env({"INTERAKT_API_KEY_FILE": str(path)}, dev=True)
    assert (settings.interakt_api_key, settings.interakt_api_key_file) == (API_KEY, str(path))


def test_a_key_file_that_goes_missing_or_empty_keeps_the_last_key(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "interakt-key"
    path.write_text("first-key")
    now = [0.0]
    keys = KeyFile(str(path), "first-key", clock=lambda: now[0])
    for change in (path.unlink, lambda: path.write_text("\n")):
        change()
        now[0] += RELOAD_INTERVAL_SECONDS
        assert keys.current() == "first-key"
    assert [r.event for r in caplog.records] == ["api_key_file_unreadable"] * 2  # type: ignore[attr-defined]
    write_atomically(path, "second-key")
    now[0] += RELOAD_INTERVAL_SECONDS
    assert keys.current() == "second-key"
