"""A site's cache of hosted backbones, keyed by SHA-256: downloaded once per digest, checked
before use, never trusted on the coordinator's word alone."""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
from pathlib import Path
from typing import Callable, Iterable

log = logging.getLogger(__name__)

DISK_MARGIN = 256 << 20   # left free after a download


class BackboneCacheError(RuntimeError):
    """A download that does not match the digest or size the coordinator announced."""


def cached_path(cache_dir: Path, sha256: str) -> Path:
    if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
        raise BackboneCacheError(f"backbone digest {sha256[:80]!r} is not a SHA-256 hex digest")
    return Path(cache_dir) / f"{sha256}.safetensors"


def _digest_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def fetch(cache_dir: Path, sha256: str, size: int,
          download: Callable[[int], Iterable[tuple[int, bytes]]]) -> Path:
    """The checkpoint with this digest: from the cache when its bytes still match, else downloaded
    with `download(offset)` -> (offset, data) pieces, checked, and renamed into place."""
    path = cached_path(cache_dir, sha256)
    if path.is_file():
        if _digest_of(path) == sha256:
            return path
        log.warning("cached backbone %s does not match its digest: downloading it again", path)
        path.unlink()
    path.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(path.parent).free
    if size + DISK_MARGIN > free:
        # the site's disk holds its ledger, audit log and private factors too: never fill it
        raise BackboneCacheError(f"the backbone's announced {size} bytes do not fit {path.parent} "
                                 f"({free} bytes free, {DISK_MARGIN} kept spare)")
    tmp = path.with_suffix(".part")
    digest, received = hashlib.sha256(), 0
    try:
        with open(tmp, "wb") as fh:
            for offset, data in download(0):
                if offset != received:
                    raise BackboneCacheError(f"backbone chunk at offset {offset}, expected {received}")
                received += len(data)
                if received > size:
                    raise BackboneCacheError(f"backbone download exceeds its announced {size} bytes")
                digest.update(data)
                fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if received != size or digest.hexdigest() != sha256:
        tmp.unlink(missing_ok=True)
        raise BackboneCacheError(f"backbone download of {received} bytes does not match the announced "
                                 f"{size} bytes and sha256 {sha256[:16]}…")
    os.replace(tmp, path)
    log.info("downloaded backbone %s… (%d bytes) into %s", sha256[:16], size, path)
    return path
