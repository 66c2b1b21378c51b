"""The real grpcurl binary against the real server: what an operator or another team would run."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from tests.conftest import PHONE, TOKEN, MakeGateway
from tests.fake_interakt import FakeInterakt

ROOT = Path(__file__).parent.parent
GRPCURL = str(Path(sys.executable).parent / "grpcurl")
BUF = str(ROOT / "tools/node_modules/.bin/buf")
DESCRIPTOR_SET = str(ROOT / "proto/otp.binpb")


async def grpcurl(port: int, *command: str, flags: Sequence[str] = ()) -> str:
    """Run ``grpcurl [flags] server command``; its output, failing the test on a non-zero exit."""
    return await run(GRPCURL, "-plaintext", *flags, f"127.0.0.1:{port}", *command)


async def run(*command: str) -> str:
    process = await asyncio.create_subprocess_exec(
        *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    async with asyncio.timeout(60):
        out, err = await process.communicate()
    assert process.returncode == 0, err.decode()
    return out.decode()


async def test_list_describe_and_a_round_trip(
    make_gateway: MakeGateway, interakt: FakeInterakt
) -> None:
    port = (await make_gateway()).grpc_port
    assert set((await grpcurl(port, "list")).split()) == {
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
        "otp.v1.OtpService",
    }
    described = await grpcurl(port, "describe", "otp.v1.OtpService")
    assert (
        "rpc SendOtp ( .otp.v1.SendOtpRequest ) returns ( .otp.v1.SendOtpResponse );" in described
    )
    assert "rpc VerifyOtp" in described

    auth = ["-H", f"authorization: Bearer {TOKEN}"]
    request = json.dumps({"phone_number": PHONE})
    sent = json.loads(
        await grpcurl(port, "otp.v1.OtpService/SendOtp", flags=[*auth, "-d", request])
    )
    assert sent["channel"] == "CHANNEL_TEXT"
    request = json.dumps({"phone_number": PHONE, "otp_code": interakt.received[0].code})
    verified = json.loads(
        await grpcurl(port, "otp.v1.OtpService/VerifyOtp", flags=[*auth, "-d", request])
    )
    assert verified == {"verified": True, "outcome": "VERIFY_OUTCOME_VERIFIED"}


async def test_buf_curl_over_reflection_v1(
    make_gateway: MakeGateway, interakt: FakeInterakt
) -> None:
    port = (await make_gateway()).grpc_port
    url = f"http://127.0.0.1:{port}"
    # Only the v1 protocol: grpcurl 1.8 asks for v1alpha, so this is what proves v1 is served.
    buf_curl = [BUF, "curl", "--protocol", "grpc", "--http2-prior-knowledge"]
    v1 = [*buf_curl, "--reflect-protocol", "grpc-v1"]
    methods = (await run(*v1, "--list-methods", url)).split()
    assert {"otp.v1.OtpService/SendOtp", "otp.v1.OtpService/VerifyOtp"} <= set(methods)
    # Every service it lists can be described, v1 reflection itself included.
    assert "grpc.reflection.v1.ServerReflection/ServerReflectionInfo" in methods
    sent = await run(
        *v1,
        "-H",
        f"authorization: Bearer {TOKEN}",
        "-d",
        json.dumps({"phone_number": PHONE}),
        f"{url}/otp.v1.OtpService/SendOtp",
    )
    assert json.loads(sent)["channel"] == "CHANNEL_TEXT"


async def test_the_committed_descriptor_set_serves_tools_without_reflection(
    make_gateway: MakeGateway,
) -> None:
    port = (await make_gateway(reflection=False)).grpc_port
    flags = ["-protoset", DESCRIPTOR_SET]
    services = set((await grpcurl(port, "list", flags=flags)).split())
    assert services == {"otp.v1.OtpService", "otp.admin.v1.AdminService"}
    request = json.dumps({"phone_number": PHONE, "otp_code": "123456"})
    auth = ["-H", f"authorization: Bearer {TOKEN}"]
    answer = await grpcurl(
        port, "otp.v1.OtpService/VerifyOtp", flags=[*flags, *auth, "-d", request]
    )
    assert json.loads(answer) == {"outcome": "VERIFY_OUTCOME_NO_ACTIVE_CODE"}
