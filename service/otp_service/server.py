"""Server assembly: the gRPC server with the OTP, health and reflection services."""

from __future__ import annotations

import contextlib
import functools
import os
import re
import sys
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2

from otp_service import admin, metrics
from otp_service.auth import CallerAuth, Callers
from otp_service.breaker import CircuitBreaker
from otp_service.config import Settings
from otp_service.connections.redis_backends import RedisTarget, open_store
from otp_service.key_file import KeyFile
from otp_service.languages import TemplateLanguages
from otp_service.observability import Observability
from otp_service.otp import OtpService
from otp_service.readiness import RedisWatcher
from otp_service.sender import InteraktSender, LogSender, Sender
from otp_service.servicer import (
    SERVICE,
    Behavior,
    InFlight,
    OtpServicer,
    Wrapper,
    add_to_server,
    wrap_methods,
)
from otp_service.store import Rules, Store

SERVICE_NAME = SERVICE.full_name
REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"
# Requests are two short strings; anything bigger is refused by gRPC before our code runs.
MAX_MESSAGE_BYTES = 4 * 1024


class ListenError(OSError):
    """An address the server cannot listen on (in use, not ours, not an address)."""


@dataclass(frozen=True)
class Deps:
    """The outside world the service talks to."""

    store: Store
    sender: Sender

    async def close(self) -> None:
        await self.sender.close()
        await self.store.close()


def build_deps(settings: Settings, redis_url: str) -> Deps:
    """Redis at ``redis_url`` (or the primary the sentinels name); Interakt, or the log in
    development mode."""
    target = RedisTarget(
        url=redis_url,
        timeout=settings.redis_timeout_seconds,
        sentinels=settings.redis_sentinels,
        sentinel_master=settings.redis_sentinel_master,
        sentinel_password=settings.redis_sentinel_password,
        replica_acks=settings.redis_replica_acks,
    )
    store = open_store(target, rules_for(settings))
    sender: Sender
    if settings.dev:
        sender = LogSender()
    else:
        sender = InteraktSender(
            api_key=settings.interakt_api_key,
            base_url=settings.interakt_base_url,
            brand=settings.brand,
            ttl_seconds=settings.ttl_seconds,
            template_name=settings.template_name,
            languages=TemplateLanguages(
                settings.template_language, dict(settings.template_languages)
            ),
            template_button=settings.template_button,
            breaker=CircuitBreaker(
                failures=settings.breaker_failures,
                cooloff_seconds=settings.breaker_cooloff_seconds,
            ),
            api_key_file=KeyFile(settings.interakt_api_key_file, settings.interakt_api_key)
            if settings.interakt_api_key_file
            else None,
        )
    return Deps(store=store, sender=sender)


@dataclass(frozen=True)
class OtpServer:
    """A built, not yet started, server and the port it is bound to."""

    server: grpc.aio.Server
    port: int
    # The wrapped OtpService methods, by name: what the in-process JSON gateway calls.
    behaviors: Mapping[str, Behavior]
    # The domain service itself, for what is not an RPC: Interakt's delivery reports.
    service: OtpService
    # The callers its auth wrapper knows (None with OTP_AUTH=none): /metrics checks the same.
    callers: Callers | None
    health: health.aio.HealthServicer
    redis_watcher: RedisWatcher
    in_flight: InFlight

    async def start(self) -> None:
        await self.server.start()
        self.redis_watcher.start()

    async def unready(self) -> None:
        """Say NOT_SERVING to every health watcher, for good: shutdown has begun.

        The server keeps serving; ``stop`` drains it.
        """
        # Stopped first, so it cannot turn the status back to SERVING.
        await self.redis_watcher.stop()
        await self.health.enter_graceful_shutdown()

    async def stop(self, grace: float) -> None:
        """NOT_SERVING (if not yet), then refuse new RPCs and drain those in flight for ``grace``
        seconds; any still running then (the JSON gateway's in process too) is answered
        UNAVAILABLE with SERVER_SHUTTING_DOWN."""
        await self.unready()
        cut = self.in_flight.cut_before(grace)
        try:
            await self.server.stop(grace)
        finally:
            cut.cancel()


def rules_for(settings: Settings) -> Rules:
    """The per-number limits the store enforces, from the settings."""
    return Rules(
        ttl_seconds=settings.ttl_seconds,
        max_attempts=settings.max_attempts,
        resend_cooldown_seconds=settings.resend_cooldown_seconds,
        max_sends_per_hour=settings.max_sends_per_hour,
        max_failed_verifies_per_hour=settings.max_failed_verifies_per_hour,
        caller_sends_per_minute=settings.caller_sends_per_minute,
        account_sends_per_minute=settings.interakt_sends_per_minute,
    )


def build_service(settings: Settings, deps: Deps) -> OtpService:
    """The domain service wired to ``deps`` with the settings' rules."""
    return OtpService(
        store=deps.store,
        sender=deps.sender,
        secret=settings.otp_secret,
        code_length=settings.code_length,
        store_timeout_seconds=settings.redis_timeout_seconds,
        send_timeout_seconds=settings.interakt_timeout_seconds,
        allowed_countries=settings.allowed_countries,
        test_numbers=dict(settings.test_numbers),
        status_readers=settings.status_readers,
        previous_secret=settings.otp_secret_previous or None,
    )


def server_options(*, reuse_port: bool) -> list[tuple[str, int]]:
    """The gRPC server's options (the bench's empty-handler ceiling uses them too)."""
    return [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        # gRPC turns SO_REUSEPORT on by default, which would let a second copy bind the same
        # port silently; a busy port must be an error unless we fork the workers ourselves.
        ("grpc.so_reuseport", int(reuse_port)),
    ]


async def create_server(settings: Settings, deps: Deps, *, reuse_port: bool = False) -> OtpServer:
    """Build the gRPC server and bind ``settings.grpc_address`` (port 0 picks a free port).

    ``reuse_port`` lets the worker processes of ``serve --workers N`` share one port.
    """
    # Observability outermost: it sets the request id and sees every call, refused ones too.
    in_flight = InFlight()
    wrappers: list[Wrapper] = [Observability(SERVICE_NAME).wrap, in_flight.wrap]
    callers = None
    if settings.auth_required:
        callers = Callers(settings.client_tokens, settings.client_tokens_file)
        wrappers.append(CallerAuth(callers).wrap)
    server = grpc.aio.server(options=server_options(reuse_port=reuse_port))
    service = build_service(settings, deps)
    behaviors = wrap_methods(OtpServicer(service), wrappers)
    add_to_server(behaviors, server)
    if settings.admin_tokens_file is not None:
        # Its own tokens: a caller's token is unknown here, an admin's unknown to OtpService.
        admins = Callers((), settings.admin_tokens_file, kind="admin")
        admin.add_to_server(
            admin.AdminServicer(deps.store, rules_for(settings)),
            server,
            [Observability(admin.SERVICE_NAME).wrap, CallerAuth(admins, admin.DENIED).wrap],
        )
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    if settings.reflection:
        _enable_reflection(server)
    port = _bind(server, settings.grpc_address, _tls_credentials(settings))
    watcher = RedisWatcher(deps.store, health_servicer, ("", SERVICE_NAME))
    metrics.ACCOUNT_SEND_LIMIT.set(settings.interakt_sends_per_minute)
    return OtpServer(
        server=server,
        port=port,
        behaviors=behaviors,
        service=service,
        callers=callers,
        health=health_servicer,
        redis_watcher=watcher,
        in_flight=in_flight,
    )


def _bind(server: grpc.aio.Server, address: str, credentials: grpc.ServerCredentials | None) -> int:
    """Bind ``address``; raise ListenError saying why it cannot be.

    grpcio raises RuntimeError without the reason, after gRPC's core has written the reason to
    stderr in a raw line of its own (``add_port.cc``). That line is caught here instead, so an
    operator sees one clear line: ``cannot listen on ...: Address already in use``.
    """
    captured: list[str] = []
    try:
        with _stderr_captured(captured):
            if credentials is None:
                return server.add_insecure_port(address)
            return server.add_secure_port(address, credentials)
    except RuntimeError:
        # One line per address family tried (0.0.0.0 tries two), not always ending in a newline.
        reason = re.search(
            r"Error in bind for address '[^']*': (.+?)(?=Error in bind|[)\n]|$)", "".join(captured)
        )
        why = reason.group(1).strip() if reason else "gRPC cannot bind it"
        raise ListenError(listen_error(address, "gRPC", "OTP_GRPC_ADDRESS", why)) from None


def listen_error(address: str, side: str, setting: str, why: str) -> str:
    """The one line an operator reads when ``address`` cannot be listened on."""
    return f"cannot listen on {address} ({side}): {why}; set {setting} to a free address"


@contextlib.contextmanager
def _stderr_captured(captured: list[str]) -> Iterator[None]:
    """What C code writes to file descriptor 2 meanwhile goes into ``captured``, not to stderr.

    When the block ends without an exception, the text is passed on to stderr after all, so
    nothing unexpected is lost.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            captured.append(sink.read().decode(errors="replace"))
        if captured[-1]:
            sys.stderr.write(captured[-1])


def _enable_reflection(server: grpc.aio.Server) -> None:
    """Serve server reflection as grpc.reflection.v1 and as its older name, v1alpha.

    grpcio-reflection serves only v1alpha; newer grpcurl, ``buf curl --reflect-protocol
    grpc-v1`` and Postman ask for v1. The two protocols are the same messages under another
    package name (same fields, same numbers), so one servicer answers both.
    """
    _describe_reflection_v1()
    names = (SERVICE_NAME, health.SERVICE_NAME, REFLECTION_V1, reflection.SERVICE_NAME)
    reflection.enable_server_reflection(names, server)
    info = grpc.stream_stream_rpc_method_handler(
        reflection.aio.ReflectionServicer(names).ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
    )
    server.add_registered_method_handlers(REFLECTION_V1, {"ServerReflectionInfo": info})


@functools.cache
def _describe_reflection_v1() -> None:
    """Add grpc.reflection.v1's descriptor, v1alpha's renamed, to the pool reflection serves.

    So a client that lists the services can also describe each one, v1 reflection included.
    """
    file = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(file)
    file.name, file.package = "grpc/reflection/v1/reflection.proto", "grpc.reflection.v1"
    file.ClearField("options")
    for message in file.message_type:
        for field in message.field:
            if field.type_name:
                field.type_name = field.type_name.replace(".v1alpha.", ".v1.")
    for method in file.service[0].method:
        method.input_type = method.input_type.replace(".v1alpha.", ".v1.")
        method.output_type = method.output_type.replace(".v1alpha.", ".v1.")
    descriptor_pool.Default().Add(file)


def _tls_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """TLS when a certificate is configured; mutual TLS when a client CA is too."""
    if settings.tls_cert is None or settings.tls_key is None:
        return None
    with open(settings.tls_key, "rb") as key, open(settings.tls_cert, "rb") as cert:
        pair = (key.read(), cert.read())
    client_ca = None
    if settings.tls_client_ca is not None:
        with open(settings.tls_client_ca, "rb") as ca:
            client_ca = ca.read()
    return grpc.ssl_server_credentials(
        [pair], root_certificates=client_ca, require_client_auth=client_ca is not None
    )
