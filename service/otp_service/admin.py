"""Support actions on one phone number: ``otp.admin.v1.AdminService``.

A surface apart from the callers': its own tokens (OTP_ADMIN_TOKENS_FILE, checked by the same
machinery as the callers', so a caller token is unknown here and an admin token unknown on
OtpService), its own service name in the RPC metrics and the request log. Each action is logged
with the admin's name and counted in ``otp_admin_actions_total``. It shows counts, times and
the delivery record; never a code or a digest.
"""

from __future__ import annotations

import logging
from typing import Any

import grpc
from google.protobuf import timestamp_pb2
from otp.admin.v1 import admin_pb2

from otp_service import context, metrics
from otp_service.phone import parse_phone
from otp_service.servicer import Behavior, Wrapper, _with_statuses
from otp_service.store import NumberState, Rules, Store

log = logging.getLogger(__name__)

SERVICE = admin_pb2.DESCRIPTOR.services_by_name["AdminService"]
SERVICE_NAME = SERVICE.full_name
DENIED = "a valid admin token is required: authorization: Bearer <token> (OTP_ADMIN_TOKENS_FILE)"

_Context = grpc.aio.ServicerContext[Any, Any]


class AdminServicer:
    """Implements otp.admin.v1.AdminService on the store."""

    def __init__(self, store: Store, rules: Rules) -> None:
        self._store = store
        self._rules = rules

    async def GetNumberState(
        self, request: admin_pb2.GetNumberStateRequest, ctx: _Context
    ) -> admin_pb2.GetNumberStateResponse:
        phone = parse_phone(request.phone_number)
        state = await self._store.number_state(phone.e164)
        _done("show", phone.masked)
        return _state_message(state, self._rules)

    async def UnlockNumber(
        self, request: admin_pb2.UnlockNumberRequest, ctx: _Context
    ) -> admin_pb2.UnlockNumberResponse:
        phone = parse_phone(request.phone_number)
        wrong, attempts = await self._store.unlock(phone.e164)
        _done("unlock", phone.masked, wrong_codes_cleared=wrong, attempts_cleared=attempts)
        return admin_pb2.UnlockNumberResponse(wrong_codes_cleared=wrong, attempts_cleared=attempts)

    async def CancelCodes(
        self, request: admin_pb2.CancelCodesRequest, ctx: _Context
    ) -> admin_pb2.CancelCodesResponse:
        phone = parse_phone(request.phone_number)
        cancelled = await self._store.cancel_codes(phone.e164)
        _done("cancel", phone.masked, codes_cancelled=cancelled)
        return admin_pb2.CancelCodesResponse(codes_cancelled=cancelled)


def _done(action: str, phone: str, **what: int) -> None:
    """Log and count one admin action, with the admin's name (the token's, from the wrapper)."""
    metrics.child(metrics.ADMIN_ACTIONS, action).inc()
    log.log(
        logging.INFO if action == "show" else logging.WARNING,
        "admin %s: %s %s %s",
        context.caller.get(),
        action,
        phone,
        " ".join(f"{k}={v}" for k, v in what.items()),
        extra={"event": "admin_action", "action": action, "admin": context.caller.get(), **what},
    )


def _state_message(state: NumberState, rules: Rules) -> admin_pb2.GetNumberStateResponse:
    answer = admin_pb2.GetNumberStateResponse(
        live_codes=state.live_codes,
        attempts_used=state.attempts_used,
        max_attempts=rules.max_attempts,
        sends_in_window=state.sends_in_window,
        max_sends_per_hour=rules.max_sends_per_hour,
        wrong_codes_in_window=state.wrong_codes_in_window,
        max_wrong_codes_per_hour=rules.max_failed_verifies_per_hour,
        # Whole seconds, rounded up, as every wait the service tells.
        cooldown_seconds=-(-state.cooldown_ms // 1000),
        locked_seconds=-(-state.paused_ms // 1000),
        hourly_cap_seconds=-(-state.capped_ms // 1000),
    )
    if state.codes_expire_at_ms:
        answer.codes_expire_at.CopyFrom(_timestamp(state.codes_expire_at_ms))
    if state.latest is not None:
        latest = state.latest
        answer.latest_delivery.CopyFrom(
            admin_pb2.LatestDelivery(
                state=latest.state.value,  # type: ignore[arg-type]
                channel=latest.channel.value if latest.channel else 0,  # type: ignore[arg-type]
                message_id=latest.message_id,
                failure_reason=latest.failure_reason,
                expires_at=_timestamp(latest.expires_at_ms),
            )
        )
    return answer


def _timestamp(epoch_ms: int) -> timestamp_pb2.Timestamp:
    timestamp = timestamp_pb2.Timestamp()
    timestamp.FromMilliseconds(epoch_ms)
    return timestamp


def add_to_server(
    servicer: AdminServicer, server: grpc.aio.Server, wrappers: list[Wrapper]
) -> None:
    """Serve ``servicer`` as otp.admin.v1.AdminService, each method inside ``wrappers`` (the
    first outermost) and with errors made statuses as OtpService's are."""
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
    for method in SERVICE.methods:
        behavior: Behavior = _with_statuses(getattr(servicer, method.name))
        for wrap in reversed(wrappers):
            behavior = wrap(method.name, behavior)
        request_type = getattr(admin_pb2, method.input_type.name)
        response_type = getattr(admin_pb2, method.output_type.name)
        handlers[method.name] = grpc.unary_unary_rpc_method_handler(
            behavior,
            request_deserializer=request_type.FromString,
            response_serializer=response_type.SerializeToString,
        )
    server.add_registered_method_handlers(SERVICE_NAME, handlers)
