"""gRPC channels and servers with mutual TLS, shared by every ktfed process.

The certificate material comes from files written by `ktfed pki` (security.pki); this module only
hands them to gRPC. Plaintext exists solely behind an explicit `insecure=True` for local debugging.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import grpc

log = logging.getLogger(__name__)

# Room above the 4 MiB chunk for the message framing; anything larger is refused by gRPC itself.
MAX_MESSAGE_BYTES = 4 * 1024 * 1024 + 64 * 1024

CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    # Detect a vanished peer on an idle assignment stream within seconds, not at TCP's leisure.
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]
SERVER_OPTIONS = CHANNEL_OPTIONS + [
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.so_reuseport", 0),
    # BDP probing grows every stream's flow-control window under load, and the coordinator's
    # memory with it (bench/scale.py). The window always covers the message being read, so a
    # chunk still arrives at link speed; the lookahead is only what may arrive beyond it, held
    # in memory per upload in flight.
    ("grpc.http2.bdp_probe", 0),
    ("grpc.http2.lookahead_bytes", 256 << 10),
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


class ReloadingServerCertificates:
    """Certificate rotation without a restart: gRPC asks `fetch()` before each new handshake; it
    stats the CA, certificate and key files and hands gRPC a new configuration only when one of
    them changed (`ktfed pki issue` replaces files by rename). Connections already open keep the
    certificate they were made with; new ones get the new one. A half-rotated or unreadable set
    (key not yet matching, file missing) keeps the last good configuration, with a warning."""

    def __init__(self, tls: TLSFiles, check: Callable[[bytes, bytes], None] | None = None):
        self.tls = tls
        self.check = check  # e.g. security.pki.check_key_pair: raises when cert and key do not match
        self._seen = self._stat()
        ca, cert, key = tls.read()
        self.initial = grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)
        self.reloads = 0

    def _stat(self):
        out = []
        for path in (self.tls.ca_cert, self.tls.cert, self.tls.key):
            try:
                st = Path(path).stat()
                out.append((st.st_ino, st.st_size, st.st_mtime_ns))
            except OSError:
                out.append(None)
        return tuple(out)

    def fetch(self):
        seen = self._stat()
        if seen == self._seen:
            return None
        self._seen = seen
        try:
            ca, cert, key = self.tls.read()
            if self.check is not None:
                self.check(cert, key)
        except Exception as err:  # noqa: BLE001 - bad new material must not break handshakes
            log.warning("new TLS material not loaded, keeping the current one: %s", err)
            return None
        self.reloads += 1
        log.info("TLS certificate files changed: new connections use the new certificate (%s)", self.tls.cert)
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(self.initial, self.fetch, require_client_authentication=True)


def open_channel(address: str, tls: TLSFiles | None, *, insecure: bool = False) -> grpc.Channel:
    if insecure:
        log.warning("plaintext channel to %s (--insecure): for local debugging only", address)
        return grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
    if tls is None:
        raise ValueError("mutual TLS needs certificate files (or --insecure for local debugging)")
    ca, cert, key = tls.read()
    creds = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)
    return grpc.secure_channel(address, creds, options=CHANNEL_OPTIONS)
