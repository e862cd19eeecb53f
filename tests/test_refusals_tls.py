"""Failed TLS handshakes against a real coordinator process. A client with a certificate of another
CA, an expired certificate of the federation's CA, or none at all never gets past gRPC's core: no
call exists. The core writes the reason (without the peer) to the process's stderr, which the
coordinator taps (coordinator/core_log.py): each failed handshake is logged and recorded as a
refusal, the line still reaches stderr, and the coordinator serves on. If gRPC stops writing that
line, this test fails: the tap would then see nothing."""
from __future__ import annotations

import datetime

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from kt_core.wire import convert, transport
from kt_core.wire import federation_pb2 as pb
from kt_core.wire.federation_pb2_grpc import ParticipantServiceStub
from ktfed.launcher import make_pki
from tests.conftest import fast_config


def _expired(pki) -> tuple[bytes, bytes]:
    """A key and a certificate for site-a, signed by the federation's CA, that expired yesterday."""
    ca = x509.load_pem_x509_certificate((pki / "ca.crt").read_bytes())
    ca_key = serialization.load_pem_private_key((pki / "ca.key").read_bytes(), None)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "site-a")]))
            .issuer_name(ca.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=10)).not_valid_after(now - datetime.timedelta(days=1))
            .sign(ca_key, hashes.SHA256()))
    return (key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()), cert.public_bytes(serialization.Encoding.PEM))


def test_failed_handshakes_are_logged_and_recorded_and_reach_stderr(federation, tmp_path):
    federation.start_coordinator(federation.write_config(fast_config()))
    federation.wait_serving()
    ca = (federation.pki / "ca.crt").read_bytes()
    make_pki(tmp_path / "other", ["site-a"])
    _, other_cert, other_key = transport.TLSFiles.from_pki(tmp_path / "other", "site-a").read()
    expired_key, expired_cert = _expired(federation.pki)
    clients = {"unable to get local issuer certificate": grpc.ssl_channel_credentials(ca, other_key, other_cert),
               "certificate has expired": grpc.ssl_channel_credentials(ca, expired_key, expired_cert),
               "PEER_DID_NOT_RETURN_A_CERTIFICATE": grpc.ssl_channel_credentials(ca)}
    for reason, credentials in clients.items():
        with grpc.secure_channel(federation.address, credentials, options=transport.CHANNEL_OPTIONS) as channel:
            with pytest.raises(grpc.RpcError) as info:
                ParticipantServiceStub(channel).Join(pb.JoinRequest(header=convert.header(site_id="site-a")),
                                                     timeout=10)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE, (reason, info.value.details())
    out = federation.workdir / "logs" / "coordinator.out"
    federation.wait_for(lambda: all("Handshake failed with error SSL_ERROR_SSL" in _line(out.read_text(), reason)
                                    for reason in clients), 10, "gRPC core's line for each failed handshake")
    def recorded():
        return [r for (r,) in federation.db().execute("SELECT reason FROM refusals WHERE method = 'TLS'")]

    federation.wait_for(lambda: all(any(reason in r for r in recorded()) for reason in clients), 10,
                        "a recorded refusal for each failed handshake")
    rows = federation.db().execute("SELECT peer, code FROM refusals WHERE method = 'TLS'").fetchall()
    assert set(rows) == {("(failed TLS handshake)", "UNAUTHENTICATED")}
    for reason in clients:
        assert reason in _line(federation.log(), reason) and "refused a TLS connection" in federation.log()
    assert federation.client.serving()


def _line(text: str, reason: str) -> str:
    return next((line for line in text.splitlines() if reason in line), "")
