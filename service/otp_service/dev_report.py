"""``otp-service dev report PHONE STATE``: post a delivery report as Interakt would, signed.

Development has no Interakt to report on its messages, so without this GetOtpStatus would stay
QUEUED and the webhook could not be tried. The command finds the number's latest message (its
id, from GetOtpStatus as the dev caller sees it), posts a report of it to the running server's
``POST /webhooks/interakt`` signed with the server's INTERAKT_WEBHOOK_SECRET (the dev server's
built-in one unless set), and prints what GetOtpStatus says once the report is applied.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
import urllib.error
import urllib.request
from datetime import UTC, datetime

import grpc
from otp.v1 import otp_pb2, otp_pb2_grpc

from otp_service.config import DEV_TOKEN, Settings
from otp_service.gateway import SIGNATURE_HEADER, WEBHOOK_PATH
from otp_service.phone import parse_phone

# The states a report can carry, as Interakt names them (type message_api_<state>).
STATES = ("sent", "delivered", "read", "failed")
# How long the command waits for the server's workers to apply the report.
APPLIED_WITHIN_SECONDS = 3.0
_CALL_SECONDS = 5.0


class ReportError(Exception):
    """Why the report could not be made; the message is the one line the command prints."""


def report(
    settings: Settings,
    phone: str,
    state: str,
    *,
    error_code: int | None = None,
    reason: str = "",
    token: str = DEV_TOKEN,
) -> str:
    """Post a signed ``state`` report on ``phone``'s latest message; GetOtpStatus after it."""
    number = parse_phone(phone)
    if not settings.interakt_webhook_secret:
        raise ReportError("INTERAKT_WEBHOOK_SECRET is not set: the server takes no reports")
    if not settings.http_address:
        raise ReportError("OTP_HTTP_ADDRESS is empty: the server has no webhook to post to")
    with grpc.insecure_channel(_local(settings.grpc_address)) as channel:
        status = _status(otp_pb2_grpc.OtpServiceStub(channel), number.e164, token)
        if not status.message_id:
            raise ReportError(f"{number.e164}'s latest code has no message id to report on")
        message: dict[str, object] = {
            "id": status.message_id,
            "message_status": state.capitalize(),
        }
        if state == "failed":
            message["channel_failure_reason"] = reason or "Message failed (otp-service dev report)"
            if error_code is not None:
                message["channel_error_code"] = error_code
        body = json.dumps(
            {
                "version": "1.0",
                "timestamp": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f"),
                "type": f"message_api_{state}",
                "data": {
                    "customer": {
                        "channel_phone_number": number.e164.lstrip("+"),
                        "country_code": number.country_code,
                        "phone_number": number.national_number,
                    },
                    "message": message,
                },
            }
        ).encode()
        _post(settings, body)
        wanted = otp_pb2.DeliveryState.Value(f"DELIVERY_STATE_{state.upper()}")
        deadline = time.monotonic() + APPLIED_WITHIN_SECONDS
        while status.state != wanted and time.monotonic() < deadline:
            time.sleep(0.05)
            status = _status(otp_pb2_grpc.OtpServiceStub(channel), number.e164, token)
    state_name = otp_pb2.DeliveryState.Name(status.state).removeprefix("DELIVERY_STATE_")
    line = f"reported {state} on message {status.message_id}; GetOtpStatus says {state_name}"
    if status.failure:
        failure = otp_pb2.DeliveryFailure.Name(status.failure).removeprefix("DELIVERY_FAILURE_")
        line += f" ({failure})"
    return line


def _status(
    stub: otp_pb2_grpc.OtpServiceStub, phone: str, token: str
) -> otp_pb2.GetOtpStatusResponse:
    try:
        return stub.GetOtpStatus(
            otp_pb2.GetOtpStatusRequest(phone_number=phone),
            metadata=(("authorization", f"Bearer {token}"),),
            timeout=_CALL_SECONDS,
        )
    except grpc.RpcError as exc:
        raise ReportError(f"GetOtpStatus: {exc.code().name}: {exc.details()}") from None


def _post(settings: Settings, body: bytes) -> None:
    signature = hmac.new(settings.interakt_webhook_secret.encode(), body, hashlib.sha256)
    request = urllib.request.Request(
        f"http://{_local(settings.http_address)}{WEBHOOK_PATH}",
        data=body,
        headers={
            "Content-Type": "application/json",
            SIGNATURE_HEADER: f"sha256={signature.hexdigest()}",
        },
    )
    try:
        with urllib.request.urlopen(request, timeout=_CALL_SECONDS):  # noqa: S310
            pass
    except urllib.error.HTTPError as exc:
        raise ReportError(f"{WEBHOOK_PATH} answered {exc.code}: {exc.read().decode()}") from None
    except OSError as exc:
        raise ReportError(f"{WEBHOOK_PATH}: {exc}") from None


def _local(address: str) -> str:
    """Where to reach a server listening on ``address`` from this machine."""
    host, _, port = address.rpartition(":")
    if host in ("0.0.0.0", "", "[::]"):  # noqa: S104 (listening everywhere: reach it on loopback)
        host = "127.0.0.1"
    return f"{host}:{port}"
