"""The HTTP application assembled from its rooms, and the server that listens with it."""

from __future__ import annotations

from aiohttp import web

from otp_service.auth import Callers
from otp_service.gateway._backends import Backend
from otp_service.gateway._body import MAX_BODY_BYTES
from otp_service.gateway._legacy import add_legacy_routes
from otp_service.gateway._observe import PROTOCOL_LOG, observing
from otp_service.gateway._ops import Readiness, add_ops_routes

_READINESS = web.AppKey("readiness", Readiness)


def create_app(
    backend: Backend, callers: Callers | None = None, *, service_metrics: bool = True
) -> web.Application:
    """The HTTP application, calling the service through ``backend``.

    With ``callers``, /metrics and /openapi.json need a caller token too (OTP_METRICS_AUTH).
    ``service_metrics``: whether OtpService runs in this process (``serve``), so that /metrics
    shows its series; a gateway in front of a remote server shows only its own.
    """
    app = web.Application(client_max_size=MAX_BODY_BYTES)
    readiness = app[_READINESS] = Readiness()
    add_legacy_routes(app, backend)
    add_ops_routes(app, backend, readiness, callers=callers, service_metrics=service_metrics)
    paths = frozenset(resource.canonical for resource in app.router.resources())
    app.middlewares.append(observing(paths, MAX_BODY_BYTES))
    return app


class HttpServer:
    """The HTTP application listening on an address; ``port`` is the one it bound."""

    def __init__(self, runner: web.AppRunner, readiness: Readiness, host: str, port: int) -> None:
        self._runner = runner
        self._readiness = readiness
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
    ) -> HttpServer:
        """Listen on ``address`` ("host:port"; port 0 picks a free one).

        ``reuse_port`` lets the worker processes of ``serve --workers N`` share the port;
        ``callers`` and ``service_metrics`` are ``create_app``'s.
        """
        host, _, port = address.rpartition(":")
        app = create_app(backend, callers, service_metrics=service_metrics)
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
        return cls(runner, app[_READINESS], host, runner.addresses[0][1])

    def unready(self) -> None:
        """From now on /readyz answers 503, whatever the service says: shutdown has begun."""
        self._readiness.shutting_down = True

    async def close(self) -> None:
        """Stop listening and finish the requests in progress (up to the shutdown timeout)."""
        if not self._closed:
            self._closed = True
            await self._runner.cleanup()
