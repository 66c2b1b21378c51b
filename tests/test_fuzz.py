"""Random input at both RPCs: always a well-formed status, and refusals change nothing in Redis."""

from __future__ import annotations

import asyncio
import string

import grpc
import redis
from google.rpc import error_details_pb2, status_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from otp.v1 import otp_pb2

from otp_service.server import MAX_MESSAGE_BYTES
from tests.conftest import PHONE, TOKEN, MakeServer, redis_snapshot

# What a caller may get; UNKNOWN or INTERNAL would mean a request reached code that did not
# expect it, and DEADLINE_EXCEEDED that the server hung.
EXPECTED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}

sizes = st.integers(min_value=0, max_value=6_000)
texts = st.one_of(
    st.text(max_size=50),
    st.text(alphabet="+0123456789 -()", max_size=40),
    st.sampled_from([PHONE, "+14155552671", "+442071838750", "+8613800138000", "+91", "+"]),
    st.builds(lambda digit, n: "+" + digit * n, st.sampled_from("0179"), sizes),
)
codes = st.one_of(
    st.text(max_size=20), st.text(alphabet="0123456789", max_size=12), sizes.map("1".__mul__)
)
tokens = st.one_of(
    st.just(TOKEN),
    st.just(TOKEN),
    st.text(alphabet=string.ascii_letters + string.digits + "-_.:/ ", max_size=60),
)
calls = st.one_of(
    st.tuples(
        st.just("SendOtp"),
        st.builds(lambda p: otp_pb2.SendOtpRequest(phone_number=p).SerializeToString(), texts),
    ),
    st.tuples(
        st.just("VerifyOtp"),
        st.builds(
            lambda p, c: otp_pb2.VerifyOtpRequest(phone_number=p, otp_code=c).SerializeToString(),
            texts,
            codes,
        ),
    ),
    st.tuples(st.sampled_from(["SendOtp", "VerifyOtp"]), st.binary(max_size=6_000)),
)


async def test_random_requests_get_a_well_formed_status_and_refusals_change_nothing(
    make_server: MakeServer, redis_db: redis.Redis
) -> None:
    server = await make_server()
    # Hypothesis drives a blocking client from a thread; the server keeps serving on this loop.
    await asyncio.to_thread(_fuzz, f"127.0.0.1:{server.port}", redis_db)


def _fuzz(target: str, db: redis.Redis) -> None:
    with grpc.insecure_channel(target) as channel:

        @settings(
            max_examples=300,
            deadline=None,
            database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        )
        @given(call=calls, token=tokens)
        def one_call(call: tuple[str, bytes], token: str) -> None:
            method, body = call
            before = redis_snapshot(db)
            rpc = channel.unary_unary(f"/otp.v1.OtpService/{method}")
            try:
                rpc(body, metadata=(("authorization", f"Bearer {token}"),), timeout=10)
            except grpc.RpcError as exc:
                code, details = exc.code(), exc.details()  # type: ignore[attr-defined]
                reason = error_reason(exc)
                assert code in EXPECTED, (code, details)
                assert details, code
                # Every refusal of the service names its reason; only gRPC's own size check
                # (before any code of ours runs) answers without one.
                if len(body) <= MAX_MESSAGE_BYTES:
                    assert reason, (method, code, details)
                assert redis_snapshot(db) == before, (method, code, details)

        one_call()


def error_reason(error: grpc.RpcError) -> str:
    """The reason of the otp-service ErrorInfo detail of a failed call, or ""."""
    for key, value in error.trailing_metadata() or ():  # type: ignore[attr-defined]
        if key == "grpc-status-details-bin":
            for detail in status_pb2.Status.FromString(value).details:
                info = error_details_pb2.ErrorInfo()
                if detail.Unpack(info) and info.domain == "otp-service":
                    return info.reason
    return ""
