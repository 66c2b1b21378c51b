"""Readiness: the gRPC health status follows whether Redis answers, by itself.

Without Redis no RPC can succeed, so a load balancer should send callers elsewhere; the status
comes back to SERVING on the first ping that works, with no operator involved.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence

from grpc_health.v1 import health, health_pb2

from otp_service import metrics
from otp_service.store import Store

log = logging.getLogger(__name__)

PING_INTERVAL_SECONDS = 1.0
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class RedisWatcher:
    """Pings the store about once every ``interval`` seconds and sets the health status."""

    def __init__(
        self,
        store: Store,
        health_servicer: health.aio.HealthServicer,
        services: Sequence[str],
        interval: float = PING_INTERVAL_SECONDS,
    ) -> None:
        self._store = store
        self._health = health_servicer
        self._services = services
        self._interval = interval
        # Why it is NOT_SERVING; None while SERVING (as the server starts).
        self._problem: str | None = None
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._watch(), name="redis-watcher")

    async def stop(self) -> None:
        # The flag as well as the cancel: redis-py can swallow a cancellation that arrives while
        # it sets up a connection, and the watcher must stop all the same.
        self._stopping.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _watch(self) -> None:
        while not self._stopping.is_set():
            loop = asyncio.get_running_loop()
            started = loop.time()
            problem = await self._check()
            if problem is None:
                metrics.REDIS_PING_SECONDS.observe(loop.time() - started)
            metrics.REDIS_UP.set(0 if problem else 1)
            if problem != self._problem:
                if problem is None:
                    log.info("redis answers again: SERVING", extra={"event": "redis_up"})
                else:
                    # Again when the cause changes: a refused port fixed, a wrong password next.
                    log.error(
                        "%s: NOT_SERVING until it answers",
                        problem,
                        extra={"event": "redis_down"},
                    )
                if (problem is None) != (self._problem is None):
                    metrics.READINESS_CHANGES.inc()
                    for service in self._services:
                        await self._health.set(service, _NOT_SERVING if problem else _SERVING)
                self._problem = problem
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._interval):
                    await self._stopping.wait()

    async def _check(self) -> str | None:
        """Why the store cannot serve now; None when it answers. Never raises: whatever goes
        wrong is a reason to be NOT_SERVING, not the end of the watcher."""
        # Bounded by the interval too: a Redis that hangs must not freeze the status.
        try:
            async with asyncio.timeout(self._interval):
                return await self._store.check()
        except TimeoutError:
            return f"redis did not answer within {self._interval:g}s"
        except Exception as exc:
            return f"redis check failed: {type(exc).__name__}: {exc}"
