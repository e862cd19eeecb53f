"""Revocation checks for servers: a verified CRL, and a watcher that follows crl.pem on disk."""
from __future__ import annotations

import datetime as dt
import logging
import os
import threading
from pathlib import Path

from . import primitives
from .errors import PKIError

log = logging.getLogger(__name__)


class RevocationList:
    """The revoked serials of one CRL whose signature and dates were checked against the CA."""

    def __init__(self, serials: frozenset[int], number: int | None,
                 last_update: dt.datetime, next_update: dt.datetime):
        self.serials = serials
        self.number = number
        self.last_update = last_update
        self.next_update = next_update

    @classmethod
    def from_pem(cls, crl_pem: bytes, ca_cert_pem: bytes) -> "RevocationList":
        ca_cert = primitives.load_cert(ca_cert_pem, what="CA certificate")
        crl = primitives.load_crl(crl_pem)
        primitives.check_crl(crl, ca_cert)
        return cls(
            serials=frozenset(entry.serial_number for entry in crl),
            number=primitives.crl_number(crl),
            last_update=crl.last_update_utc,
            next_update=crl.next_update_utc,  # check_crl refused a CRL without one
        )

    @classmethod
    def load(cls, crl_path: str | os.PathLike[str],
             ca_cert_path: str | os.PathLike[str]) -> "RevocationList":
        try:
            crl_pem = Path(crl_path).read_bytes()
            ca_pem = Path(ca_cert_path).read_bytes()
        except OSError as err:
            raise PKIError(f"cannot read CRL or CA certificate: {err}") from None
        try:
            return cls.from_pem(crl_pem, ca_pem)
        except PKIError as err:
            raise PKIError(f"{crl_path}: {err}") from None

    def is_revoked(self, serial: int) -> bool:
        return serial in self.serials

    def __repr__(self) -> str:
        return (f"RevocationList(number={self.number}, revoked={len(self.serials)}, "
                f"next_update={self.next_update.isoformat()})")


class RevocationWatcher:
    """What a long-running server asks: follows crl.pem without a restart.

    Each call costs one stat(); the file is re-read only when its inode, size or mtime changes
    (`authority` replaces it by rename, so every rewrite is a new inode). A new file that does not
    verify, or that is older (lower CRL number) than the one in force, is refused with a warning
    and the last good list stays in force: a corrupted or rolled-back file must never un-revoke
    anyone. The first load has no fallback, so it raises.
    """

    def __init__(self, crl_path: str | os.PathLike[str], ca_cert_path: str | os.PathLike[str]):
        self._crl_path = Path(crl_path)
        self._ca_cert_path = Path(ca_cert_path)
        self._lock = threading.Lock()
        self._seen = self._stat()
        self._current = RevocationList.load(self._crl_path, self._ca_cert_path)
        self._warned_expired = False

    @property
    def current(self) -> RevocationList:
        self._refresh()
        return self._current

    def is_revoked(self, serial: int) -> bool:
        self._refresh()
        return self._current.is_revoked(serial)

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self._crl_path)
        except OSError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def _refresh(self) -> None:
        seen = self._stat()
        if seen == self._seen:
            self._warn_if_expired()
            return
        with self._lock:
            # Another thread may have reloaded while we waited for the lock.
            if seen == self._seen:
                return
            # Remember this version even if it is bad, so a broken file is reported once, not on
            # every handshake; the next change to the file is tried again.
            self._seen = seen
            if seen is None:
                log.warning("CRL %s is missing; keeping the last good CRL (number %s)",
                            self._crl_path, self._current.number)
                return
            try:
                fresh = RevocationList.load(self._crl_path, self._ca_cert_path)
            except PKIError as err:
                log.warning("refusing new CRL, keeping the last good one (number %s): %s",
                            self._current.number, err)
                return
            if (fresh.number is not None and self._current.number is not None
                    and fresh.number < self._current.number):
                log.warning("refusing CRL %s: its number %s is older than the one in force (%s)",
                            self._crl_path, fresh.number, self._current.number)
                return
            self._current = fresh
            self._warned_expired = False
            log.info("loaded CRL %s: number %s, %d revoked serial(s)",
                     self._crl_path, fresh.number, len(fresh.serials))

    def _warn_if_expired(self) -> None:
        # An expired CRL in force is still the best knowledge we have; dropping it would
        # un-revoke everyone. Whether to keep serving is the server's decision; we make it visible.
        if not self._warned_expired and primitives.utcnow() > self._current.next_update:
            self._warned_expired = True
            log.warning("CRL in force expired on %s; re-sign it with refresh_crl",
                        self._current.next_update.isoformat())
