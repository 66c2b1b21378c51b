"""The servers the service is measured against, each run the way the service runs.

``python -m bench.references KIND PORT``, KIND one of:

- ``empty-grpc``: an empty ``grpc.aio`` unary handler, bytes in, nothing out.
- ``grpc-redis``: VerifyOtp doing nothing but its one Redis round trip. It parses the
  VerifyOtpRequest, runs the product's verify script once through the product's own store and
  Redis connection (``build_deps``, as ``otp-service serve`` builds them) and answers the
  VerifyOtpResponse. What the service could be if it did nothing else.
- ``grpc-protocol``: the same, with the same store over ``bench.protocol_redis.ProtocolRedis``
  instead of the product's connection: the yardstick for that connection.
- ``empty-http``: an empty aiohttp handler answering ``{}``.
- ``http-redis``: REST verify doing nothing but its round trip: the same JSON in, the same
  script through the product's store and connection, the same JSON and HTTP status out.

Every one runs on the service's event loop (uvloop, ``run_event_loop``); the gRPC ones with its
server options, the aiohttp ones without an access log, as the gateway. The Redis ones read the
service's own configuration from the environment (the bench starts them with the service's),
so the script gets the keys and arguments the service would give it and takes the same path.
They take the number as sent, which must be E.164 (the bench's is): parsing it is the service's
own work, as are authentication, the request log and metrics, which these leave out.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from aiohttp import web
from otp.v1 import otp_pb2

from bench.protocol_redis import ProtocolRedis
from otp_service.cli import run_event_loop
from otp_service.config import Settings
from otp_service.gateway import ROUTES
from otp_service.results import VerifyResult
from otp_service.server import build_deps, build_service, server_options
from otp_service.store import RedisStore

GRPC_METHOD = "/bench.Empty/Call"
HTTP_PATH = "/empty"
VERIFY_METHOD = "/otp.v1.OtpService/VerifyOtp"
VERIFY_PATH = "/api/v1/auth/verify-otp"
# The legacy route's rule for the status of an answer that is not a success.
[_not_verified] = [route.failure for route in ROUTES if route.path == VERIFY_PATH]
assert _not_verified is not None

_Verify = Callable[[str, str], Awaitable[VerifyResult]]


async def _verifier(*, protocol: bool = False) -> _Verify:
    """``verify(phone, code)``: the product's store.verify with the digest the service sends.

    With ``protocol``, the same store over the minimal Protocol client instead of the product's
    connection.
    """
    settings = Settings.from_env(os.environ)
    assert settings.redis_url is not None
    deps = build_deps(settings, settings.redis_url)
    store = deps.store
    if protocol:
        assert isinstance(store, RedisStore)
        store = RedisStore(await ProtocolRedis.connect(settings.redis_url), store._rules)
    # The service's own digest, made once per number and code: the HMAC is the service's work.
    digest = functools.lru_cache(maxsize=1024)(build_service(settings, deps)._digest)

    def verify(phone: str, code: str) -> Awaitable[VerifyResult]:
        return store.verify(phone, digest(phone, code))

    return verify


async def _serve_grpc(port: int, method: str, handler: grpc.RpcMethodHandler[Any, Any]) -> None:
    server = grpc.aio.server(options=server_options(reuse_port=False))
    service, name = method.strip("/").split("/")
    server.add_registered_method_handlers(service, {name: handler})
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


async def _empty(request: bytes, context: Any) -> bytes:
    return b""


async def serve_empty_grpc(port: int) -> None:
    await _serve_grpc(port, GRPC_METHOD, grpc.unary_unary_rpc_method_handler(_empty))


async def serve_grpc_redis(port: int, *, protocol: bool = False) -> None:
    verify = await _verifier(protocol=protocol)

    async def verify_otp(
        request: otp_pb2.VerifyOtpRequest, context: Any
    ) -> otp_pb2.VerifyOtpResponse:
        result = await verify(request.phone_number, request.otp_code)
        return otp_pb2.VerifyOtpResponse(
            verified=result.verified,
            outcome=result.outcome.value,  # type: ignore[arg-type]
            attempts_remaining=result.attempts_remaining,
        )

    handler = grpc.unary_unary_rpc_method_handler(
        verify_otp,
        request_deserializer=otp_pb2.VerifyOtpRequest.FromString,
        response_serializer=otp_pb2.VerifyOtpResponse.SerializeToString,
    )
    await _serve_grpc(port, VERIFY_METHOD, handler)


async def _serve_http(
    port: int, path: str, handler: Callable[[web.Request], Awaitable[web.Response]]
) -> None:
    app = web.Application()
    app.router.add_post(path, handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    await asyncio.Event().wait()


async def _empty_json(request: web.Request) -> web.Response:
    await request.read()
    return web.json_response({})


async def serve_empty_http(port: int) -> None:
    await _serve_http(port, HTTP_PATH, _empty_json)


async def serve_http_redis(port: int) -> None:
    verify = await _verifier()

    async def verify_otp(request: web.Request) -> web.Response:
        data = json.loads(await request.read())
        result = await verify(data["phone_number"], data["otp_code"])
        # The gateway's JSON for the answer: proto field names, the enum by name; and, for a
        # code that did not verify, the legacy route's 4xx with its message.
        answer: dict[str, Any] = {
            "verified": result.verified,
            "outcome": f"VERIFY_OUTCOME_{result.outcome.name}",
            "attempts_remaining": result.attempts_remaining,
        }
        status, failed = 200, _not_verified(answer)
        if failed is not None:
            status, answer["message"] = failed
        return web.Response(
            status=status, body=json.dumps(answer).encode(), content_type="application/json"
        )

    await _serve_http(port, VERIFY_PATH, verify_otp)


SERVERS: dict[str, Callable[[int], Any]] = {
    "empty-grpc": serve_empty_grpc,
    "grpc-redis": serve_grpc_redis,
    "grpc-protocol": functools.partial(serve_grpc_redis, protocol=True),
    "empty-http": serve_empty_http,
    "http-redis": serve_http_redis,
}


if __name__ == "__main__":
    kind, port = sys.argv[1], int(sys.argv[2])
    run_event_loop(SERVERS[kind](port))  # the loop otp-service runs on
