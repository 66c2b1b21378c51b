"""Per-request context: set by the wrappers around each RPC, read by logs, metrics and the domain.

ContextVars follow the request's task, including the tasks it awaits, so no function needs
extra parameters to know who called and which request it serves.
"""

from __future__ import annotations

from contextvars import ContextVar

# The x-request-id of the call (or one made up for it); "-" outside a request.
request_id: ContextVar[str] = ContextVar("request_id", default="-")
# The authenticated calling service's name; "-" when unknown or not authenticated.
caller: ContextVar[str] = ContextVar("caller", default="-")
# How the call arrived: "grpc", or "http" for a JSON route the gateway serves in this process.
transport: ContextVar[str] = ContextVar("transport", default="grpc")
