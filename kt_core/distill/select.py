"""Initialise a narrower, shallower student from its teacher's weights ("weight selection").

A student built like the teacher, with a smaller width and fewer layers, starts from a slice of
the teacher instead of from noise (Xu et al., "Initializing Models with Larger Ones", ICLR 2024):
every student tensor takes the leading part of the teacher tensor of the same name along each
dimension, and student layer i of a stack takes teacher layer (T - S + i) of it, the layers
nearest the output, which the student keeps in the same order. Tensors that pack several
matrices along their first dimension (an attention's key and value projection) are sliced per
part. Only shapes decide what is copied: a tensor the teacher lacks, or is smaller in, keeps the
student's own initialisation and is named in the result.

The teacher may be an adapted model: its adapters are folded in first (the weights it computes
with), so the student starts from what the federation learned, not from the bare backbone.
"""
from __future__ import annotations

import re

import torch
from torch import Tensor, nn

# a stack of layers: "cross_layers.3.<rest>"
_LAYER = re.compile(r"^(?P<stack>[a-z_]+_layers)\.(?P<index>\d+)\.(?P<rest>.+)$")
# tensors that hold `parts` matrices one after another along dimension 0
PACKED = {"key_value.weight": 2, "key_value.bias": 2}


def _stack_sizes(names) -> dict[str, int]:
    sizes: dict[str, int] = {}
    for name in names:
        m = _LAYER.match(name)
        if m:
            sizes[m["stack"]] = max(sizes.get(m["stack"], 0), int(m["index"]) + 1)
    return sizes


def _teacher_name(name: str, student_sizes: dict[str, int], teacher_sizes: dict[str, int]) -> str | None:
    m = _LAYER.match(name)
    if not m:
        return name
    s, t = student_sizes[m["stack"]], teacher_sizes.get(m["stack"], 0)
    if t < s:
        return None
    return f"{m['stack']}.{t - s + int(m['index'])}.{m['rest']}"


def _slice(source: Tensor, shape: torch.Size, parts: int) -> Tensor | None:
    if source.dim() != len(shape) or any(s > t for s, t in zip(shape, source.shape)):
        return None
    if parts > 1:
        if shape[0] % parts or source.shape[0] % parts:
            return None
        chunks = source.chunk(parts, dim=0)
        return torch.cat([_slice(c, torch.Size((shape[0] // parts, *shape[1:])), 1) for c in chunks], dim=0)
    return source[tuple(slice(0, n) for n in shape)]


@torch.no_grad()
def select_from_teacher(student: nn.Module, teacher_state: dict[str, Tensor]) -> dict[str, list[str]]:
    """Copy the teacher's slices into `student` in place; returns {"copied": names, "kept": names}."""
    own = student.state_dict()
    student_sizes, teacher_sizes = _stack_sizes(own), _stack_sizes(teacher_state)
    copied, kept = [], []
    for name, tensor in own.items():
        source_name = _teacher_name(name, student_sizes, teacher_sizes)
        source = teacher_state.get(source_name) if source_name else None
        parts = next((p for suffix, p in PACKED.items() if name.endswith(suffix)), 1)
        piece = None if source is None else _slice(source, tensor.shape, parts)
        if piece is None or piece.dtype != tensor.dtype:
            kept.append(name)
            continue
        tensor.copy_(piece)
        copied.append(name)
    return {"copied": copied, "kept": kept}


def select_from_model(student: nn.Module, teacher: nn.Module) -> dict[str, list[str]]:
    """select_from_teacher with `teacher`'s adapters folded into plain weights."""
    from kt_core.vln.finetune import inference_copy

    folded = inference_copy(teacher)
    return select_from_teacher(student, {k: v.detach().cpu() for k, v in folded.state_dict().items()})
