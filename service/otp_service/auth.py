"""Caller authentication: every OTP call carries ``authorization: Bearer <token>``.

A wrapper around each OtpService method checks the token and puts the caller's name into
``context.caller``; health and reflection are not wrapped, so they stay open for probes and
grpcurl. Tokens come from the settings and from an optional file that is re-read when it
changes, so a token is rotated or revoked without a restart.
Only SHA-256 digests of the tokens are kept, compared in constant time, and never logged.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import time
from collections.abc import Callable
from typing import Any

import grpc

from otp_service import context, metrics
from otp_service.config import read_client_tokens_file
from otp_service.errors import NotAuthenticated
from otp_service.servicer import Behavior, abort

log = logging.getLogger(__name__)

# A rotated file takes effect within this long; checking its mtime on every call would cost a
# system call per request for nothing.
RELOAD_INTERVAL_SECONDS = 1.0
# The same words for every failure, so a caller cannot tell a wrong token from a malformed one.
DENIED = "a valid caller token is required: authorization: Bearer <token>"


def _fingerprint(token: str | bytes) -> bytes:
    # Comparing fixed-length digests leaks nothing about a token's length or prefix.
    return hashlib.sha256(token.encode() if isinstance(token, str) else token).digest()


class Callers:
    """The known callers: configured tokens plus the tokens file's, looked up in constant time."""

    def __init__(
        self,
        tokens: tuple[tuple[str, str], ...],
        file: str | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        kind: str = "caller",
    ) -> None:
        self._static = tuple((name, _fingerprint(token)) for name, token in tokens)
        self._file = file
        self._kind = kind  # whose tokens, for the log: caller, or admin (AdminService)
        self._clock = clock
        self._from_file: tuple[tuple[str, bytes], ...] = ()
        self._file_version: tuple[int, int, int] | None = None
        self._next_check = 0.0
        self._reload()

    def authenticate(self, authorization: list[str]) -> str | None:
        """The caller named by the ``authorization`` values (metadata or HTTP headers), or None.

        A refusal is counted by why; the caller is told nothing of it.
        """
        reason, name = "ok", None
        if not authorization:
            reason = "missing"
        else:
            scheme, _, token = authorization[0].partition(" ")
            if len(authorization) > 1 or scheme.lower() != "bearer" or not token.strip():
                reason = "malformed"
            else:
                name = self.lookup(token.strip())
                reason = "ok" if name is not None else "unknown"
        if name is None:
            metrics.child(metrics.AUTH_FAILURES, reason).inc()
        return name

    def lookup(self, token: str | bytes) -> str | None:
        """The name of the caller whose token this is, or None."""
        if self._file is not None and self._clock() >= self._next_check:
            self._reload()
        presented = _fingerprint(token)
        found = None
        # No early exit: the time taken does not depend on which entry, if any, matched.
        for name, fingerprint in (*self._static, *self._from_file):
            if hmac.compare_digest(presented, fingerprint):
                found = name
        return found

    def _reload(self) -> None:
        """Read the file again if it changed. Fails closed: a malformed line is skipped and a file
        that cannot be read counts as empty, so taking a token out of it always revokes it."""
        if self._file is None:
            return
        self._next_check = self._clock() + RELOAD_INTERVAL_SECONDS
        try:
            stat = os.stat(self._file)
            version = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
            if version == self._file_version:
                return
            tokens, problems = read_client_tokens_file(self._file)
        except OSError as exc:
            self._from_file = ()
            self._file_version = None  # so the next check reads it again, and says so again
            log.error(
                "%s tokens file %s cannot be read (%s): none of its tokens is accepted until "
                "it can",
                self._kind,
                self._file,
                type(exc).__name__,
                extra={"event": "tokens_file_unreadable"},
            )
            return
        self._file_version = version
        self._from_file = tuple((name, _fingerprint(token)) for name, token in tokens)
        for problem in problems:
            log.error(
                "%s tokens file %s: %s; that line is skipped",
                self._kind,
                self._file,
                problem,
                extra={"event": "tokens_file_bad_line"},
            )
        log.info(
            "%s tokens loaded from %s: %s",
            self._kind,
            self._file,
            ", ".join(sorted({name for name, _ in tokens})) or "none",
            extra={"event": "tokens_loaded"},
        )


class CallerAuth:
    """Refuses calls without a known caller token with UNAUTHENTICATED; names the caller."""

    def __init__(self, callers: Callers, denied: str = DENIED) -> None:
        self._callers = callers
        self._denied = denied

    def wrap(self, rpc: str, behavior: Behavior) -> Behavior:
        """``behavior`` behind the token check (see servicer.wrap_methods)."""

        async def authenticated(request: Any, ctx: grpc.aio.ServicerContext[Any, Any]) -> Any:
            metadata = ctx.invocation_metadata() or ()
            values = [str(v) for k, v in metadata if k == "authorization"]
            name = self._callers.authenticate(values)
            if name is None:
                await abort(ctx, NotAuthenticated(self._denied))
            context.caller.set(name)
            return await behavior(request, ctx)

        return authenticated
