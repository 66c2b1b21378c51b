"""The HTTP application assembled from its rooms, and the server that listens with it."""

from __future__ import annotations

import asyncio

from aiohttp import web

from otp_service.auth import Callers
from otp_service.gateway._backends import Backend
from otp_service.gateway._body import MAX_BODY_BYTES
from otp_service.gateway._legacy import add_legacy_routes
from otp_service.gateway._observe import PROTOCOL_LOG, observing
from otp_service.gateway._ops import Readiness, add_ops_routes
from otp_service.gateway._webhooks import InteraktWebhook

_READINESS = web.AppKey("readiness", Readiness)


def create_app(
    backend: Backend,
    callers: Callers | None = None,
    *,
    service_metrics: bool = True,
    webhook: InteraktWebhook | None = None,
) -> web.Application:
    """The HTTP application, calling the service through ``backend``.

    With ``callers``, /metrics and /openapi.json need a caller token too (OTP_METRICS_AUTH).
    ``service_metrics``: whether OtpService runs in this process (``serve``), so that /metrics
    shows its series; a gateway in front of a remote server shows only its own. ``webhook``:
    Interakt's delivery reports are received (only where the service runs in this process).
    """
    app = web.Application(client_max_size=MAX_BODY_BYTES)
    readiness = app[_READINESS] = Readiness()
    add_legacy_routes(app, backend)
    add_ops_routes(app, backend, readiness, callers=callers, service_metrics=service_metrics)
    if webhook is not None:
        webhook.add_route(app)
    paths = frozenset(resource.canonical for resource in app.router.resources())
    app.middlewares.append(observing(paths, MAX_BODY_BYTES))
    return app


class HttpServer:
    """The HTTP application listening on an address; ``port`` is the one it bound."""

    def __init__(
        self,
        runner: web.AppRunner,
        readiness: Readiness,
        host: str,
        port: int,
        *,
        webhook: InteraktWebhook | None,
        grace: float,
    ) -> None:
        self._runner = runner
        self._readiness = readiness
        self._webhook = webhook
        self._grace = grace
        self._closed = False
        self.port = port
        self.address = f"{host}:{port}"

    @classmethod
    async def start(
        cls,
        address: str,
        backend: Backend,
        *,
        shutdown_timeout: float,
        reuse_port: bool = False,
        callers: Callers | None = None,
        service_metrics: bool = True,
        webhook: InteraktWebhook | None = None,
    ) -> HttpServer:
        """Listen on ``address`` ("host:port"; port 0 picks a free one).

        ``reuse_port`` lets the worker processes of ``serve --workers N`` share the port;
        ``callers``, ``service_metrics`` and ``webhook`` are ``create_app``'s. On close, requests
        in progress, then the delivery reports waiting, get ``shutdown_timeout`` seconds.
        """
        host, _, port = address.rpartition(":")
        app = create_app(backend, callers, service_metrics=service_metrics, webhook=webhook)
        runner = web.AppRunner(
            app, access_log=None, shutdown_timeout=shutdown_timeout, logger=PROTOCOL_LOG
        )
        await runner.setup()
        try:
            site = web.TCPSite(runner, host.strip("[]"), int(port), reuse_port=reuse_port or None)
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        if webhook is not None:
            webhook.start()
        return cls(
            runner,
            app[_READINESS],
            host,
            runner.addresses[0][1],
            webhook=webhook,
            grace=shutdown_timeout,
        )

    def unready(self) -> None:
        """From now on /readyz answers 503, whatever the service says: shutdown has begun."""
        self._readiness.shutting_down = True

    async def close(self) -> None:
        """Stop listening and finish the requests in progress, then apply the delivery reports
        still waiting, all within the shutdown timeout."""
        if not self._closed:
            self._closed = True
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self._grace
            await self._runner.cleanup()
            if self._webhook is not None:
                await self._webhook.close(max(deadline - loop.time(), 0.0))
