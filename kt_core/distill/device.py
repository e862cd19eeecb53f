"""Where distillation runs: the device a config asks for, mixed precision, and what this machine has.

A site says `device = "auto" | "cpu" | "cuda"` (or "cuda:N"). "auto" takes CUDA when present and
the CPU otherwise; asking for CUDA where there is none is an error rather than a silent CPU run,
because a site that sized its job for a GPU would otherwise wait hours without knowing why.
"""
from __future__ import annotations

import contextlib
import os
import platform
from dataclasses import dataclass

import torch

DEVICE_CHOICES = ("auto", "cpu", "cuda")


class DeviceError(ValueError):
    """The requested device does not exist here; the message says what does."""


def resolve_device(name: str = "auto") -> torch.device:
    """The torch device for a config value; refuses CUDA where torch sees no GPU."""
    text = (name or "auto").strip().lower()
    if text == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if text == "cpu":
        return torch.device("cpu")
    if text == "cuda" or text.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise DeviceError(f"device: {name!r} requested but CUDA is not available on this machine "
                              f"(torch {torch.__version__}, built with CUDA {torch.version.cuda or 'none'}); "
                              "use device = \"cpu\" or \"auto\"")
        device = torch.device(text)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceError(f"device: {name!r} requested but this machine has "
                              f"{torch.cuda.device_count()} CUDA device(s)")
        return device
    raise DeviceError(f"device: {name!r} is not one of {', '.join(DEVICE_CHOICES)} (or cuda:N)")


@dataclass(frozen=True)
class Precision:
    """Autocast settings for one device. bf16 needs no loss scaling, so it is preferred where the
    GPU has it (Ampere and later); older GPUs get fp16 with a GradScaler. On the CPU we stay in
    fp32: CPUs without native bf16 run autocast slower than fp32, and the models here are small."""

    enabled: bool
    dtype: torch.dtype | None
    needs_scaler: bool

    @property
    def name(self) -> str:
        return str(self.dtype).removeprefix("torch.") if self.enabled else "fp32"

    def autocast(self, device: torch.device):
        if not self.enabled:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.dtype)

    def scaler(self, device: torch.device) -> torch.amp.GradScaler:
        return torch.amp.GradScaler(device.type, enabled=self.needs_scaler)


def precision_for(device: torch.device, amp: bool = True) -> Precision:
    if not amp or device.type != "cuda":
        return Precision(False, None, False)
    if torch.cuda.is_bf16_supported():
        return Precision(True, torch.bfloat16, False)
    return Precision(True, torch.float16, True)


def capabilities() -> dict:
    """This machine's compute, as a plain dict a participant can report when it joins
    (the coordinator may then hand distillation work to the sites that can do it)."""
    cuda = torch.cuda.is_available()
    devices = []
    if cuda:
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            devices.append({"index": i, "name": props.name, "memory_bytes": int(props.total_memory),
                            "capability": f"{props.major}.{props.minor}",
                            "multiprocessors": int(props.multi_processor_count)})
    try:
        usable_cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable_cpus = os.cpu_count() or 1
    return {
        "cuda_available": cuda,
        "cuda_device_count": len(devices),
        "cuda_devices": devices,
        "cuda_version": torch.version.cuda,
        "bf16": bool(cuda and torch.cuda.is_bf16_supported()),
        "cpu_count": os.cpu_count() or 1,
        "usable_cpus": usable_cpus,
        "memory_bytes": _total_memory(),
        "torch": torch.__version__,
        "platform": platform.platform(),
    }


def _total_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so wall-clock timings mean what they say."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
