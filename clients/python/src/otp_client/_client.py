"""OtpClient (blocking) and AsyncOtpClient (asyncio): one channel, a caller token, deadlines."""

from __future__ import annotations

import asyncio
import datetime
import enum
import itertools
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Self, TypeVar

import grpc
import grpc.aio
from otp.v1 import otp_pb2, otp_pb2_grpc

from otp_client._errors import OtpError, Unavailable, error_from

# Seconds each call may take unless the call says otherwise: SendOtp waits for WhatsApp's
# provider, which the service gives 5 s by default.
DEFAULT_TIMEOUT = 10.0
# SendOtp is tried this many times at most while it answers UNAVAILABLE: every try carries the
# same idempotency key, so a repeat never sends a second code. All tries share the deadline.
SEND_ATTEMPTS = 3
# The wait before a retry when the service gives none (doubling), and the least time a retry
# must have left to be worth making.
RETRY_BACKOFF_SECONDS = 0.5
_MIN_TRY_SECONDS = 1.0


class Channel(enum.Enum):
    """How a code reached the user (otp.v1.Channel)."""

    UNSPECIFIED = otp_pb2.CHANNEL_UNSPECIFIED
    TEXT = otp_pb2.CHANNEL_TEXT
    TEMPLATE = otp_pb2.CHANNEL_TEMPLATE
    LOG = otp_pb2.CHANNEL_LOG
    TEST = otp_pb2.CHANNEL_TEST


class DeliveryState(enum.Enum):
    """How far a code's message got, as the provider reported it (otp.v1.DeliveryState)."""

    UNSPECIFIED = otp_pb2.DELIVERY_STATE_UNSPECIFIED
    QUEUED = otp_pb2.DELIVERY_STATE_QUEUED
    SENT = otp_pb2.DELIVERY_STATE_SENT
    DELIVERED = otp_pb2.DELIVERY_STATE_DELIVERED
    READ = otp_pb2.DELIVERY_STATE_READ
    FAILED = otp_pb2.DELIVERY_STATE_FAILED


class DeliveryFailure(enum.Enum):
    """Why WhatsApp did not deliver a code's message (otp.v1.DeliveryFailure): NOT_ON_WHATSAPP,
    reach the user another way; TEMPLATE_UNAVAILABLE, the service's operators must fix it;
    RATE_LIMITED, wait or use another channel; EXPIRED, send a new code."""

    UNSPECIFIED = otp_pb2.DELIVERY_FAILURE_UNSPECIFIED
    NOT_ON_WHATSAPP = otp_pb2.DELIVERY_FAILURE_NOT_ON_WHATSAPP
    TEMPLATE_UNAVAILABLE = otp_pb2.DELIVERY_FAILURE_TEMPLATE_UNAVAILABLE
    RATE_LIMITED = otp_pb2.DELIVERY_FAILURE_RATE_LIMITED
    EXPIRED = otp_pb2.DELIVERY_FAILURE_EXPIRED
    UNKNOWN = otp_pb2.DELIVERY_FAILURE_UNKNOWN


class VerifyOutcome(enum.Enum):
    """Why a code was or was not accepted (otp.v1.VerifyOutcome)."""

    UNSPECIFIED = otp_pb2.VERIFY_OUTCOME_UNSPECIFIED
    VERIFIED = otp_pb2.VERIFY_OUTCOME_VERIFIED
    WRONG_CODE = otp_pb2.VERIFY_OUTCOME_WRONG_CODE
    NO_ACTIVE_CODE = otp_pb2.VERIFY_OUTCOME_NO_ACTIVE_CODE
    TOO_MANY_ATTEMPTS = otp_pb2.VERIFY_OUTCOME_TOO_MANY_ATTEMPTS


@dataclass(frozen=True)
class SendResult:
    """A code that was sent: until when it is valid and when the next send is allowed."""

    expires_at: datetime.datetime
    resend_after_seconds: int
    channel: Channel
    message_id: str


@dataclass(frozen=True)
class VerifyResult:
    """The outcome of checking a code; ``attempts_remaining`` is set with WRONG_CODE."""

    outcome: VerifyOutcome
    attempts_remaining: int

    @property
    def verified(self) -> bool:
        return self.outcome is VerifyOutcome.VERIFIED


@dataclass(frozen=True)
class OtpStatus:
    """What became of a number's latest code (GetOtpStatus); never the code itself.

    ``channel`` is UNSPECIFIED and ``message_id`` empty until the provider accepted the
    message; ``failure_reason`` and ``failure`` (UNSPECIFIED otherwise) are set with FAILED;
    ``resend_after_seconds`` is 0 when a new code may be sent now; ``language`` is WhatsApp's
    code of the template's language ("" for a text message).
    """

    state: DeliveryState
    channel: Channel
    message_id: str
    failure_reason: str
    verified: bool
    expires_at: datetime.datetime
    resend_after_seconds: int
    failure: DeliveryFailure = DeliveryFailure.UNSPECIFIED
    language: str = ""


@dataclass(frozen=True)
class Tls:
    """TLS for the channel: the CA to trust (None: the system's), and a client certificate
    and key for mutual TLS. All PEM bytes."""

    root_certificates: bytes | None = None
    certificate_chain: bytes | None = None
    private_key: bytes | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            self.root_certificates, self.private_key, self.certificate_chain
        )


class _Client:
    """What both clients share: the caller token's metadata and the default deadline."""

    def __init__(self, token: str, timeout: float) -> None:
        if not token:
            raise ValueError("token: a caller token is required")
        self._metadata = (("authorization", f"Bearer {token}"),)
        self._timeout = timeout

    def _deadline(self, timeout: float | None) -> float:
        return self._timeout if timeout is None else timeout


def _sent(response: otp_pb2.SendOtpResponse) -> SendResult:
    return SendResult(
        expires_at=response.expires_at.ToDatetime(datetime.UTC),
        resend_after_seconds=response.resend_after_seconds,
        channel=_enum(Channel, response.channel),
        message_id=response.message_id,
    )


def _verified(response: otp_pb2.VerifyOtpResponse) -> VerifyResult:
    return VerifyResult(_enum(VerifyOutcome, response.outcome), response.attempts_remaining)


def _status(response: otp_pb2.GetOtpStatusResponse) -> OtpStatus:
    return OtpStatus(
        state=_enum(DeliveryState, response.state),
        channel=_enum(Channel, response.channel),
        message_id=response.message_id,
        failure_reason=response.failure_reason,
        verified=response.verified,
        expires_at=response.expires_at.ToDatetime(datetime.UTC),
        resend_after_seconds=response.resend_after_seconds,
        failure=_enum(DeliveryFailure, response.failure),
        language=response.language,
    )


def _send_request(
    phone_number: str, idempotency_key: str | None, locale: str
) -> otp_pb2.SendOtpRequest:
    # One key for the logical send, whatever the retries: the service answers a repeat with
    # the first answer and sends nothing.
    key = idempotency_key or uuid.uuid4().hex
    return otp_pb2.SendOtpRequest(phone_number=phone_number, idempotency_key=key, locale=locale)


def _retry_wait(error: OtpError, attempt: int, time_left: float) -> float | None:
    """Seconds to wait before trying SendOtp again after ``error`` on try ``attempt`` (from 0);
    None when it is not tried again: another error, the last try, or no time left."""
    if not isinstance(error, Unavailable) or error.code != grpc.StatusCode.UNAVAILABLE:
        return None  # DEADLINE_EXCEEDED: the deadline of every try has passed
    if attempt + 1 >= SEND_ATTEMPTS:
        return None
    wait = error.retry_after
    if wait is None:
        wait = RETRY_BACKOFF_SECONDS * 2**attempt
    return wait if time_left - wait >= _MIN_TRY_SECONDS else None


_E = TypeVar("_E", Channel, VerifyOutcome, DeliveryState, DeliveryFailure)


def _enum(kind: type[_E], value: int) -> _E:
    # A value added to the proto after this client was built reads as UNSPECIFIED.
    try:
        return kind(value)
    except ValueError:
        return kind.UNSPECIFIED


def _error(exc: grpc.RpcError) -> OtpError:
    # Every RpcError a stub raises is also the grpc.Call that failed.
    call: grpc.Call = exc  # type: ignore[assignment]
    trailing: Sequence[tuple[str, str | bytes]] = tuple(call.trailing_metadata() or ())
    return error_from(call.code(), call.details() or "", trailing)


class OtpClient(_Client):
    """A blocking client of otp.v1.OtpService.

    ``target`` is "host:port"; ``token`` the calling service's token; ``tls`` turns TLS on
    (plaintext without it). Every call has a deadline: ``timeout`` seconds unless the call
    gives its own. Failures raise an ``OtpError`` subclass. ``send_otp`` is retried on
    UNAVAILABLE (at most SEND_ATTEMPTS tries, within its deadline) with one idempotency key, so
    a retry never sends a second code; ``verify_otp`` is never retried: a repeated VerifyOtp
    may count a second attempt.
    """

    def __init__(
        self,
        target: str,
        token: str,
        *,
        tls: Tls | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        super().__init__(token, timeout)
        self._channel = (
            grpc.insecure_channel(target)
            if tls is None
            else grpc.secure_channel(target, tls.credentials())
        )
        self._stub = otp_pb2_grpc.OtpServiceStub(self._channel)

    def send_otp(
        self,
        phone_number: str,
        *,
        timeout: float | None = None,
        idempotency_key: str | None = None,
        locale: str = "",
    ) -> SendResult:
        """Send a new code to ``phone_number`` (E.164, e.g. "+917003848501").

        ``idempotency_key`` names the logical send (a new one is made when None): give the same
        key to call again after an answer was lost, and the service answers what it answered.
        ``locale`` (BCP 47, e.g. "hi-IN") is the user's language, for the template's.
        """
        request = _send_request(phone_number, idempotency_key, locale)
        deadline = time.monotonic() + self._deadline(timeout)
        for attempt in itertools.count():
            try:
                response = self._stub.SendOtp(
                    request, metadata=self._metadata, timeout=deadline - time.monotonic()
                )
            except grpc.RpcError as exc:
                error = _error(exc)
                wait = _retry_wait(error, attempt, deadline - time.monotonic())
                if wait is None:
                    raise error from None
                time.sleep(wait)
                continue
            return _sent(response)
        raise AssertionError("unreachable")  # pragma: no cover

    def get_otp_status(self, phone_number: str, *, timeout: float | None = None) -> OtpStatus:
        """What became of the number's latest code; NotFound when it has no live code."""
        request = otp_pb2.GetOtpStatusRequest(phone_number=phone_number)
        try:
            response = self._stub.GetOtpStatus(
                request, metadata=self._metadata, timeout=self._deadline(timeout)
            )
        except grpc.RpcError as exc:
            raise _error(exc) from None
        return _status(response)

    def verify_otp(
        self, phone_number: str, otp_code: str, *, timeout: float | None = None
    ) -> VerifyResult:
        """Check the code the user typed; a wrong code is a result, not an error."""
        request = otp_pb2.VerifyOtpRequest(phone_number=phone_number, otp_code=otp_code)
        try:
            response = self._stub.VerifyOtp(
                request, metadata=self._metadata, timeout=self._deadline(timeout)
            )
        except grpc.RpcError as exc:
            raise _error(exc) from None
        return _verified(response)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


class AsyncOtpClient(_Client):
    """The same client for asyncio (grpc.aio): ``await client.send_otp(...)``."""

    def __init__(
        self,
        target: str,
        token: str,
        *,
        tls: Tls | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        super().__init__(token, timeout)
        self._channel = (
            grpc.aio.insecure_channel(target)
            if tls is None
            else grpc.aio.secure_channel(target, tls.credentials())
        )
        self._stub = otp_pb2_grpc.OtpServiceStub(self._channel)

    async def send_otp(
        self,
        phone_number: str,
        *,
        timeout: float | None = None,
        idempotency_key: str | None = None,
        locale: str = "",
    ) -> SendResult:
        """Send a new code to ``phone_number`` (E.164, e.g. "+917003848501"); retried as
        ``OtpClient.send_otp`` is."""
        request = _send_request(phone_number, idempotency_key, locale)
        deadline = time.monotonic() + self._deadline(timeout)
        for attempt in itertools.count():
            try:
                response = await self._stub.SendOtp(
                    request, metadata=self._metadata, timeout=deadline - time.monotonic()
                )
            except grpc.RpcError as exc:
                error = _error(exc)
                wait = _retry_wait(error, attempt, deadline - time.monotonic())
                if wait is None:
                    raise error from None
                await asyncio.sleep(wait)
                continue
            return _sent(response)
        raise AssertionError("unreachable")  # pragma: no cover

    async def get_otp_status(self, phone_number: str, *, timeout: float | None = None) -> OtpStatus:
        """What became of the number's latest code; NotFound when it has no live code."""
        request = otp_pb2.GetOtpStatusRequest(phone_number=phone_number)
        try:
            response = await self._stub.GetOtpStatus(
                request, metadata=self._metadata, timeout=self._deadline(timeout)
            )
        except grpc.RpcError as exc:
            raise _error(exc) from None
        return _status(response)

    async def verify_otp(
        self, phone_number: str, otp_code: str, *, timeout: float | None = None
    ) -> VerifyResult:
        """Check the code the user typed; a wrong code is a result, not an error."""
        request = otp_pb2.VerifyOtpRequest(phone_number=phone_number, otp_code=otp_code)
        try:
            response = await self._stub.VerifyOtp(
                request, metadata=self._metadata, timeout=self._deadline(timeout)
            )
        except grpc.RpcError as exc:
            raise _error(exc) from None
        return _verified(response)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()
