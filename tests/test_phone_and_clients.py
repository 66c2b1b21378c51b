"""Phone parsing as a property, and the client package's promise of no server dependencies."""

from __future__ import annotations

import ast
import re
import tomllib
from pathlib import Path

import phonenumbers
import pytest
from hypothesis import given
from hypothesis import strategies as st

from otp_service.errors import InvalidInput
from otp_service.phone import parse_phone

CLIENTS = Path(__file__).parent.parent / "clients" / "python"
E164 = re.compile(r"\+[1-9][0-9]{6,14}")


@given(st.text(max_size=40) | st.from_regex(r"\+[0-9 -]{0,20}", fullmatch=True))
def test_any_input_is_refused_or_becomes_a_valid_e164_number(raw: str) -> None:
    try:
        phone = parse_phone(raw)
    except InvalidInput as exc:
        refused: InvalidInput | None = exc
    else:
        refused = None
    if refused is not None:
        assert refused.field == "phone_number"
        return
    assert E164.fullmatch(phone.e164)
    assert phone.e164 == phone.country_code + phone.national_number
    assert phonenumbers.is_valid_number(phonenumbers.parse(phone.e164))
    assert parse_phone(phone.e164) == phone
    # The number the caller wrote: the same digits, or without the national trunk prefix "0"
    # some write after the country code ("+60 0 4…"), which libphonenumber drops.
    written = re.sub("[ -]", "", raw)
    assert phone.e164 in (written, written.replace(phone.country_code + "0", phone.country_code, 1))


@pytest.mark.parametrize(
    ("raw", "masked"), [("+917003848501", "+91******8501"), ("+14155552671", "+1******2671")]
)
def test_masked_number_hides_the_middle(raw: str, masked: str) -> None:
    assert parse_phone(raw).masked == masked


def test_client_package_needs_only_grpcio_and_protobuf() -> None:
    project = tomllib.loads((CLIENTS / "pyproject.toml").read_text())["project"]
    names = {re.split(r"[<>=!~\[ ]", dep)[0] for dep in project["dependencies"]}
    assert names == {"grpcio", "protobuf"}
    modules = sorted((CLIENTS / "src").rglob("*.py"))
    assert modules
    for module in modules:
        tree = ast.parse(module.read_text())
        imported = {
            alias.name.split(".")[0]
            for node in ast.walk(tree)
            if isinstance(node, ast.Import)
            for alias in node.names
        } | {
            (node.module or "").split(".")[0]
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.level == 0
        }
        assert imported <= {"grpc", "google", "otp", "warnings", "builtins"}, module
