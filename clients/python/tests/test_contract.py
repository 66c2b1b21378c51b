"""The contract scenario every client runs against a live server (``make test-clients``).

OTP_TARGET and OTP_TOKEN name the server and a caller token; OTP_TEST_NUMBER is one of the
server's OTP_TEST_NUMBERS and OTP_TEST_CODE its code. The number must not have been sent a code
within the server's resend cooldown.
"""

from __future__ import annotations

import os
import time
import uuid

import pytest
from otp_client import (
    Channel,
    DeliveryFailure,
    DeliveryState,
    OtpClient,
    RateLimited,
    Unauthenticated,
    VerifyOutcome,
)

ENV = ("OTP_TARGET", "OTP_TOKEN", "OTP_TEST_NUMBER", "OTP_TEST_CODE")
pytestmark = pytest.mark.skipif(
    not all(os.environ.get(name) for name in ENV), reason=f"needs {', '.join(ENV)}"
)


def test_contract() -> None:
    target, token, number, code = (os.environ[name] for name in ENV)
    wrong = "".join(str((int(digit) + 1) % 10) for digit in code)
    with OtpClient(target, token) as client:
        key = uuid.uuid4().hex
        sent = client.send_otp(number, idempotency_key=key)
        assert sent.channel is Channel.TEST
        # A retry with the same key answers the same, sending nothing.
        assert client.send_otp(number, idempotency_key=key) == sent

        status = client.get_otp_status(number)
        assert (status.state, status.channel, status.verified) == (
            DeliveryState.QUEUED,
            Channel.TEST,
            False,
        )
        assert status.expires_at == sent.expires_at

        result = client.verify_otp(number, wrong)
        assert result.outcome is VerifyOutcome.WRONG_CODE
        assert result.attempts_remaining > 0
        assert client.verify_otp(number, code).verified
        assert client.get_otp_status(number).verified

        with pytest.raises(RateLimited) as limited:
            client.send_otp(number)
        assert limited.value.reason == "RESEND_COOLDOWN"
        assert limited.value.retry_after >= 1

        # A number not on WhatsApp (when the server's Interakt reports one): the failure is typed.
        unreachable = os.environ.get("OTP_UNREACHABLE_NUMBER")
        if unreachable:
            client.send_otp(unreachable)
            deadline = time.monotonic() + 15
            failed = client.get_otp_status(unreachable)
            while failed.state is not DeliveryState.FAILED and time.monotonic() < deadline:
                time.sleep(0.1)
                failed = client.get_otp_status(unreachable)
            assert failed.state is DeliveryState.FAILED
            assert failed.failure is DeliveryFailure.NOT_ON_WHATSAPP
            assert failed.failure_reason

    with OtpClient(target, "not-" + token) as stranger, pytest.raises(Unauthenticated) as refused:
        stranger.send_otp(number)
    assert refused.value.reason == "CALLER_NOT_AUTHENTICATED"
