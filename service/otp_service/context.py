"""Per-request context: set by the wrappers around each RPC, read by logs, metrics and the domain.

ContextVars follow the request's task, including the tasks it awaits, so no function needs
extra parameters to know who called and which request it serves.
"""

from __future__ import annotations

from collections.abc import Callable
from contextvars import ContextVar

# The x-request-id of the call (or one made up for it); "-" outside a request.
request_id: ContextVar[str] = ContextVar("request_id", default="-")
# The authenticated calling service's name; "-" when unknown or not authenticated.
caller: ContextVar[str] = ContextVar("caller", default="-")
# How the call arrived: "grpc", or "http" for a JSON route the gateway serves in this process.
transport: ContextVar[str] = ContextVar("transport", default="grpc")
# Called with the status's name just before the call is aborted, so that the call is logged
# and counted before its caller can see the status (abort sends it at once); set by the
# outermost wrapper (observability), None outside a call.
aborting: ContextVar[Callable[[str], None] | None] = ContextVar("aborting", default=None)
