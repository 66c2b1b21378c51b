"""Phone numbers: validation, E.164 normalisation and Interakt's country-code split."""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

import phonenumbers
from phonenumbers.phonemetadata import PhoneMetadata

from otp_service.errors import InvalidInput

MAX_PHONE_LENGTH = 32
_FIELD = "phone_number"
# A plus and at most 15 digits (ITU-T E.164).
_E164_MAX_LENGTH = 16
# What the contract accepts: a plus, then ASCII digits with optional spaces and dashes. Checked
# before phonenumbers, which would otherwise read letters as keypad digits, drop extensions and
# trailing junk, and accept other scripts' digits: all numbers the caller did not write.
_E164_LIKE = re.compile(r"\+[0-9][0-9 -]*[0-9]")


@dataclass(frozen=True, slots=True)
class PhoneNumber:
    """A valid number in E.164, with the split Interakt wants."""

    e164: str  # "+917003848501"
    country_code: str  # "+91"
    national_number: str  # "7003848501"

    @property
    def masked(self) -> str:
        """The number with all but the country code and last four digits hidden."""
        hidden = len(self.e164) - len(self.country_code) - 4
        return f"{self.country_code}{'*' * max(hidden, 0)}{self.e164[-4:]}"


def parse_phone(raw: str) -> PhoneNumber:
    """Validate ``raw`` as an international number; raise InvalidInput naming the field."""
    if not raw:
        raise InvalidInput(_FIELD, "is required")
    if len(raw) > MAX_PHONE_LENGTH:
        raise InvalidInput(_FIELD, f"must be at most {MAX_PHONE_LENGTH} characters")
    return _parse(raw)


# Parsing costs tens of microseconds and every verify needs it; the same numbers recur.
@functools.lru_cache(maxsize=8192)
def _parse(raw: str) -> PhoneNumber:
    if not _E164_LIKE.fullmatch(raw):
        raise InvalidInput(
            _FIELD, "must be in E.164 form: a leading + and country code, then digits"
        )
    try:
        parsed = phonenumbers.parse(raw, None)
    except phonenumbers.NumberParseException as exc:
        raise InvalidInput(_FIELD, "is not a phone number") from exc
    if not phonenumbers.is_valid_number(parsed):
        raise InvalidInput(_FIELD, "is not a valid phone number")
    e164 = phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164)
    if len(e164) > _E164_MAX_LENGTH:
        # libphonenumber accepts a few longer German numbers; E.164 (and WhatsApp) do not.
        raise InvalidInput(_FIELD, "has more than the 15 digits E.164 allows")
    country = f"+{parsed.country_code}"
    national = e164[len(country) :]
    # The number sent to must be the one written: libphonenumber also rewrites digits (it reads
    # "+1 1 201..." as "+1 201...", and some countries' rules move digits about). Only the
    # national trunk prefix written after the country code ("+44 (0) 20...", "+91 0 70...") is
    # a known slip it may drop; anything else that changes the digits is refused.
    written = raw.replace(" ", "").replace("-", "")
    if written not in (e164, f"{country}{_trunk_prefix(parsed.country_code or 0)}{national}"):
        raise InvalidInput(_FIELD, "is not a valid phone number as written")
    return PhoneNumber(e164=e164, country_code=country, national_number=national)


def _trunk_prefix(country_code: int) -> str:
    """The national (trunk) prefix of the country's main region: "0" for India, "1" for the US."""
    region = phonenumbers.region_code_for_country_code(country_code)
    metadata = PhoneMetadata.metadata_for_region(region)
    return (metadata.national_prefix or "") if metadata is not None else ""
