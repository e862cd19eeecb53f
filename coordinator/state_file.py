"""The state-file format: a model state as safetensors, written and read by offsets.

A global state lives in its file only: downloads stream it chunk by chunk and the aggregation
reads it block by block, so the coordinator keeps no copy of the model in memory. States that are
read lazily (a state file, a spooled upload, FedAvg's result being computed) share one explicit
interface, `LazyState`; anything else is a plain mapping of arrays.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Iterator, Mapping, Protocol, Sequence, runtime_checkable

import numpy as np

from kt_core import codec
from security.files import fsync_dir


class CorruptStateError(RuntimeError):
    """A state file that does not match its record: the coordinator refuses to start."""



@runtime_checkable
class LazyState(Protocol):
    """A state whose tensors are read (or computed) block by block instead of held as arrays."""

    def layout(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        """name -> (dtype, shape), without reading any data."""

    def blocks(self, name: str, block_elems: int | None = None) -> Iterator[np.ndarray]:
        """Tensor `name` flattened in C order, as consecutive pieces of <= block_elems."""


# safetensors' names of the dtypes the wire carries (kt_core.codec.DTYPES)
SAFETENSORS_DTYPES = {"float16": "F16", "float32": "F32", "float64": "F64", "int8": "I8", "int32": "I32",
                      "int64": "I64", "uint8": "U8", "uint32": "U32"}
_DTYPE_OF = {v: k for k, v in SAFETENSORS_DTYPES.items()}
STATE_BLOCK_BYTES = 1 << 20
MAX_HEADER_BYTES = 64 << 20


def state_layout(state: Mapping[str, np.ndarray]) -> dict[str, tuple[str, tuple[int, ...]]]:
    """name -> (dtype, shape) of a state, without reading a streamed one's data."""
    if isinstance(state, LazyState):
        return dict(state.layout())
    return {n: (np.asarray(a).dtype.name, tuple(int(d) for d in np.shape(a))) for n, a in state.items()}


def state_blocks(state: Mapping[str, np.ndarray], name: str, block_elems: int) -> Iterator[np.ndarray]:
    """Tensor `name` of a state, flattened in C order, as consecutive pieces of <= block_elems."""
    if isinstance(state, LazyState):
        yield from state.blocks(name, block_elems)
        return
    flat = np.asarray(state[name]).reshape(-1)
    for start in range(0, flat.size, block_elems):
        yield flat[start:start + block_elems]


class TensorFileView(Mapping[str, np.ndarray]):
    """A LazyState over tensors that lie in a file: `blocks()` reads one back piece by piece
    (subclasses say from where, with `_read_blocks`), indexing reads a whole tensor."""

    def _spec(self, name: str) -> codec.TensorSpec:
        raise NotImplementedError

    def _names(self) -> Sequence[str]:
        raise NotImplementedError

    def layout(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        return {n: (self._spec(n).dtype, self._spec(n).shape) for n in self._names()}

    def _read_blocks(self, fd: int, base: int, path: Path, name: str, block_elems: int | None,
                     block_bytes: int, error: type[Exception] = CorruptStateError) -> Iterator[np.ndarray]:
        spec = self._spec(name)
        dtype = np.dtype(spec.dtype)
        step = (block_elems or max(1, block_bytes // dtype.itemsize)) * dtype.itemsize
        for start in range(0, spec.nbytes, step):
            raw = pread_exact(fd, min(step, spec.nbytes - start), base + start, path, error)
            yield np.frombuffer(raw, dtype=dtype.newbyteorder("<")).astype(dtype, copy=False)

    def __getitem__(self, name: str) -> np.ndarray:
        spec = self._spec(name)
        parts = list(self.blocks(name))
        return (np.concatenate(parts) if parts else np.zeros(0, spec.dtype)).reshape(spec.shape)

    def __iter__(self):
        return iter(self._names())

    def __len__(self) -> int:
        return len(self._names())


class StateFile(TensorFileView):
    """A global state on disk, read by offsets (the safetensors header gives each tensor's byte
    range): downloads stream it chunk by chunk and the aggregation reads it block by block, so the
    coordinator keeps no copy of the model in memory. `specs` (with each tensor's SHA-256) were
    computed when the file was written or verified. Indexing reads a whole tensor."""

    def __init__(self, path: Path, digest: str, specs: Sequence[codec.TensorSpec], offsets: Mapping[str, int]):
        self.path = Path(path)
        self.digest = digest
        self.specs = tuple(sorted(specs, key=lambda s: s.name))
        self._by_name = {s.name: s for s in self.specs}
        self.offsets = dict(offsets)

    def _spec(self, name: str) -> codec.TensorSpec:
        return self._by_name[name]

    def _names(self) -> Sequence[str]:
        return tuple(self._by_name)

    def chunks(self, chunk_bytes: int) -> Iterator[tuple[str, int, bytes]]:
        """(name, offset, data) of every tensor in name order, as the wire sends them."""
        with open(self.path, "rb", buffering=0) as fh:
            for spec in self.specs:
                if spec.nbytes == 0:  # an empty tensor still gets one (empty) chunk
                    yield spec.name, 0, b""
                for start in range(0, spec.nbytes, chunk_bytes):
                    size = min(chunk_bytes, spec.nbytes - start)
                    yield spec.name, start, pread_exact(fh.fileno(), size, self.offsets[spec.name] + start,
                                                        self.path)

    def blocks(self, name: str, block_elems: int | None = None) -> Iterator[np.ndarray]:
        with open(self.path, "rb", buffering=0) as fh:
            yield from self._read_blocks(fh.fileno(), self.offsets[name], self.path, name, block_elems,
                                         STATE_BLOCK_BYTES)


def pread_exact(fd: int, size: int, offset: int, path: Path, error: type[Exception] = CorruptStateError) -> bytes:
    """`size` bytes at `offset`; `error` when the file ends first."""
    data = os.pread(fd, size, offset)
    while len(data) < size:  # a regular file answers in full; loop anyway rather than trust it
        more = os.pread(fd, size - len(data), offset + len(data))
        if not more:
            raise error(f"{path}: {size} bytes expected at offset {offset}, "
                                    f"the file ends after {len(data)}")
        data += more
    return data


def write_state_file(path: Path, state: Mapping[str, np.ndarray], metadata: Mapping[str, str]) -> StateFile:
    """Write `state` as safetensors block by block (temporary file, fsync, rename), hashing each
    tensor on the way; a streamed state (FedAvg's result) is never materialized."""
    layout = state_layout(state)
    header: dict = {"__metadata__": dict(metadata)}
    offset = 0
    for name in sorted(layout):
        dtype, shape = layout[name]
        if dtype not in SAFETENSORS_DTYPES:
            raise ValueError(f"tensor {name!r}: dtype {dtype} cannot be stored")
        nbytes = math.prod(shape) * np.dtype(dtype).itemsize
        header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # tensor data starts 8-byte aligned, as safetensors writes it
    data_start = 8 + len(raw)
    tmp = path.with_suffix(path.suffix + ".tmp")
    specs = []
    with open(tmp, "wb") as fh:
        fh.write(len(raw).to_bytes(8, "little") + raw)
        for name in sorted(layout):
            dtype, shape = layout[name]
            h, written = hashlib.sha256(), 0
            for block in state_blocks(state, name, max(1, STATE_BLOCK_BYTES // np.dtype(dtype).itemsize)):
                data = codec.to_bytes(np.asarray(block, dtype=dtype))
                h.update(data)
                fh.write(data)
                written += len(data)
            begin, end = header[name]["data_offsets"]
            if written != end - begin:
                raise ValueError(f"tensor {name!r}: {written} bytes written, {end - begin} expected")
            specs.append(codec.TensorSpec(name, dtype, tuple(shape), h.digest(), written))
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)
    return StateFile(path, codec.state_digest(specs), specs,
                     {n: data_start + header[n]["data_offsets"][0] for n in layout})


def open_state_file(path: Path, digest: str | None = None) -> StateFile:
    """Read the header, hash every tensor from disk (block by block) and check the digest."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            if size < 8 or not 2 <= n <= min(MAX_HEADER_BYTES, size - 8):
                raise ValueError(f"header length {n} does not fit a file of {size} bytes")
            header = json.loads(fh.read(n))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
        specs, offsets = [], {}
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            dtype = _DTYPE_OF.get(entry.get("dtype"))
            if dtype is None:
                raise ValueError(f"tensor {name!r}: unsupported dtype {entry.get('dtype')!r}")
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(x) for x in entry["data_offsets"])
            if min(shape, default=0) < 0 or end - begin != math.prod(shape) * np.dtype(dtype).itemsize \
                    or begin < 0 or 8 + n + end > size:
                raise ValueError(f"tensor {name!r}: byte range {begin}..{end} does not match {dtype}{list(shape)}")
            offsets[name] = 8 + n + begin
            specs.append(codec.TensorSpec(name, dtype, shape, b"", end - begin))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise CorruptStateError(f"state file {path} cannot be read: {err}") from None
    unhashed = StateFile(path, "", specs, offsets)
    hashed = []
    for spec in unhashed.specs:
        h = hashlib.sha256()
        for block in unhashed.blocks(spec.name):
            h.update(codec.to_bytes(block))
        hashed.append(codec.TensorSpec(spec.name, spec.dtype, spec.shape, h.digest(), spec.nbytes))
    actual = codec.state_digest(hashed)
    if digest is not None and actual != digest:
        raise CorruptStateError(f"state file {path} does not match its recorded digest "
                                f"({actual[:16]}… != {digest[:16]}…)")
    return StateFile(path, actual, hashed, offsets)


