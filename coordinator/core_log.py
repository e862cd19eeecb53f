"""Failed TLS handshakes, as gRPC's core reports them: a line on the process's stderr.

A handshake that fails (a certificate of another CA, an expired one, none at all) never becomes
a call, so no code of ours sees it: gRPC's C core only writes, at its default verbosity, one line
to file descriptor 2, e.g.

    E1202 06:40:12.345678  123 ssl_transport_security.cc:1884] Handshake failed with error
    SSL_ERROR_SSL: error:1000007d:SSL routines:OPENSSL_internal:CERTIFICATE_VERIFY_FAILED: certificate has expired

`CoreLogTap` puts a pipe on descriptor 2 and copies every byte to the real stderr as it arrives
(nothing written there is lost or reordered while the process lives), handing each complete line
that reports a failed handshake to a callback, which the coordinator logs and records as a
refusal. The line names no peer (gRPC's core does not say who it was), so the refusal is recorded
under one peer name, HANDSHAKE_PEER, and held to the same record budget as any other peer's.
Python's own fatal-error dumps (faulthandler) go to the real stderr directly, so a crash of the
process is never left in the pipe.
"""
from __future__ import annotations

import faulthandler
import logging
import os
import threading
from typing import Callable

log = logging.getLogger(__name__)

HANDSHAKE_MARK = "Handshake failed"
HANDSHAKE_PEER = "(failed TLS handshake)"
MAX_LINE_BYTES = 8192     # a longer run of bytes without a newline is handed on in pieces


class CoreLogTap:
    def __init__(self, on_handshake_failure: Callable[[str], None]):
        self.on_handshake_failure = on_handshake_failure
        self._real: int | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """From here on, descriptor 2 is the pipe; the real stderr is a duplicate of what it was."""
        self._real = os.dup(2)
        read_end, write_end = os.pipe()
        os.dup2(write_end, 2)
        os.close(write_end)
        faulthandler.enable(file=os.fdopen(os.dup(self._real), "w", closefd=True))
        self._thread = threading.Thread(target=self._copy, args=(read_end,), name="grpc-core-log", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Descriptor 2 back to the real stderr; the copier ends once the pipe is drained."""
        if self._real is None:
            return
        os.dup2(self._real, 2)      # closes the pipe's last write end: the copier reads EOF
        if self._thread is not None:
            self._thread.join(5)
        os.close(self._real)
        self._real = None

    def _copy(self, read_end: int) -> None:
        pending = b""
        try:
            while chunk := os.read(read_end, 65536):
                _write_all(self._real, chunk)
                pending += chunk
                *lines, pending = pending.split(b"\n")
                if len(pending) > MAX_LINE_BYTES:
                    lines.append(pending)
                    pending = b""
                for line in lines:
                    self._look_at(line)
        finally:
            os.close(read_end)

    def _look_at(self, raw: bytes) -> None:
        line = raw.decode("utf-8", "replace")
        at = line.find(HANDSHAKE_MARK)
        if at < 0:
            return
        # the reason without the mark: the refusal's own log line (which may come back through
        # this pipe) must not read as another failed handshake
        reason = line[at + len(HANDSHAKE_MARK):].strip().removeprefix("with error").strip(" :")
        try:
            self.on_handshake_failure(reason or "no reason given")
        except Exception:   # a failing record must not stop stderr from reaching its file
            log.exception("recording a failed TLS handshake failed")


def _write_all(fd: int | None, data: bytes) -> None:
    if fd is None:
        return
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view):]
        except OSError:
            return    # the real stderr is gone: there is nowhere left to write
