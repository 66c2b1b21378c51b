"""Where the HTTP side's calls go: the service in this process, or a gRPC server elsewhere."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from typing import Any, NoReturn, Protocol

import grpc
from google.protobuf.message import Message
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from otp.v1 import otp_pb2_grpc

from otp_service import context
from otp_service.server import SERVICE_NAME
from otp_service.servicer import (
    SERVICE,
    SHUTTING_DOWN,
    Behavior,
    InFlight,
    ended_by_grace,
    status_for,
)

# Safety net only: the service bounds its own work (Redis and Interakt timeouts) well below this.
RPC_DEADLINE_SECONDS = 30.0
READY_CHECK_SECONDS = 1.0

Metadata = Sequence[tuple[str, str | bytes]]
_READY = health_pb2.HealthCheckRequest(service=SERVICE_NAME)


class RpcFailure(Exception):
    """A call that ended with a status other than OK: its code, message and trailing metadata."""

    def __init__(self, code: grpc.StatusCode, message: str, trailing_metadata: Metadata) -> None:
        super().__init__(code, message)
        self.code = code
        self.message = message
        self.trailing_metadata = trailing_metadata


class Backend(Protocol):
    """Where the gateway's calls go."""

    async def call(self, rpc: str, request: Message, metadata: Metadata) -> Message:
        """The answer of OtpService method ``rpc``; raise RpcFailure for any other status."""

    async def ready(self) -> bool:
        """Whether the service reports SERVING (the gRPC health status, the one truth)."""


class RemoteBackend:
    """A gRPC server over ``channel``: ``otp-service gateway --target``."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        stub = otp_pb2_grpc.OtpServiceStub(channel)
        self._calls = {method.name: getattr(stub, method.name) for method in SERVICE.methods}
        self._health: Any = health_pb2_grpc.HealthStub(channel)  # its typing stub lacks methods
        # Calls waiting for the server: at shutdown, those still waiting as the grace ends are
        # answered as the service itself would answer them (it may still finish them).
        self.in_flight = InFlight()

    async def call(self, rpc: str, request: Message, metadata: Metadata) -> Message:
        try:
            with self.in_flight.tracking():
                response: Message = await self._calls[rpc](
                    request, metadata=metadata, timeout=RPC_DEADLINE_SECONDS
                )
        except grpc.aio.AioRpcError as exc:
            trailing = tuple(exc.trailing_metadata() or ())
            raise RpcFailure(exc.code(), exc.details() or "", trailing) from None
        except asyncio.CancelledError:
            if not ended_by_grace():
                raise
            status = rpc_status.to_status(status_for(SHUTTING_DOWN))
            raise RpcFailure(status.code, status.details, status.trailing_metadata) from None
        return response

    async def ready(self) -> bool:
        # Asking over the channel also proves the remote server answers at all.
        try:
            answer = await self._health.Check(_READY, timeout=READY_CHECK_SECONDS)
        except grpc.aio.AioRpcError:
            return False
        return bool(answer.status == health_pb2.HealthCheckResponse.SERVING)


class LocalBackend:
    """The server's own wrapped methods, called in this process: ``otp-service serve``.

    The same behaviours a gRPC call runs (request log, metrics, caller auth, errors as
    statuses), without a second trip through gRPC over loopback, which was most of a REST
    call's cost (bench/README.md). aiohttp runs each request in a task of its own with a copy
    of the context, as gRPC does each call, so what a call sets (its caller, its request id)
    is not seen by the next request on the same keep-alive connection.
    """

    def __init__(
        self, behaviors: Mapping[str, Behavior], health: health.aio.HealthServicer
    ) -> None:
        self._behaviors = behaviors
        self._health = health

    async def call(self, rpc: str, request: Message, metadata: Metadata) -> Message:
        # The request line says how the call came in.
        context.transport.set("http")
        response: Message = await self._run(self._behaviors[rpc], request, metadata)
        return response

    async def ready(self) -> bool:
        try:
            answer = await self._run(self._health.Check, _READY, ())
        except RpcFailure:
            return False
        return bool(answer.status == health_pb2.HealthCheckResponse.SERVING)

    @staticmethod
    async def _run(
        behavior: Callable[[Any, Any], Coroutine[Any, Any, Any]], request: Any, metadata: Metadata
    ) -> Any:
        call = _LocalCall(metadata)
        try:
            return await behavior(request, call)
        except grpc.aio.AbortError:
            raise RpcFailure(call.code(), call.details, call.trailing_metadata) from None


class _LocalCall:
    """What the wrapped behaviours use of a gRPC ServicerContext, for a call made in-process."""

    def __init__(self, metadata: Metadata) -> None:
        self._metadata = tuple(metadata)
        self._deadline = time.monotonic() + RPC_DEADLINE_SECONDS
        self._code = grpc.StatusCode.OK
        self.details = ""
        self.trailing_metadata: Metadata = ()

    def invocation_metadata(self) -> Metadata:
        return self._metadata

    def time_remaining(self) -> float:
        return max(0.0, self._deadline - time.monotonic())

    def code(self) -> grpc.StatusCode:
        return self._code

    def done(self) -> bool:
        return False  # a call in process ends with its handler

    async def abort(
        self, code: grpc.StatusCode, details: str = "", trailing_metadata: Metadata = ()
    ) -> NoReturn:
        self._code, self.details, self.trailing_metadata = code, details, trailing_metadata
        raise grpc.aio.AbortError(f"aborted with {code.name}")
