"""The ceilings: servers that do nothing, run the way the service runs.

``python -m bench.ceilings grpc PORT``: an empty ``grpc.aio`` unary handler (bytes in, nothing
out), on the same event loop (uvloop) and with the same server options as otp-service.
``python -m bench.ceilings http PORT``: an empty aiohttp JSON handler.
"""

from __future__ import annotations

import sys
from typing import Any

import grpc
from aiohttp import web

from otp_service.cli import run_event_loop
from otp_service.server import server_options

GRPC_METHOD = "/bench.Empty/Call"
HTTP_PATH = "/empty"


async def _empty(request: bytes, context: Any) -> bytes:
    return b""


async def serve_grpc(port: int) -> None:
    server = grpc.aio.server(options=server_options(reuse_port=False))
    service, method = GRPC_METHOD.strip("/").split("/")
    handler = grpc.unary_unary_rpc_method_handler(_empty)
    server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler(service, {method: handler})]
    )
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


async def _empty_json(request: web.Request) -> web.Response:
    await request.read()
    return web.json_response({})


def serve_http(port: int) -> None:
    app = web.Application()
    app.router.add_post(HTTP_PATH, _empty_json)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


if __name__ == "__main__":
    kind, port = sys.argv[1], int(sys.argv[2])
    if kind == "grpc":
        run_event_loop(serve_grpc(port))  # the loop otp-service runs on
    else:
        serve_http(port)
