"""Backbone hosting: the coordinator serves a run's frozen checkpoint to participants.

The file is digested once when the run starts; every download re-digests what it streams and
stops if the file changed underneath (a replaced checkpoint must never reach a site under the
old digest). Participants check the digest again on their side.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

log = logging.getLogger(__name__)

READ_BYTES = 1 << 20


class HostingError(RuntimeError):
    """The hosted checkpoint is missing or changed."""


def sha256_file(path: Path) -> tuple[str, int]:
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as fh:
        while block := fh.read(READ_BYTES):
            digest.update(block)
            size += len(block)
    return digest.hexdigest(), size


@dataclass(frozen=True)
class HostedBackbone:
    path: Path
    sha256: str
    size: int

    @classmethod
    def open(cls, path: str | Path) -> "HostedBackbone":
        path = Path(path)
        if not path.is_file():
            raise HostingError(f"backbone checkpoint {path} does not exist")
        sha, size = sha256_file(path)
        log.info("hosting backbone %s (%d bytes, sha256 %s…)", path, size, sha[:16])
        return cls(path, sha, size)

    def chunks(self, offset: int, chunk_bytes: int) -> Iterator[tuple[int, bytes]]:
        """(offset, data) from `offset` to the end. A resumed download (offset > 0) cannot be
        re-digested here from the start without reading it, so the whole file is digested anyway."""
        if not 0 <= offset <= self.size:
            raise HostingError(f"offset {offset} is outside the checkpoint's {self.size} bytes")
        digest, position = hashlib.sha256(), 0
        with open(self.path, "rb") as fh:
            while block := fh.read(chunk_bytes):
                digest.update(block)
                end = position + len(block)
                if end > offset:
                    start = max(0, offset - position)
                    yield position + start, block[start:]
                position = end
        if position != self.size or digest.hexdigest() != self.sha256:
            raise HostingError(f"backbone checkpoint {self.path} changed while the run was hosting it")
