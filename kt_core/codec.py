"""Tensors on the wire: raw little-endian bytes with dtype, shape and SHA-256, split into chunks.

Nothing here is pickled and nothing here knows about gRPC: the services translate these plain
descriptions to and from protobuf messages (kt_core.wire.convert). `TensorAssembler` is where a
receiver rebuilds tensors from chunks and refuses anything malformed before it is used.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Iterable, Iterator, Mapping

import numpy as np

# Only numeric types a model state needs; anything else is refused rather than guessed at.
DTYPES = ("float16", "float32", "float64", "int8", "int32", "int64", "uint8", "uint32")
MAX_CHUNK_BYTES = 4 * 1024 * 1024


class WireError(ValueError):
    """A malformed or disallowed tensor message. `reason` is a stable short tag for logs and metrics."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str
    shape: tuple[int, ...]
    sha256: bytes
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def to_bytes(array: np.ndarray) -> bytes:
    """The canonical encoding: C-contiguous, little-endian."""
    array = np.asarray(array)
    if array.dtype.name not in DTYPES:
        raise WireError("dtype", f"dtype {array.dtype.name} is not supported on the wire")
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()


def spec_of(name: str, array: np.ndarray, raw: bytes | None = None) -> TensorSpec:
    raw = to_bytes(array) if raw is None else raw
    return TensorSpec(name, np.asarray(array).dtype.name, tuple(int(d) for d in np.shape(array)),
                      hashlib.sha256(raw).digest(), len(raw))


def encode(tensors: Mapping[str, np.ndarray]) -> list[tuple[TensorSpec, bytes]]:
    """Specs and raw bytes in name order (the order is part of the digest, so it is fixed)."""
    out = []
    for name in sorted(tensors):
        raw = to_bytes(tensors[name])
        out.append((spec_of(name, tensors[name], raw), raw))
    return out


def iter_chunks(raw: bytes, chunk_bytes: int) -> Iterator[tuple[int, bytes]]:
    if chunk_bytes <= 0:
        raise ValueError("chunk_bytes must be positive")
    if len(raw) <= chunk_bytes and isinstance(raw, bytes):
        if raw:
            yield 0, raw          # one chunk: the bytes themselves, no copy
    else:
        view = memoryview(raw)
        for offset in range(0, len(raw), chunk_bytes):
            # protobuf's bytes fields take only `bytes`, so each slice is copied exactly once here
            yield offset, bytes(view[offset:offset + chunk_bytes])
    if not raw:  # an empty tensor still gets one (empty) chunk so the receiver sees it complete
        yield 0, b""


def state_digest(specs: Iterable[TensorSpec]) -> str:
    """One hex digest for a set of tensors: binds names, dtypes, shapes and contents."""
    h = hashlib.sha256()
    for spec in sorted(specs, key=lambda s: s.name):
        h.update(spec.name.encode() + b"\0" + spec.dtype.encode() + b"\0")
        h.update(",".join(map(str, spec.shape)).encode() + b"\0")
        h.update(spec.sha256)
    return h.hexdigest()


def check_spec(spec: TensorSpec, *, max_tensor_bytes: int) -> None:
    """What can be checked before any data arrives."""
    if spec.dtype not in DTYPES:
        raise WireError("dtype", f"tensor {spec.name!r}: dtype {spec.dtype!r} is not supported")
    if any(d < 0 for d in spec.shape):
        raise WireError("shape", f"tensor {spec.name!r}: negative dimension in {spec.shape}")
    expected = spec.numel * np.dtype(spec.dtype).itemsize
    if spec.nbytes != expected:
        raise WireError("size", f"tensor {spec.name!r}: declares {spec.nbytes} bytes, "
                                f"but {spec.dtype}{list(spec.shape)} takes {expected}")
    if spec.nbytes > max_tensor_bytes:
        raise WireError("size_limit", f"tensor {spec.name!r}: {spec.nbytes} bytes exceeds the "
                                      f"limit of {max_tensor_bytes}")
    if len(spec.sha256) != 32:
        raise WireError("digest", f"tensor {spec.name!r}: sha256 must be 32 bytes")


class TensorAssembler:
    """Rebuilds declared tensors from in-order chunks, refusing anything malformed.

    Chunks must arrive in order per tensor (offsets contiguous); a tensor is complete when all
    its declared bytes arrived. `finish()` checks digests and finiteness and returns arrays.
    Memory is bounded by the declared sizes, which the caller limits via `check_spec`.
    """

    def __init__(self, specs: Iterable[TensorSpec], *, max_chunk_bytes: int = MAX_CHUNK_BYTES,
                 max_tensor_bytes: int = 1 << 31, require_finite: bool = True):
        self.specs: dict[str, TensorSpec] = {}
        for spec in specs:
            if spec.name in self.specs:
                raise WireError("duplicate", f"tensor {spec.name!r} declared twice")
            check_spec(spec, max_tensor_bytes=max_tensor_bytes)
            self.specs[spec.name] = spec
        self.max_chunk_bytes = max_chunk_bytes
        self.require_finite = require_finite
        # allocated at full declared size on a tensor's first chunk (sizes are bounded by check_spec),
        # then filled in place: no regrowth copies, and finish() wraps the buffer without copying
        self._buffers: dict[str, bytearray] = {}
        # hashed chunk by chunk on arrival, while the chunk is still in cache (and, in a server,
        # with the GIL released by hashlib), rather than re-reading the whole tensor in finish()
        self._hashes = {name: hashlib.sha256() for name in self.specs}
        self._filled = {name: 0 for name in self.specs}
        self.bytes_received = 0

    def add(self, name: str, offset: int, data: bytes) -> None:
        spec = self.specs.get(name)
        if spec is None:
            raise WireError("undeclared", f"chunk for tensor {name!r}, which the header did not declare")
        if len(data) > self.max_chunk_bytes:
            raise WireError("chunk_too_large", f"chunk of {len(data)} bytes for {name!r} exceeds "
                                               f"the chunk limit of {self.max_chunk_bytes}")
        filled = self._filled[name]
        if offset != filled:
            raise WireError("offset", f"chunk for {name!r} at offset {offset}, expected {filled}")
        end = filled + len(data)
        if end > spec.nbytes:
            raise WireError("size", f"tensor {name!r} receives more than its declared {spec.nbytes} bytes")
        buf = self._buffers.get(name)
        if buf is None:
            buf = self._buffers[name] = bytearray(spec.nbytes)
        buf[filled:end] = data
        self._hashes[name].update(data)
        self._filled[name] = end
        self.bytes_received += len(data)

    def finish(self) -> dict[str, np.ndarray]:
        out = {}
        for name, spec in self.specs.items():
            filled = self._filled[name]
            if filled != spec.nbytes:
                raise WireError("incomplete", f"tensor {name!r}: got {filled} of {spec.nbytes} bytes")
            buf = self._buffers.get(name, bytearray())
            if self._hashes[name].digest() != spec.sha256:
                raise WireError("digest_mismatch", f"tensor {name!r}: SHA-256 of the received bytes "
                                                   f"does not match the declared digest")
            # wraps the assembler's own buffer (writable, owned by the array from here on): no copy
            array = np.frombuffer(buf, dtype=np.dtype(spec.dtype).newbyteorder("<"))
            array = array.astype(spec.dtype, copy=False).reshape(spec.shape)
            if self.require_finite and array.dtype.kind == "f" and not np.isfinite(array).all():
                raise WireError("nonfinite", f"tensor {name!r} contains NaN or Inf")
            out[name] = array
        return out
