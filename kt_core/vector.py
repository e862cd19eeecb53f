"""The shared state as one flat vector, and back: secure aggregation masks a single vector.

Both ends lay tensors out the same way (sorted by name, each row-major), from the SHARED part of
the factor manifest, so the coordinator can turn the unmasked sum back into named tensors.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np

Specs = Mapping[str, tuple[str, tuple[int, ...]]]   # name -> (dtype, shape)


def vector_length(specs: Specs) -> int:
    return sum(int(np.prod(shape, dtype=np.int64)) for _, shape in specs.values())


def flatten(state: Mapping[str, np.ndarray], specs: Specs) -> np.ndarray:
    """float64 vector of the tensors named in `specs`, in sorted name order."""
    missing = sorted(set(specs) - set(state))
    if missing:
        raise ValueError(f"state lacks tensor {missing[0]!r}")
    parts = []
    for name in sorted(specs):
        array = np.asarray(state[name])
        if tuple(array.shape) != tuple(specs[name][1]):
            raise ValueError(f"tensor {name!r}: shape {list(array.shape)}, expected {list(specs[name][1])}")
        parts.append(array.astype(np.float64, copy=False).reshape(-1))
    return np.concatenate(parts) if parts else np.zeros(0)


def unflatten(vector: np.ndarray, specs: Specs) -> dict[str, np.ndarray]:
    """Named float64 tensors from a vector laid out by `flatten`."""
    vector = np.asarray(vector)
    if vector.ndim != 1 or vector.shape[0] != vector_length(specs):
        raise ValueError(f"vector has shape {list(vector.shape)}, expected [{vector_length(specs)}]")
    out, offset = {}, 0
    for name in sorted(specs):
        shape = tuple(specs[name][1])
        size = int(np.prod(shape, dtype=np.int64))
        out[name] = vector[offset:offset + size].astype(np.float64).reshape(shape)
        offset += size
    return out
