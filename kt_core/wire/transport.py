"""gRPC channels and servers with mutual TLS, shared by every ktfed process.

The certificate material comes from files written by `ktfed pki` (security.pki); this module only
hands them to gRPC. Plaintext exists solely behind an explicit `insecure=True` for local debugging.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import grpc

log = logging.getLogger(__name__)

# Room above the 4 MiB chunk for the message framing; anything larger is refused by gRPC itself.
MAX_MESSAGE_BYTES = 4 * 1024 * 1024 + 64 * 1024

CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    # Detect a vanished peer on an idle task stream within seconds, not at TCP's leisure.
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]
SERVER_OPTIONS = CHANNEL_OPTIONS + [
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.so_reuseport", 0),
]


@dataclass(frozen=True)
class TLSFiles:
    """A process's identity: its certificate and key, and the federation CA it trusts."""

    ca_cert: Path
    cert: Path
    key: Path

    @classmethod
    def from_pki(cls, pki_dir: Path, name: str) -> "TLSFiles":
        pki_dir = Path(pki_dir)
        return cls(pki_dir / "ca.crt", pki_dir / "issued" / f"{name}.crt", pki_dir / "issued" / f"{name}.key")

    def read(self) -> tuple[bytes, bytes, bytes]:
        missing = [str(p) for p in (self.ca_cert, self.cert, self.key) if not Path(p).is_file()]
        if missing:
            raise FileNotFoundError(f"TLS material not found: {', '.join(missing)}")
        return Path(self.ca_cert).read_bytes(), Path(self.cert).read_bytes(), Path(self.key).read_bytes()


def server_credentials(tls: TLSFiles) -> grpc.ServerCredentials:
    ca, cert, key = tls.read()
    # require_client_auth: a client without a certificate of this CA never gets past the handshake.
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=True)


def open_channel(address: str, tls: TLSFiles | None, *, insecure: bool = False) -> grpc.Channel:
    if insecure:
        log.warning("plaintext channel to %s (--insecure): for local debugging only", address)
        return grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
    if tls is None:
        raise ValueError("mutual TLS needs certificate files (or --insecure for local debugging)")
    ca, cert, key = tls.read()
    creds = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)
    return grpc.secure_channel(address, creds, options=CHANNEL_OPTIONS)
