"""The backbone checkpoint: one safetensors file plus a model card, checked before use.

    backbone.safetensors    the un-adapted backbone's tensors; its header holds the architecture
                            (VLNConfig JSON) and the tokenizer, so the file alone rebuilds the model
    backbone.card.json      what it is: config, data (levels, seeds), steps, losses, metrics, and
                            the SHA-256 and size of the .safetensors file

The coordinator hosts the file and announces its digest; a site loads it with that digest (or the
card's) and the architecture it expects. Anything that does not match is refused with an error
naming it: a missing file, a different digest, another architecture, a missing or misshapen tensor.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from kt_core.vln.backbone import VLNBackbone, VLNConfig
from kt_core.vln.tokenizer import Tokenizer, TokenizerError

FORMAT = "ktfed-vln-backbone/1"
CARD_FORMAT = "ktfed-vln-model-card/1"


class CheckpointError(ValueError):
    """A checkpoint that must not be used; the message names the file and what is wrong."""


def card_path(checkpoint: str | Path) -> Path:
    p = Path(checkpoint)
    return p.with_name(p.name.removesuffix(".safetensors") + ".card.json")


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    write(tmp)
    os.chmod(tmp, 0o644)        # safetensors writes 0600; a hosted checkpoint is read by other users
    os.replace(tmp, path)


def save_backbone(model: VLNBackbone, tokenizer: Tokenizer, path: str | Path, card: dict | None = None) -> dict:
    """Write the checkpoint and its model card (`card` adds fields: data, steps, losses, metrics);
    returns the card. Refuses an adapted model: only the plain backbone is a checkpoint."""
    from safetensors.torch import save_file

    from kt_core.factorized import Adapter

    if any(isinstance(m, Adapter) for m in model.modules()):
        raise CheckpointError("save_backbone: the model has adapters; save the backbone before adapting it")
    if len(tokenizer) != model.cfg.vocab_size:
        raise CheckpointError(f"save_backbone: tokenizer has {len(tokenizer)} words, the model's vocab_size "
                              f"is {model.cfg.vocab_size}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta = {"format": FORMAT, "config": model.cfg.to_json(), "tokenizer": tokenizer.to_json()}
    _atomic_write(path, lambda tmp: save_file(state, str(tmp), metadata=meta))
    doc = {"format": CARD_FORMAT, **(card or {}), "config": model.cfg.to_dict(),
           "parameters": sum(v.numel() for v in state.values()),
           "checkpoint": {"file": path.name, "sha256": sha256_file(path), "bytes": path.stat().st_size}}
    _atomic_write(card_path(path), lambda tmp: tmp.write_text(json.dumps(doc, indent=2) + "\n"))
    return doc


def read_card(checkpoint: str | Path) -> dict:
    path = card_path(checkpoint)
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"model card {path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"model card {path}: not valid JSON ({err})") from None
    if not isinstance(doc, dict) or doc.get("format") != CARD_FORMAT:
        raise CheckpointError(f"model card {path}: format is not {CARD_FORMAT!r}")
    digest = doc.get("checkpoint", {}).get("sha256") if isinstance(doc.get("checkpoint"), dict) else None
    if not isinstance(digest, str) or len(digest) != 64:
        raise CheckpointError(f"model card {path}: checkpoint.sha256 missing or malformed")
    return doc


def read_config(checkpoint: str | Path) -> VLNConfig:
    """The architecture a checkpoint's header declares (nothing else read, nothing checked but
    the header: load_backbone checks the rest)."""
    from safetensors import safe_open

    try:
        with safe_open(str(checkpoint), framework="pt") as f:
            meta = f.metadata() or {}
        return VLNConfig.from_dict(json.loads(meta["config"]))
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {checkpoint}: file not found") from None
    except Exception as err:  # noqa: BLE001 - safetensors and json raise their own error types on bad bytes
        raise CheckpointError(f"checkpoint {checkpoint}: no readable architecture in its header ({err})") from None


def _config_diff(found: VLNConfig, expected: VLNConfig) -> str:
    a, b = found.to_dict(), expected.to_dict()
    return ", ".join(f"{k} {a[k]!r} in the checkpoint, {b[k]!r} expected" for k in sorted(a) if a[k] != b[k])


@dataclass
class LoadedBackbone:
    model: VLNBackbone
    tokenizer: Tokenizer
    config: VLNConfig
    sha256: str
    path: Path


def load_backbone(path: str | Path, *, sha256: str | None = None, config: VLNConfig | None = None,
                  memory: int | None = None, map_location: str = "cpu") -> LoadedBackbone:
    """Load and check a backbone checkpoint.

    sha256: the digest the file must have (what the coordinator announced); when None, the model
    card beside the file must exist and gives it. config: the architecture the caller expects;
    when given, the checkpoint's must be equal. memory: the past steps the caller's run needs the
    model to see (kt_core.vln.memory); when given, the checkpoint's must be the same, and its
    memory tensors must all be there.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path}: file not found")
    expected = sha256 if sha256 is not None else read_card(path)["checkpoint"]["sha256"]
    actual = sha256_file(path)
    if actual != expected.lower():
        raise CheckpointError(f"checkpoint {path}: SHA-256 {actual} does not match the expected {expected} "
                              f"(a different or damaged file)")
    try:
        with safe_open(str(path), framework="pt", device=map_location) as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error types on bad bytes
        raise CheckpointError(f"checkpoint {path}: not a readable safetensors file ({err})") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path}: format {meta.get('format')!r}, expected {FORMAT!r}")
    try:
        found = VLNConfig.from_dict(json.loads(meta["config"]))
        tokenizer = Tokenizer.from_json(meta["tokenizer"])
    except (KeyError, ValueError, TypeError, TokenizerError) as err:
        raise CheckpointError(f"checkpoint {path}: bad header metadata ({err})") from None
    if config is not None and found != config:
        raise CheckpointError(f"checkpoint {path}: architecture mismatch: {_config_diff(found, config)}")
    if memory is not None and found.memory != memory:
        has = f"memory={found.memory}" + (" (no memory state)" if not found.memory else "")
        raise CheckpointError(f"checkpoint {path}: memory: the run needs a backbone with memory={memory}, the "
                              f"checkpoint's model has {has}")
    if len(tokenizer) != found.vocab_size:
        raise CheckpointError(f"checkpoint {path}: tokenizer has {len(tokenizer)} words, vocab_size is {found.vocab_size}")
    model = VLNBackbone(found)
    want = model.state_dict()
    missing, unexpected = sorted(set(want) - set(state)), sorted(set(state) - set(want))
    lost_memory = [name for name in missing if ".past_" in name]
    if lost_memory:
        raise CheckpointError(f"checkpoint {path}: memory: its header declares memory={found.memory}, but the "
                              f"memory state is missing (tensors {lost_memory[:4]})")
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {path}: architecture mismatch: "
                              + "; ".join(filter(None, [missing and f"missing tensors {missing[:5]}",
                                                        unexpected and f"unexpected tensors {unexpected[:5]}"])))
    for name, tensor in want.items():
        got = state[name]
        if got.shape != tensor.shape or got.dtype != tensor.dtype:
            raise CheckpointError(f"checkpoint {path}: architecture mismatch: tensor {name!r} is "
                                  f"{got.dtype} {tuple(got.shape)}, the model needs {tensor.dtype} {tuple(tensor.shape)}")
        if got.is_floating_point() and not bool(torch.isfinite(got).all()):
            raise CheckpointError(f"checkpoint {path}: tensor {name!r} has non-finite values")
    model.load_state_dict(state)
    return LoadedBackbone(model, tokenizer, found, actual, path)
