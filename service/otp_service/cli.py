"""The ``otp-service`` command: ``otp-service serve [--dev]``, ``otp-service gateway --target``."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Sequence

import grpc

from otp_service.config import ConfigError, Settings
from otp_service.embedded_redis import EmbeddedRedis, EmbeddedRedisError
from otp_service.gateway import HttpServer
from otp_service.observability import configure_logging
from otp_service.server import build_deps, create_server

log = logging.getLogger("otp_service")

EXIT_CONFIG = 2
_WILDCARD_HOSTS = ("", "0.0.0.0", "::", "[::]")  # noqa: S104 - recognised, not bound


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="otp-service", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser(
        "serve", help="run the gRPC server, and the JSON gateway on OTP_HTTP_ADDRESS"
    )
    serve.add_argument(
        "--dev",
        action="store_true",
        help="development mode: no configuration needed; starts a private redis-server when "
        "REDIS_URL is unset, writes codes to the log instead of sending them, and logs "
        "readable text instead of JSON",
    )
    gateway = commands.add_parser(
        "gateway", help="run only the JSON gateway (on OTP_HTTP_ADDRESS) for a remote gRPC server"
    )
    gateway.add_argument("--target", required=True, help="the gRPC server's host:port")
    args = parser.parse_args(argv)

    dev = args.command == "serve" and args.dev
    configure_logging(dev=dev)
    try:
        settings = Settings.from_env(os.environ, dev=dev, gateway_only=args.command == "gateway")
        if args.command == "gateway" and not settings.http_address:
            raise ConfigError(["OTP_HTTP_ADDRESS: the gateway needs an address to listen on"])
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"otp-service: configuration error: {problem}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        if args.command == "gateway":
            asyncio.run(gateway_forever(settings, args.target))
        else:
            asyncio.run(serve_forever(settings))
    except EmbeddedRedisError as exc:
        print(f"otp-service: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"otp-service: {exc}", file=sys.stderr)
        return 1
    return 0


async def serve_forever(settings: Settings) -> None:
    """Run until SIGTERM or SIGINT, then drain in-flight RPCs and release everything."""
    async with contextlib.AsyncExitStack() as stack:
        redis_url = settings.redis_url
        if redis_url is None:
            embedded = stack.enter_context(EmbeddedRedis())
            redis_url = embedded.url
            log.warning("DEV MODE: started a private redis-server at %s", redis_url)
        deps = build_deps(settings, redis_url)
        stack.push_async_callback(deps.close)

        server = await create_server(settings, deps)
        if server.port == 0:
            raise OSError(f"cannot listen on {settings.grpc_address} (gRPC): in use or unavailable")
        if settings.http_address:
            # The gateway calls this server's own port, so its calls pass the same interceptors.
            host = settings.grpc_address.rpartition(":")[0]
            loopback = "127.0.0.1" if host in _WILDCARD_HOSTS else host
            channel = grpc.aio.insecure_channel(f"{loopback}:{server.port}")
            stack.push_async_callback(channel.close)
            http = await _start_http(settings, channel)
            stack.push_async_callback(http.close)
        await server.start()
        log.info("listening on %s (gRPC)", settings.grpc_address)
        if settings.dev:
            log.warning(
                "DEV MODE: codes are written to this log and NOT sent; never run --dev in "
                "production"
            )

        await _until_signal()
        log.info(
            "shutting down: draining in-flight RPCs for up to %ss", settings.shutdown_grace_seconds
        )
        await server.stop(settings.shutdown_grace_seconds)
    log.info("stopped")


async def gateway_forever(settings: Settings, target: str) -> None:
    """Serve the JSON gateway for the gRPC server at ``target`` until SIGTERM or SIGINT."""
    async with grpc.aio.insecure_channel(target) as channel:
        http = await _start_http(settings, channel)
        log.info("forwarding to %s (gRPC)", target)
        await _until_signal()
        log.info("shutting down: finishing requests in progress")
        await http.close()
    log.info("stopped")


async def _start_http(settings: Settings, channel: grpc.aio.Channel) -> HttpServer:
    try:
        http = await HttpServer.start(
            settings.http_address, channel, shutdown_timeout=settings.shutdown_grace_seconds
        )
    except OSError as exc:
        raise OSError(f"cannot listen on {settings.http_address} (HTTP): {exc}") from exc
    log.info("listening on %s (HTTP: JSON gateway, /metrics, /healthz, /readyz)", http.address)
    return http


async def _until_signal() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
