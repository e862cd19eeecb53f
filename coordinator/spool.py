"""Uploads on disk while they arrive, so the coordinator's memory does not grow with update size.

An upload's chunks go to a temporary file under the coordinator's state folder (`<state>/spool/`)
as they arrive, with the checks `kt_core.codec.TensorAssembler` makes: declared names, dtypes and
sizes up front, chunk size, contiguous offsets, no byte beyond a tensor's declared size, SHA-256 per
tensor, finiteness. Only an upload that passed every check is handed on (`SpooledUpdate`), and the
aggregation reads it back block by block: a bad upload never touches the aggregate, and memory
per upload is one chunk, not one update. The file is removed when the upload is done, on every
path; files left by a crash are swept when the coordinator starts.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import uuid
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from coordinator.state_file import TensorFileView
from kt_core import codec

log = logging.getLogger(__name__)

SPOOL_DIR = "spool"
SUFFIX = ".upload"
# what the aggregation reads back at a time: small next to the accumulator it folds into
BLOCK_BYTES = 1 << 20


def return_freed_buffers_to_the_os(threshold: int = 512 << 10, arenas: int = 2) -> bool:
    """Make freed transfer buffers go back to the OS instead of staying in malloc's pools.

    The coordinator's large transient buffers are chunks: gRPC's, protobuf's and Python's copies
    of each one, allocated by whichever of up to 160 gRPC threads carries the transfer. glibc's
    defaults let them pile up: it raises its mmap threshold to the largest block freed so far, after
    which chunk-sized buffers come from per-thread arenas that keep them, and it gives every
    thread an arena of its own (up to 8 per core), each holding its own freed pieces. So: blocks
    of >= `threshold` bytes get mappings of their own (free() unmaps them), and threads share
    `arenas` arenas (the GIL serializes the Python side anyway). Call before the server starts its
    threads. Returns whether the C library took the settings (glibc does; elsewhere a no-op)."""
    try:
        libc = ctypes.CDLL(None)
        return bool(libc.mallopt(-3, threshold)) and bool(libc.mallopt(-8, arenas))  # M_MMAP_THRESHOLD, M_ARENA_MAX
    except (OSError, AttributeError):
        return False


class SpoolDir:
    """The folder of in-flight uploads; created, and emptied of leftovers, when opened."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.sweep()

    def sweep(self) -> list[Path]:
        """Remove the files of uploads that were in flight when the process last stopped."""
        removed = []
        for path in self.root.glob(f"*{SUFFIX}"):
            try:
                path.unlink()
                removed.append(path)
            except FileNotFoundError:
                pass
        if removed:
            log.warning("removed %d upload spool file(s) left by an earlier process in %s", len(removed), self.root)
        return removed

    def open(self, specs: Iterable[codec.TensorSpec], *, max_chunk_bytes: int = codec.MAX_CHUNK_BYTES,
             max_tensor_bytes: int = 1 << 31, require_finite: bool = True) -> "UploadSpool":
        return UploadSpool(self.root / f"{uuid.uuid4().hex}{SUFFIX}", specs, max_chunk_bytes=max_chunk_bytes,
                           max_tensor_bytes=max_tensor_bytes, require_finite=require_finite)

    def files(self) -> list[Path]:
        return sorted(self.root.glob(f"*{SUFFIX}"))


class UploadSpool:
    """One upload being received. Use as a context manager: leaving it removes the file.

    Tensors lie in the file back to back in declared order. Chunks must arrive in order per
    tensor, as for the assembler; `finish()` returns the verified update.
    """

    def __init__(self, path: Path, specs: Iterable[codec.TensorSpec], *, max_chunk_bytes: int,
                 max_tensor_bytes: int, require_finite: bool):
        self.specs: dict[str, codec.TensorSpec] = {}
        for spec in specs:  # everything that can be refused before a byte is written
            if spec.name in self.specs:
                raise codec.WireError("duplicate", f"tensor {spec.name!r} declared twice")
            codec.check_spec(spec, max_tensor_bytes=max_tensor_bytes)
            self.specs[spec.name] = spec
        self.max_chunk_bytes = max_chunk_bytes
        self.require_finite = require_finite
        self.base: dict[str, int] = {}
        offset = 0
        for name, spec in self.specs.items():
            self.base[name] = offset
            offset += spec.nbytes
        self.declared_bytes = offset
        self._hashes = {name: hashlib.sha256() for name in self.specs}
        self._filled = {name: 0 for name in self.specs}
        # the bytes of a float element split across two chunks, kept until the next chunk completes it
        self._carry = {name: b"" for name in self.specs}
        self._nonfinite: set[str] = set()
        self.bytes_received = 0
        self.path = Path(path)
        self._fd: int | None = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)

    def __enter__(self) -> "UploadSpool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass

    def add(self, name: str, offset: int, data: bytes) -> None:
        spec = self.specs.get(name)
        if spec is None:
            raise codec.WireError("undeclared", f"chunk for tensor {name!r}, which the header did not declare")
        if len(data) > self.max_chunk_bytes:
            raise codec.WireError("chunk_too_large", f"chunk of {len(data)} bytes for {name!r} exceeds "
                                                     f"the chunk limit of {self.max_chunk_bytes}")
        filled = self._filled[name]
        if offset != filled:
            raise codec.WireError("offset", f"chunk for {name!r} at offset {offset}, expected {filled}")
        end = filled + len(data)
        if end > spec.nbytes:
            raise codec.WireError("exceeds_declared", f"upload exceeds its declared size: tensor {name!r} "
                                                      f"receives more than its declared {spec.nbytes} bytes")
        if data:
            written = os.pwrite(self._fd, data, self.base[name] + filled)
            if written != len(data):
                raise OSError(f"short write to {self.path} ({written} of {len(data)} bytes)")
            self._hashes[name].update(data)
            if self.require_finite and name not in self._nonfinite:
                self._check_finite(spec, data)
        self._filled[name] = end
        self.bytes_received += len(data)

    def _check_finite(self, spec: codec.TensorSpec, data: bytes) -> None:
        dtype = np.dtype(spec.dtype)
        if dtype.kind != "f":
            return
        buf = self._carry[spec.name] + data if self._carry[spec.name] else data
        whole = len(buf) - len(buf) % dtype.itemsize
        if whole:
            values = np.frombuffer(buf, dtype=dtype.newbyteorder("<"), count=whole // dtype.itemsize)
            if not np.isfinite(values).all():
                self._nonfinite.add(spec.name)
        self._carry[spec.name] = bytes(buf[whole:])

    def finish(self) -> "SpooledUpdate":
        """The verified update (valid while this spool is open); refuses in the assembler's order."""
        for name, spec in self.specs.items():
            if self._filled[name] != spec.nbytes:
                raise codec.WireError("incomplete", f"tensor {name!r}: got {self._filled[name]} of {spec.nbytes} bytes")
            if self._hashes[name].digest() != spec.sha256:
                raise codec.WireError("digest_mismatch", f"tensor {name!r}: SHA-256 of the received bytes "
                                                         f"does not match the declared digest")
            if name in self._nonfinite:
                raise codec.WireError("nonfinite", f"tensor {name!r} contains NaN or Inf")
        return SpooledUpdate(self)


class SpooledUpdate(TensorFileView):
    """A verified update on disk. `blocks(name)` reads a tensor back piece by piece (what the
    aggregation uses); indexing reads a whole tensor (for callers that want arrays)."""

    def __init__(self, spool: UploadSpool):
        self._spool = spool
        self.specs = spool.specs

    def _spec(self, name: str) -> codec.TensorSpec:
        return self.specs[name]

    def _names(self):
        return tuple(self.specs)

    def blocks(self, name: str, block_elems: int | None = None) -> Iterator[np.ndarray]:
        """The tensor `name`, flattened in C order, as consecutive arrays of its dtype."""
        if self._spool._fd is None:   # its descriptor number may already belong to another file
            raise ValueError(f"the spooled upload {self._spool.path.name} was closed")
        yield from self._read_blocks(self._spool._fd, self._spool.base[name], self._spool.path, name, block_elems,
                                     BLOCK_BYTES, OSError)
