"""Crash-safe file writes: write a temporary file beside the target, fsync, rename over it.

A reader therefore sees either the old file or the new one, never a torn one, and after a crash the
directory holds one of the two. Private material (keys) is created 0600 from its first byte: the
temporary file is made by `mkstemp`, which opens with O_CREAT|O_EXCL and mode 0600, so there is no
moment at which a key is readable by anyone else, whatever the umask.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

__all__ = ["write_private", "write_atomic"]


def write_private(path: str | os.PathLike[str], data: bytes) -> Path:
    """Atomically write secret `data` to `path` with mode 0600 (owner read/write only)."""
    return _write(Path(path), data, 0o600)


def write_atomic(path: str | os.PathLike[str], data: bytes, mode: int = 0o644) -> Path:
    """Atomically write `data` to `path`, which ends up with exactly `mode` (umask ignored)."""
    return _write(Path(path), data, mode)


def _write(path: Path, data: bytes, mode: int) -> Path:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"expected bytes for {path}, got {type(data).__name__}")
    directory = path.parent
    # mkstemp creates the file 0600; we only ever widen it (if asked) once the content is complete.
    fd, tmp_name = tempfile.mkstemp(dir=directory, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as tmp:
            tmp.write(data)
            tmp.flush()
            # fchmod, not the mode argument of open: the umask would otherwise strip bits from
            # `mode` and callers rely on getting the mode they asked for.
            os.fchmod(tmp.fileno(), mode)
            os.fsync(tmp.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(directory)
    return path


def fsync_dir(directory: Path) -> None:
    # The rename lives in the directory entry: without this fsync a crash can forget it even
    # though the file's data reached the disk.
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
