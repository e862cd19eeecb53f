"""Teacher and student checkpoints: safetensors with the architecture in the metadata.

A checkpoint says what it is (`kind`, e.g. "text-classifier") and how to rebuild the module
(`config`, JSON). Loading checks both before touching a tensor, then loads strictly, so a file for
another architecture fails with a message that says which, instead of a shape error deep in torch.
Writes go to a temporary file renamed into place: a crash never leaves half a checkpoint.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file
from torch import nn

FORMAT = "ktfed-distill/1"


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, or not for the architecture asked for."""


def save_checkpoint(path: Path, model: nn.Module, *, kind: str, config_json: str, extra: dict | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # safetensors refuses shared storage and non-contiguous views: store plain copies
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    meta = {"format": FORMAT, "kind": kind, "config": config_json, "extra": json.dumps(extra or {}, sort_keys=True)}
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    save_file(state, str(tmp), metadata=meta)
    # 0600 as the site's adapted model: a student distilled from it carries what it learnt on site data
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)
    return path


def read_metadata(path: Path, what: str = "checkpoint") -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{what} {path} is not a readable safetensors file: {err}") from None
    return meta


def load_checkpoint(path: Path, *, kind: str, build: Callable[[str], nn.Module], what: str = "checkpoint") -> tuple[nn.Module, dict]:
    """The module `build(config_json)` makes, with the checkpoint's tensors loaded strictly."""
    meta = read_metadata(path, what)
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{what} {path} is not a ktfed distillation checkpoint "
                              f"(format {meta.get('format')!r}, expected {FORMAT!r})")
    if meta.get("kind") != kind:
        raise CheckpointError(f"{what} {path} is for architecture {meta.get('kind')!r}, expected {kind!r}")
    try:
        model = build(meta.get("config", "{}"))
    except (ValueError, TypeError, KeyError) as err:
        raise CheckpointError(f"{what} {path}: its {kind} configuration is invalid: {err}") from None
    state = load_file(str(path))
    missing, unexpected, bad = _compare(model.state_dict(), state)
    if missing or unexpected or bad:
        parts = [f"{n} {label}: {', '.join(items[:4])}{' ...' if len(items) > 4 else ''}"
                 for label, items, n in (("missing", missing, len(missing)), ("unexpected", unexpected, len(unexpected)),
                                         ("of another shape", bad, len(bad))) if items]
        raise CheckpointError(f"{what} {path} does not match its declared {kind} architecture ({'; '.join(parts)})")
    model.load_state_dict(state, strict=True)
    return model, {**meta, "extra": json.loads(meta.get("extra") or "{}")}


def _compare(expected: dict, got: dict) -> tuple[list[str], list[str], list[str]]:
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    bad = sorted(f"{k} {tuple(got[k].shape)} != {tuple(expected[k].shape)}"
                 for k in set(expected) & set(got) if tuple(expected[k].shape) != tuple(got[k].shape))
    return missing, unexpected, bad


def state_digest(model: nn.Module) -> str:
    """SHA-256 over names, dtypes, shapes and bytes: identifies a student without shipping it."""
    import hashlib

    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
