"""Which language a template message goes out in: the caller's locale, else the number's country.

WhatsApp approves each language of a template separately and names languages its own way
(``en``, ``en_US``, ``hi``, ``pt_BR``), not in BCP 47 (``en-US``). A caller's locale is mapped
to WhatsApp's code for it: the language with its region when WhatsApp has that variant
(``pt-BR`` -> ``pt_BR``, ``en-GB`` -> ``en_GB``), else the bare language when WhatsApp has it
(``hi-IN`` -> ``hi``, ``fr-CA`` -> ``fr``), else WhatsApp's first variant of the language
(``pt`` -> ``pt_BR``, ``zh`` -> ``zh_CN``); a language WhatsApp does not offer is ignored.
docs/interakt.md has the rules for operators.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from otp_service.errors import InvalidInput
from otp_service.phone import PhoneNumber

# WhatsApp's template languages (Meta: "Supported languages" of message templates).
WHATSAPP_LANGUAGES = frozenset(
    {
        "af",
        "sq",
        "ar",
        "az",
        "bn",
        "bg",
        "ca",
        "zh_CN",
        "zh_HK",
        "zh_TW",
        "hr",
        "cs",
        "da",
        "nl",
        "en",
        "en_GB",
        "en_US",
        "et",
        "fil",
        "fi",
        "fr",
        "ka",
        "de",
        "el",
        "gu",
        "ha",
        "he",
        "hi",
        "hu",
        "id",
        "ga",
        "it",
        "ja",
        "kn",
        "kk",
        "rw_RW",
        "ko",
        "ky_KG",
        "lo",
        "lv",
        "lt",
        "mk",
        "ms",
        "ml",
        "mr",
        "nb",
        "fa",
        "pl",
        "pt_BR",
        "pt_PT",
        "pa",
        "ro",
        "ru",
        "sr",
        "sk",
        "sl",
        "es",
        "es_AR",
        "es_ES",
        "es_MX",
        "sw",
        "sv",
        "ta",
        "te",
        "th",
        "tr",
        "uk",
        "ur",
        "uz",
        "vi",
        "zu",
    }
)
MAX_LOCALE_LENGTH = 35
# BCP 47's language-tag, as far as it matters here: a language, an optional script, an optional
# region (two letters or three digits), then variants and extensions, which are ignored.
_LOCALE = re.compile(
    r"(?P<language>[A-Za-z]{2,3})(?:-[A-Za-z]{4})?(?:-(?P<region>[A-Za-z]{2}|[0-9]{3}))?"
    r"(?:-[A-Za-z0-9]{1,8})*"
)


def check_locale(locale: str) -> None:
    """Raise InvalidInput (field ``locale``) unless ``locale`` is empty or a BCP 47 tag."""
    if locale and (len(locale) > MAX_LOCALE_LENGTH or not _LOCALE.fullmatch(locale)):
        raise InvalidInput(
            "locale", "must be a BCP 47 language tag such as hi-IN or pt-BR (or be left empty)"
        )


def whatsapp_language(locale: str) -> str | None:
    """WhatsApp's code for the language of BCP 47 ``locale``; None when WhatsApp has none."""
    found = _LOCALE.fullmatch(locale)
    if found is None:
        return None
    language = found["language"].lower()
    region = (found["region"] or "").upper()
    for candidate in (f"{language}_{region}", language):
        if candidate in WHATSAPP_LANGUAGES:
            return candidate
    variants = sorted(code for code in WHATSAPP_LANGUAGES if code.startswith(language + "_"))
    return variants[0] if variants else None


class TemplateLanguages:
    """Chooses a send's template language: the locale's, else its calling code's, else the
    default (INTERAKT_TEMPLATE_LANGUAGES, INTERAKT_TEMPLATE_LANGUAGE)."""

    def __init__(self, default: str, by_calling_code: Mapping[str, str]) -> None:
        self.default = default
        self._by_calling_code = dict(by_calling_code)
        # The languages the operator configured: the metric labels' closed set.
        self.configured = frozenset({default, *by_calling_code.values()})

    def choose(self, phone: PhoneNumber, locale: str) -> str:
        if locale:
            chosen = whatsapp_language(locale)
            if chosen is not None:
                return chosen
        return self._by_calling_code.get(phone.country_code[1:], self.default)
