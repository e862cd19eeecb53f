"""The factor manifest: which tensors of a model may leave a site.

Every parameter and persistent buffer gets exactly one role:
  SHARED   travels to the coordinator and is aggregated (WAFFLe's W_a, W_b, r; LoRA's A, B; biases)
  PRIVATE  stays on the site and is persisted there (WAFFLe's factor-selection posterior)
  FROZEN   never travels and is never persisted: every site rebuilds it from the seed or backbone
The egress guard refuses any outgoing tensor whose name is not SHARED here, and the digest binds a
run to one manifest so the coordinator and every site agree on what crosses the boundary.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from enum import Enum
from functools import cached_property

from torch import nn

MANIFEST_VERSION = 1

# bytes per element, keyed by numpy dtype name (bfloat16 is torch's, kept for safetensors checkpoints)
DTYPE_SIZES = {
    "float16": 2, "bfloat16": 2, "float32": 4, "float64": 8,
    "int8": 1, "uint8": 1, "int16": 2, "int32": 4, "int64": 8, "bool": 1,
}


class Role(str, Enum):
    SHARED = "shared"
    PRIVATE = "private"
    FROZEN = "frozen"


class ManifestError(ValueError):
    pass


@dataclass(frozen=True)
class TensorEntry:
    name: str
    role: Role
    shape: tuple[int, ...]
    dtype: str

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPE_SIZES[self.dtype]


@dataclass(frozen=True)
class FactorManifest:
    entries: tuple[TensorEntry, ...]

    def __post_init__(self):
        # canonical order, so equal models give equal JSON and digests whatever the module order
        entries = tuple(sorted(self.entries, key=lambda e: e.name))
        object.__setattr__(self, "entries", entries)
        seen = set()
        for e in entries:
            if e.name in seen:
                raise ManifestError(f"entries: duplicate tensor name {e.name!r}")
            seen.add(e.name)

    @cached_property
    def _by_name(self) -> dict[str, TensorEntry]:
        return {e.name: e for e in self.entries}

    def role_of(self, name: str) -> Role:
        try:
            return self._by_name[name].role
        except KeyError:
            raise KeyError(f"tensor {name!r} not in the factor manifest") from None

    def entry(self, name: str) -> TensorEntry:
        try:
            return self._by_name[name]
        except KeyError:
            raise KeyError(f"tensor {name!r} not in the factor manifest") from None

    def _with_role(self, role: Role) -> tuple[TensorEntry, ...]:
        return tuple(e for e in self.entries if e.role is role)

    def shared(self) -> tuple[TensorEntry, ...]:
        return self._with_role(Role.SHARED)

    def private(self) -> tuple[TensorEntry, ...]:
        return self._with_role(Role.PRIVATE)

    def frozen(self) -> tuple[TensorEntry, ...]:
        return self._with_role(Role.FROZEN)

    def shared_names(self) -> frozenset[str]:
        return frozenset(e.name for e in self.shared())

    def shared_numel(self) -> int:
        return sum(e.numel for e in self.shared())

    def shared_nbytes(self) -> int:
        return sum(e.nbytes for e in self.shared())

    def to_json(self) -> str:
        # compact, sorted keys: this text is what digest() hashes
        doc = {
            "version": MANIFEST_VERSION,
            "entries": [
                {"name": e.name, "role": e.role.value, "shape": list(e.shape), "dtype": e.dtype}
                for e in self.entries
            ],
        }
        return json.dumps(doc, sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> FactorManifest:
        try:
            doc = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ManifestError(f"manifest: not valid JSON ({err})") from None
        if not isinstance(doc, dict):
            raise ManifestError("manifest: top level must be a JSON object")
        if set(doc) != {"version", "entries"}:
            raise ManifestError(f"manifest: expected keys ['entries', 'version'], got {sorted(doc)}")
        if doc["version"] != MANIFEST_VERSION:
            raise ManifestError(f"version: unsupported manifest version {doc['version']!r}")
        if not isinstance(doc["entries"], list):
            raise ManifestError("entries: must be a list")
        return cls(tuple(_entry_from_json(i, raw) for i, raw in enumerate(doc["entries"])))

    def digest(self) -> str:
        return hashlib.sha256(self.to_json().encode("utf-8")).hexdigest()


def _entry_from_json(i: int, raw) -> TensorEntry:
    where = f"entries[{i}]"
    if not isinstance(raw, dict):
        raise ManifestError(f"{where}: must be an object")
    if set(raw) != {"name", "role", "shape", "dtype"}:
        raise ManifestError(f"{where}: expected keys ['dtype', 'name', 'role', 'shape'], "
                            f"got {sorted(raw)}")
    name, role, shape, dtype = raw["name"], raw["role"], raw["shape"], raw["dtype"]
    if not isinstance(name, str) or not name:
        raise ManifestError(f"{where}.name: must be a non-empty string, got {name!r}")
    if role not in {r.value for r in Role}:
        raise ManifestError(f"{where}.role: {role!r} is not one of {[r.value for r in Role]}")
    # bool is an int in Python; a shape of [true] is a malformed manifest, not [1]
    if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise ManifestError(f"{where}.shape: must be a list of non-negative integers, got {shape!r}")
    if dtype not in DTYPE_SIZES:
        raise ManifestError(f"{where}.dtype: unknown dtype {dtype!r}")
    return TensorEntry(name, Role(role), tuple(shape), dtype)


def dtype_name(tensor) -> str:
    return str(tensor.dtype).removeprefix("torch.")


def manifest_of(model: nn.Module) -> FactorManifest:
    """Classify every parameter and persistent buffer of `model`.

    A module that knows its roles says so with `tensor_roles()` for its own direct tensors. Anything
    else falls back to dense FedAvg: trainable parameters SHARED, frozen ones FROZEN. Buffers of such
    modules (BatchNorm running statistics) are PRIVATE: they are learnt from local data, so they may
    neither leave the site nor be assumed reproducible from the seed (FedBN keeps them local too).
    """
    entries = []
    for prefix, module in model.named_modules():
        own = dict(module.named_parameters(recurse=False))
        own.update((n, b) for n, b in module.named_buffers(recurse=False)
                   if n not in module._non_persistent_buffers_set)
        declared = module.tensor_roles() if hasattr(module, "tensor_roles") else None
        if declared is not None:
            unknown = set(declared) - set(own)
            if unknown:
                raise ManifestError(f"{type(module).__name__} at {prefix or '<root>'!r} declares roles "
                                    f"for tensors it does not have: {sorted(unknown)}")
        for local, tensor in own.items():
            full = f"{prefix}.{local}" if prefix else local
            if declared is not None:
                if local not in declared:
                    raise ManifestError(f"tensor {full!r}: {type(module).__name__}.tensor_roles() "
                                        f"gives it no role")
                role = Role(declared[local])
            elif isinstance(tensor, nn.Parameter):
                role = Role.SHARED if tensor.requires_grad else Role.FROZEN
            else:
                role = Role.PRIVATE
            entries.append(TensorEntry(full, role, tuple(tensor.shape), dtype_name(tensor)))
    return FactorManifest(tuple(entries))
