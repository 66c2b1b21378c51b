"""Phone parsing as a property, and the client package's promise of no server dependencies."""

from __future__ import annotations

import ast
import re
import sys
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
    # The number the caller wrote: the same digits, or without the national trunk prefix some
    # write after the country code ("+60 0 4…", "+1 1 201…"), which libphonenumber drops.
    written = re.sub("[ -]", "", raw)
    region = phonenumbers.region_code_for_country_code(int(phone.country_code[1:]))
    metadata = phonenumbers.PhoneMetadata.metadata_for_region(region)  # None: non-geographic
    trunk = (metadata.national_prefix or "") if metadata is not None else ""
    without_trunk = written.replace(phone.country_code + trunk, phone.country_code, 1)
    assert phone.e164 in (written, without_trunk)


@pytest.mark.parametrize(
    ("raw", "e164"),
    [
        ("+91 70038 48501", "+917003848501"),
        ("+91 0 70038 48501", "+917003848501"),  # India's trunk prefix 0
        ("+1 1 201 200 0000", "+12012000000"),  # the US trunk prefix 1 (found by hypothesis)
        ("+44 0 20 7946 0000", "+442079460000"),
    ],
)
def test_a_trunk_prefix_after_the_country_code_is_dropped(raw: str, e164: str) -> None:
    assert parse_phone(raw).e164 == e164


def test_digits_that_libphonenumber_would_rewrite_are_refused() -> None:
    # Argentina's rules turn "+54 11 15 2345 6789" into another string of digits: not sent to.
    with pytest.raises(InvalidInput, match="phone_number: is not a valid phone number"):
        parse_phone("+54 11 15 2345 6789")


def test_more_than_15_digits_are_refused_though_libphonenumber_accepts_them() -> None:
    # Found by hypothesis: a 16-digit German number that is_valid_number accepts.
    with pytest.raises(InvalidInput, match="phone_number: has more than the 15 digits"):
        parse_phone("+4920100000000000")


@pytest.mark.parametrize(
    ("raw", "masked"), [("+917003848501", "+91******8501"), ("+14155552671", "+1******2671")]
)
def test_masked_number_hides_the_middle(raw: str, masked: str) -> None:
    assert parse_phone(raw).masked == masked


def test_client_package_needs_only_grpcio_protobuf_and_googleapis_common_protos() -> None:
    project = tomllib.loads((CLIENTS / "pyproject.toml").read_text())["project"]
    names = {re.split(r"[<>=!~\[ ]", dep)[0] for dep in project["dependencies"]}
    assert names == {"grpcio", "protobuf", "googleapis-common-protos"}
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
        # google: protobuf's and googleapis-common-protos' google.rpc; nothing of the server's.
        third_party = imported - sys.stdlib_module_names - {"__future__"}
        assert third_party <= {"grpc", "google", "otp", "otp_client"}, module
