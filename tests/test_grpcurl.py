"""The real grpcurl binary against the real server: what an operator or another team would run."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from tests.conftest import PHONE, TOKEN, MakeGateway
from tests.fake_interakt import FakeInterakt

GRPCURL = str(Path(sys.executable).parent / "grpcurl")


async def grpcurl(port: int, *command: str, flags: Sequence[str] = ()) -> str:
    """Run ``grpcurl [flags] server command``; its output, failing the test on a non-zero exit."""
    process = await asyncio.create_subprocess_exec(
        GRPCURL,
        "-plaintext",
        *flags,
        f"127.0.0.1:{port}",
        *command,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
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
