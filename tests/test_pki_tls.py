"""Real mutual TLS on loopback with the federation PKI's certificates (Python's ssl, no gRPC):
handshakes between roles, another CA's certificate, a revoked client, a participant that tries to serve."""
from __future__ import annotations

import contextlib
import socket
import ssl
import threading
from pathlib import Path

import pytest

from security.pki import identity_from_pem, issue, load_ca_bundle, revoke
from tests.test_pki import other_pki, pki_dir  # noqa: F401  (fixtures)

# ---------------------------------------------------------------- real mutual TLS (no gRPC)

def _server_context(pki_dir: Path, name: str, crl: bool = False) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(pki_dir / "issued" / f"{name}.crt", pki_dir / "issued" / f"{name}.key")
    ctx.load_verify_locations(cadata=load_ca_bundle(pki_dir).decode())
    ctx.verify_mode = ssl.CERT_REQUIRED
    if crl:
        ctx.load_verify_locations(cafile=pki_dir / "crl.pem")
        ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    return ctx


def _client_context(trust_dir: Path, cert_dir: Path, name: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies the server and its hostname
    ctx.load_cert_chain(cert_dir / "issued" / f"{name}.crt", cert_dir / "issued" / f"{name}.key")
    ctx.load_verify_locations(cadata=load_ca_bundle(trust_dir).decode())
    return ctx


@contextlib.contextmanager
def _tls_server(ctx: ssl.SSLContext):
    """Accept one connection on 127.0.0.1, report the verified peer's identity back to the client."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(10)
    outcome: dict = {}

    def serve():
        try:
            conn, _ = listener.accept()
            conn.settimeout(10)
            with ctx.wrap_socket(conn, server_side=True) as tls:
                peer = ssl.DER_cert_to_PEM_cert(tls.getpeercert(binary_form=True)).encode()
                outcome["peer"] = identity_from_pem(peer)
                tls.sendall(f"hello {outcome['peer'].name}".encode())
        except (ssl.SSLError, OSError) as err:
            outcome["error"] = err

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1], outcome
    finally:
        thread.join(10)
        listener.close()


def _talk(port: int, ctx: ssl.SSLContext, server_hostname: str = "localhost") -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname=server_hostname) as tls:
            return tls.recv(100)


@pytest.fixture
def federation(pki_dir: Path) -> Path:
    issue(pki_dir, "coord", "coordinator")
    issue(pki_dir, "site-a", "participant")
    return pki_dir


@pytest.mark.parametrize("hostname", ["localhost", "127.0.0.1"])
def test_mutual_tls_handshake_between_coordinator_and_participant(federation: Path, hostname: str):
    with _tls_server(_server_context(federation, "coord")) as (port, outcome):
        reply = _talk(port, _client_context(federation, federation, "site-a"), hostname)
    assert reply == b"hello site-a"
    assert "error" not in outcome
    assert (outcome["peer"].name, outcome["peer"].role) == ("site-a", "participant")


def test_client_certificate_from_another_ca_is_rejected(federation: Path, other_pki: Path):
    issue(other_pki, "site-a", "participant")  # same name, same CA name: only the key differs
    with _tls_server(_server_context(federation, "coord")) as (port, outcome):
        # Under TLS 1.3 the client finishes its side first and learns of the rejection on read.
        with pytest.raises((ssl.SSLError, ConnectionError)):
            if not _talk(port, _client_context(federation, other_pki, "site-a")):
                raise ConnectionError("server closed the connection")
    assert isinstance(outcome.get("error"), ssl.SSLError)
    assert "peer" not in outcome


def test_crl_is_usable_by_openssl_and_rejects_a_revoked_client(federation: Path):
    revoke(federation, "site-a")
    issue(federation, "site-b", "participant")
    with _tls_server(_server_context(federation, "coord", crl=True)) as (port, outcome):
        with pytest.raises((ssl.SSLError, ConnectionError)):
            if not _talk(port, _client_context(federation, federation, "site-a")):
                raise ConnectionError("server closed the connection")
    assert "revoked" in str(outcome.get("error"))
    with _tls_server(_server_context(federation, "coord", crl=True)) as (port, outcome):
        assert _talk(port, _client_context(federation, federation, "site-b")) == b"hello site-b"


def test_participant_certificate_cannot_serve_tls(federation: Path):
    # clientAuth-only EKU: a stolen participant key cannot impersonate the coordinator.
    issue(federation, "site-b", "participant")
    with _tls_server(_server_context(federation, "site-b")) as (port, _outcome):
        with pytest.raises(ssl.SSLCertVerificationError, match="unsuitable certificate purpose"):
            _talk(port, _client_context(federation, federation, "site-a"), "127.0.0.1")
