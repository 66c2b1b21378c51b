"""Authentication templates as WhatsApp takes them: the code in the body and in the OTP button,
in the recipient's language, with one fallback to the default language. The fake Interakt
refuses what Meta refuses (tests/fake_interakt.py): a template without its button value, a
language without an approved translation."""

from __future__ import annotations

import logging

import aiohttp
import grpc
import pytest
import redis
from google.rpc import error_details_pb2
from otp.v1 import otp_pb2, otp_pb2_grpc
from prometheus_client import REGISTRY

from otp_service.languages import check_locale, whatsapp_language
from tests.conftest import (
    PHONE,
    MakeGateway,
    MakeService,
    assert_no_code_but_counted,
    redis_snapshot,
    verify,
)
from tests.fake_interakt import FakeInterakt, no_template
from tests.test_error_details import details, error_info, refused

UK_PHONE = "+442071838750"
US_PHONE = "+14155552671"
UAE_PHONE = "+97143020000"


async def send(
    stub: otp_pb2_grpc.OtpServiceStub, phone: str = PHONE, locale: str = ""
) -> otp_pb2.SendOtpResponse:
    return await stub.SendOtp(otp_pb2.SendOtpRequest(phone_number=phone, locale=locale), timeout=10)


def language_sent(interakt: FakeInterakt, index: int = -1) -> str:
    return str(interakt.received[index].body["template"]["languageCode"])


def fallbacks(language: str) -> float:
    value = REGISTRY.get_sample_value(
        "otp_template_language_fallbacks_total", {"language": language}
    )
    return value or 0.0


async def test_a_template_send_carries_the_code_in_its_body_and_its_otp_button(
    make_service: MakeService, interakt: FakeInterakt
) -> None:
    stub = await make_service(template_name="Auth")
    assert (await send(stub)).channel == otp_pb2.CHANNEL_TEMPLATE
    [message] = interakt.received
    template = message.body["template"]
    assert template["bodyValues"] == [message.code]
    assert template["buttonValues"] == {"0": [message.code]}
    assert (await verify(stub, message.code)).verified


async def test_a_template_without_its_button_value_is_refused_as_meta_refuses_it(
    make_service: MakeService, interakt: FakeInterakt, redis_db: redis.Redis
) -> None:
    """INTERAKT_TEMPLATE_BUTTON=false is for an old template without a button only: the fake
    refuses it for an authentication template, as Meta does (131008)."""
    stub = await make_service(template_name="Auth", template_button=False)
    failed = await refused(send(stub), grpc.StatusCode.FAILED_PRECONDITION)
    assert "buttonValues" not in interakt.received[0].body["template"]
    assert error_info(failed).reason == "TEMPLATE_NOT_APPROVED"
    assert "INTERAKT_TEMPLATE_BUTTON" in (failed.details() or "")
    assert "Button at index 0 of type Url requires a parameter" in (failed.details() or "")
    # Interakt answered: the send stays counted, as any refusal.
    assert_no_code_but_counted(redis_db)

    # An old template without a button: sent without it, and refused with it.
    old = await make_service(
        template_name="OldAuth", template_button=False, resend_cooldown_seconds=0
    )
    await send(old)
    assert "buttonValues" not in interakt.received[-1].body["template"]
    assert (await verify(old, interakt.received[-1].code)).verified
    wrong = await make_service(template_name="OldAuth")
    failed = await refused(send(wrong, US_PHONE), grpc.StatusCode.FAILED_PRECONDITION)
    assert "INTERAKT_TEMPLATE_BUTTON=false" in (failed.details() or "")


async def test_the_language_follows_the_country_and_the_locale_wins(
    make_service: MakeService, interakt: FakeInterakt
) -> None:
    stub = await make_service(
        template_name="Auth", template_languages=(("91", "hi"), ("44", "en_GB"))
    )
    await send(stub, PHONE)
    assert language_sent(interakt) == "hi"
    await send(stub, UK_PHONE)
    assert language_sent(interakt) == "en_GB"
    await send(stub, US_PHONE)  # no mapping: the default
    assert language_sent(interakt) == "en"
    # The caller's locale wins over the country, mapped to WhatsApp's codes.
    stub = await make_service(template_name="Auth", template_languages=(("91", "hi"),))
    await send(stub, "+917003848502", locale="pt-BR")
    assert language_sent(interakt) == "pt_BR"
    await send(stub, "+917003848503", locale="en-GB")
    assert language_sent(interakt) == "en_GB"
    assert len(interakt.received) == 5  # each once: every language was approved


async def test_a_language_without_an_approved_translation_falls_back_to_the_default_once(
    make_service: MakeService, interakt: FakeInterakt, caplog: pytest.LogCaptureFixture
) -> None:
    stub = await make_service(template_name="Auth", template_languages=(("971", "ar"),))
    before_ar, before_other = fallbacks("ar"), fallbacks("other")
    caplog.set_level(logging.INFO)
    sent = await send(stub, UAE_PHONE)
    # Refused in Arabic as Interakt refuses it, then sent in the default language.
    assert [m.body["template"]["languageCode"] for m in interakt.received] == ["ar", "en"]
    assert interakt.queued[-1].id == sent.message_id
    assert (await verify(stub, interakt.received[-1].code, UAE_PHONE)).verified
    assert fallbacks("ar") == before_ar + 1
    # A locale WhatsApp has, but the template lacks: counted under "other" (not configured).
    await send(stub, PHONE, locale="fr-CA")
    assert [language_sent(interakt, i) for i in (-2, -1)] == ["fr", "en"]
    assert fallbacks("other") == before_other + 1
    await send(stub, "+917003848509", locale="fr")
    assert fallbacks("other") == before_other + 2
    # Logged once per language, not once per send.
    missing = [r for r in caplog.records if getattr(r, "event", "") == "template_language_missing"]
    assert [r.language for r in missing] == ["ar", "fr"]  # type: ignore[attr-defined]
    # The send's log line and GetOtpStatus name the language it went out in.
    queued = [r for r in caplog.records if getattr(r, "event", "") == "interakt_queued"]
    assert queued[-1].language == "en"  # type: ignore[attr-defined]
    status = await stub.GetOtpStatus(otp_pb2.GetOtpStatusRequest(phone_number=PHONE), timeout=10)
    assert status.language == "en"


async def test_the_fallback_is_tried_once_and_a_default_that_is_missing_is_refused(
    make_service: MakeService, interakt: FakeInterakt, redis_db: redis.Redis
) -> None:
    interakt.approved_templates = {("Auth", "hi")}
    stub = await make_service(template_name="Auth", template_languages=(("44", "en_GB"),))
    failed = await refused(send(stub, UK_PHONE), grpc.StatusCode.FAILED_PRECONDITION)
    assert [language_sent(interakt, i) for i in range(2)] == ["en_GB", "en"]
    assert no_template("Auth", "en") in (failed.details() or "")
    assert error_info(failed).reason == "TEMPLATE_NOT_APPROVED"
    assert_no_code_but_counted(redis_db, UK_PHONE)
    # The default itself missing: no second try in the same language.
    interakt.received.clear()
    await refused(send(stub, US_PHONE), grpc.StatusCode.FAILED_PRECONDITION)
    assert len(interakt.received) == 1


async def test_the_fallback_is_a_request_the_send_budgets_count_first(
    make_service: MakeService, interakt: FakeInterakt
) -> None:
    """With one send a minute left for the caller, the second request is not made: the send
    ends with Interakt's refusal of the first language."""
    interakt.approved_templates = {("Auth", "en")}
    stub = await make_service(
        template_name="Auth", template_languages=(("44", "en_GB"),), caller_sends_per_minute=1
    )
    failed = await refused(send(stub, UK_PHONE), grpc.StatusCode.FAILED_PRECONDITION)
    assert [language_sent(interakt, i) for i in range(len(interakt.received))] == ["en_GB"]
    assert no_template("Auth", "en_GB") in (failed.details() or "")


@pytest.mark.parametrize("locale", ["hi_IN", "english", "h", "hi-", "-IN", "hi-IN-" + "x" * 40])
async def test_a_malformed_locale_is_invalid_argument_naming_it_and_changes_nothing(
    make_service: MakeService, interakt: FakeInterakt, redis_db: redis.Redis, locale: str
) -> None:
    stub = await make_service(template_name="Auth")
    snapshot = redis_snapshot(redis_db)
    failed = await refused(send(stub, locale=locale), grpc.StatusCode.INVALID_ARGUMENT)
    assert (failed.details() or "").startswith("locale: ")
    [bad] = [d for d in details(failed) if isinstance(d, error_details_pb2.BadRequest)]
    assert bad.field_violations[0].field == "locale"
    assert redis_snapshot(redis_db) == snapshot
    assert interakt.received == []


@pytest.mark.parametrize(
    ("locale", "language"),
    [
        ("hi-IN", "hi"),
        ("HI", "hi"),
        ("en-US", "en_US"),
        ("en-IN", "en"),
        ("pt-BR", "pt_BR"),
        ("pt", "pt_BR"),
        ("zh-Hant-TW", "zh_TW"),
        ("zh", "zh_CN"),
        ("es-419", "es"),
        ("fil-PH", "fil"),
        ("tlh", None),
    ],
)
def test_bcp47_locales_map_to_whatsapps_codes(locale: str, language: str | None) -> None:
    check_locale(locale)
    assert whatsapp_language(locale) == language


async def test_the_json_send_takes_a_locale_too(
    make_gateway: MakeGateway, interakt: FakeInterakt, http: aiohttp.ClientSession
) -> None:
    gateway = await make_gateway(template_name="Auth")
    url = gateway.url + "/api/v1/auth/send-otp"
    async with http.post(url, json={"phone_number": PHONE, "locale": "pt-BR"}) as answer:
        assert answer.status == 200
    assert language_sent(interakt) == "pt_BR"
    async with http.post(url, json={"phone_number": US_PHONE, "locale": "pt_BR"}) as answer:
        assert answer.status == 400
        reply = await answer.json()
    assert reply["message"].startswith("locale: must be a BCP 47 language tag")
    assert reply["details"][1]["field_violations"][0]["field"] == "locale"
    assert len(interakt.received) == 1
