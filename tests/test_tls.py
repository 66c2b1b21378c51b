"""TLS and mutual TLS on the gRPC port, with a throwaway CA made for the test."""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from otp.v1 import otp_pb2, otp_pb2_grpc

from tests.conftest import PHONE, TOKEN, MakeGateway, MakeServer


@dataclass(frozen=True)
class Issued:
    """A PEM key and certificate."""

    key: bytes
    cert: bytes


class Authority:
    """A CA that exists only for one test."""

    def __init__(self, name: str) -> None:
        self._key = ec.generate_private_key(ec.SECP256R1())
        self._name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        self.cert = self._build(
            self._name,
            self._key.public_key(),
            [(x509.BasicConstraints(ca=True, path_length=None), True)],
        ).public_bytes(serialization.Encoding.PEM)

    def issue(self, name: str, *, server: bool) -> Issued:
        key = ec.generate_private_key(ec.SECP256R1())
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        extensions: list[tuple[x509.ExtensionType, bool]] = [
            (x509.BasicConstraints(ca=False, path_length=None), True),
            (x509.ExtendedKeyUsage([usage]), False),
        ]
        if server:
            names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            extensions.append((x509.SubjectAlternativeName(names), False))
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        cert = self._build(subject, key.public_key(), extensions)
        return Issued(
            key=key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
            cert=cert.public_bytes(serialization.Encoding.PEM),
        )

    def _build(
        self,
        subject: x509.Name,
        public_key: ec.EllipticCurvePublicKey,
        extensions: list[tuple[x509.ExtensionType, bool]],
    ) -> x509.Certificate:
        now = datetime.datetime.now(datetime.UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self._name)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=1))
        )
        for extension, critical in extensions:
            builder = builder.add_extension(extension, critical=critical)
        return builder.sign(self._key, hashes.SHA256())


@dataclass(frozen=True)
class Pki:
    ca: Authority
    cert: str
    key: str
    ca_file: str


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory: Path = tmp_path_factory.mktemp("pki")
    ca = Authority("otp-service test CA")
    server = ca.issue("otp-service", server=True)
    (directory / "server.key").write_bytes(server.key)
    (directory / "server.crt").write_bytes(server.cert)
    (directory / "ca.crt").write_bytes(ca.cert)
    return Pki(
        ca=ca,
        cert=str(directory / "server.crt"),
        key=str(directory / "server.key"),
        ca_file=str(directory / "ca.crt"),
    )


Connect = Callable[..., Awaitable[otp_pb2_grpc.OtpServiceStub]]


@pytest.fixture
async def connect(make_server: MakeServer) -> AsyncIterator[Connect]:
    """Start a server with ``overrides``; return a stub on a channel with ``credentials``."""
    channels: list[grpc.aio.Channel] = []

    async def open_stub(
        credentials: grpc.ChannelCredentials | None, **overrides: object
    ) -> otp_pb2_grpc.OtpServiceStub:
        server = await make_server(**overrides)
        target = f"127.0.0.1:{server.port}"
        channel = (
            grpc.aio.insecure_channel(target)
            if credentials is None
            else grpc.aio.secure_channel(target, credentials)
        )
        channels.append(channel)
        return otp_pb2_grpc.OtpServiceStub(channel)

    yield open_stub
    for channel in channels:
        await channel.close()


async def verify_call(stub: otp_pb2_grpc.OtpServiceStub) -> otp_pb2.VerifyOtpResponse:
    return await stub.VerifyOtp(
        otp_pb2.VerifyOtpRequest(phone_number=PHONE, otp_code="123456"),
        metadata=(("authorization", f"Bearer {TOKEN}"),),
        timeout=10,
    )


async def test_tls_serves_clients_that_trust_the_ca(connect: Connect, pki: Pki) -> None:
    tls = {"tls_cert": pki.cert, "tls_key": pki.key}
    stub = await connect(grpc.ssl_channel_credentials(root_certificates=pki.ca.cert), **tls)
    answer = await verify_call(stub)
    assert answer.outcome == otp_pb2.VERIFY_OUTCOME_NO_ACTIVE_CODE

    plaintext = await connect(None, **tls)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await verify_call(plaintext)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_mutual_tls_admits_only_clients_with_a_certificate_from_the_ca(
    connect: Connect, pki: Pki
) -> None:
    mtls = {"tls_cert": pki.cert, "tls_key": pki.key, "tls_client_ca": pki.ca_file}
    client = pki.ca.issue("billing", server=False)
    stub = await connect(
        grpc.ssl_channel_credentials(
            root_certificates=pki.ca.cert, private_key=client.key, certificate_chain=client.cert
        ),
        **mtls,
    )
    answer = await verify_call(stub)
    assert answer.outcome == otp_pb2.VERIFY_OUTCOME_NO_ACTIVE_CODE

    stranger = Authority("someone else's CA").issue("billing", server=False)
    for credentials in (
        grpc.ssl_channel_credentials(root_certificates=pki.ca.cert),
        grpc.ssl_channel_credentials(
            root_certificates=pki.ca.cert,
            private_key=stranger.key,
            certificate_chain=stranger.cert,
        ),
    ):
        refused_stub = await connect(credentials, **mtls)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await verify_call(refused_stub)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_json_gateway_in_serve_works_beside_mutual_tls(
    make_gateway: MakeGateway, http: aiohttp.ClientSession, pki: Pki
) -> None:
    # The in-process gateway needs no port of its own, plaintext or otherwise, to reach it.
    gateway = await make_gateway(tls_cert=pki.cert, tls_key=pki.key, tls_client_ca=pki.ca_file)
    body = {"phone_number": PHONE, "otp_code": "123456"}
    async with http.post(gateway.url + "/api/v1/auth/verify-otp", json=body) as answer:
        assert answer.status == 400  # the service's answer: no code waits for the number
        assert (await answer.json())["outcome"] == "VERIFY_OUTCOME_NO_ACTIVE_CODE"
