"""The ``otp-service`` command: ``otp-service serve [--dev]``."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Sequence

from otp_service.config import DEV_CALLER, DEV_TOKEN, ConfigError, Settings
from otp_service.embedded_redis import EmbeddedRedis, EmbeddedRedisError
from otp_service.server import build_deps, create_server

log = logging.getLogger("otp_service")

EXIT_CONFIG = 2
SHUTDOWN_GRACE_SECONDS = 10.0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="otp-service", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the gRPC server")
    serve.add_argument(
        "--dev",
        action="store_true",
        help="development mode: no configuration needed; starts a private redis-server when "
        "REDIS_URL is unset and writes codes to the log instead of sending them",
    )
    args = parser.parse_args(argv)

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        settings = Settings.from_env(os.environ, dev=args.dev)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"otp-service: configuration error: {problem}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        asyncio.run(serve_forever(settings))
    except EmbeddedRedisError as exc:
        print(f"otp-service: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"otp-service: cannot listen on {settings.grpc_address}: {exc}", file=sys.stderr)
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
            raise OSError("the address is in use or not available")
        await server.start()
        log.info("listening on %s (gRPC)", settings.grpc_address)
        if settings.dev:
            log.warning(
                "DEV MODE: codes are written to this log and NOT sent; never run --dev in "
                "production"
            )
        if not settings.auth_required:
            log.warning(
                "OTP_AUTH=none: caller authentication is OFF, anyone who can connect may call"
            )
        elif settings.dev and settings.client_tokens == ((DEV_CALLER, DEV_TOKEN),):
            log.warning(
                "DEV MODE: no caller token configured, so the fixed dev token is accepted: "
                "send 'authorization: Bearer %s'",
                DEV_TOKEN,
            )

        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await stop.wait()
        log.info("shutting down: draining in-flight RPCs for up to %ss", SHUTDOWN_GRACE_SECONDS)
        await server.stop(SHUTDOWN_GRACE_SECONDS)
    log.info("stopped")
