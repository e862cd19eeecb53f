"""The training loop every student (and the text teacher) goes through, plus evaluation and timing.

Data is a `TensorDataset`-like dict of tensors (`DictDataset`); a batch is a dict of tensors.
Single-process and DDP runs share one code path: batches always come from a DistributedSampler
(with one replica when there is no process group), so a 2-process run with batch b sees, step for
step, the same global batches as a 1-process run with batch 2b; gradients averaged by DDP are then
the single-process gradients, which tests/test_distill_ddp.py checks.
"""
from __future__ import annotations

import logging
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from kt_core.distill.device import precision_for, resolve_device, synchronize
from kt_core.distill.mixkd import Batch, Objective

log = logging.getLogger("ktfed.distill")


class EmptyDatasetError(ValueError):
    """A data set with no examples: nothing can be trained or evaluated on it."""


class DictDataset(Dataset):
    """Named tensors sharing dim 0. `padded` names the [N, T] tensors that `mask` pads: a batch is
    cut to its longest real sequence, which on short texts saves most of the compute."""

    def __init__(self, tensors: Mapping[str, Tensor], *, padded: tuple[str, ...] = (), mask: str | None = None,
                 name: str = "data set"):
        if not tensors:
            raise EmptyDatasetError(f"{name}: no tensors")
        sizes = {k: int(v.shape[0]) for k, v in tensors.items()}
        n = next(iter(sizes.values()))
        if any(s != n for s in sizes.values()):
            raise ValueError(f"{name}: tensors of different lengths {sizes}")
        if n == 0:
            raise EmptyDatasetError(f"{name} is empty: no examples to train or evaluate on")
        if "labels" not in tensors:
            raise ValueError(f"{name}: no 'labels' tensor")
        self.tensors = dict(tensors)
        self.padded, self.mask, self.name = tuple(padded), mask, name

    def __len__(self) -> int:
        return int(self.tensors["labels"].shape[0])

    def __getitem__(self, i) -> Batch:
        return {k: v[i] for k, v in self.tensors.items()}

    def __getitems__(self, indices) -> Batch:  # DataLoader fetches a whole batch with one index op
        idx = torch.as_tensor(indices, dtype=torch.long)
        return {k: v[idx] for k, v in self.tensors.items()}

    def collate(self, items) -> Batch:
        batch = items if isinstance(items, dict) else {k: torch.stack([it[k] for it in items]) for k in items[0]}
        if self.mask and self.mask in batch and batch[self.mask].numel():
            longest = int(batch[self.mask].sum(dim=1).max())
            batch = {k: (v[:, :max(longest, 1)] if k in self.padded else v) for k, v in batch.items()}
        return batch

    def subset(self, indices, name: str | None = None) -> "DictDataset":
        idx = torch.as_tensor(indices, dtype=torch.long)
        return DictDataset({k: v[idx] for k, v in self.tensors.items()}, padded=self.padded, mask=self.mask,
                           name=name or self.name)

    def with_column(self, key: str, value: Tensor) -> "DictDataset":
        return DictDataset({**self.tensors, key: value}, padded=self.padded, mask=self.mask, name=self.name)

    def batches(self, batch_size: int):
        for start in range(0, len(self), batch_size):
            yield self.collate(self.__getitems__(range(start, min(start + batch_size, len(self)))))


class BucketBatchSampler(Sampler):
    """Batches of texts of similar length: the sampler's (shuffled) order is cut into chunks of
    `chunk` batches, each chunk sorted by length and cut into batches, and the batches shuffled.
    Tweets run from 5 to 64 tokens; padding every batch to its longest doubled the cost."""

    def __init__(self, sampler: DistributedSampler, lengths: Tensor, batch_size: int, seed: int = 0, chunk: int = 32):
        self.sampler, self.lengths, self.batch_size = sampler, lengths, batch_size
        self.seed, self.chunk, self.epoch = seed, chunk, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.sampler.set_epoch(epoch)

    def __iter__(self):
        order = list(self.sampler)
        span = self.batch_size * self.chunk
        batches = []
        for start in range(0, len(order), span):
            part = sorted(order[start:start + span], key=lambda i: int(self.lengths[i]))
            batches += [part[i:i + self.batch_size] for i in range(0, len(part), self.batch_size)]
        g = torch.Generator().manual_seed(self.seed * 31 + self.epoch)
        for i in torch.randperm(len(batches), generator=g).tolist():
            yield batches[i]

    def __len__(self) -> int:
        return -(-len(self.sampler) // self.batch_size)


def to_device(batch: Batch, device: torch.device) -> Batch:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


# ---------------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------------

@dataclass
class EpochRecord:
    epoch: int
    loss: float
    parts: dict[str, float]
    samples: int                  # over all processes
    seconds: float
    samples_per_s: float
    eval: dict | None = None


@dataclass
class History:
    label: str
    epochs: list[EpochRecord] = field(default_factory=list)
    device: str = "cpu"
    precision: str = "fp32"
    world_size: int = 1
    max_memory_bytes: int | None = None  # CUDA peak allocated, None on the CPU

    @property
    def samples_per_s(self) -> float:
        seconds = sum(e.seconds for e in self.epochs)
        return sum(e.samples for e in self.epochs) / seconds if seconds else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "samples_per_s": self.samples_per_s}


Privatize = Callable[[nn.Module, torch.optim.Optimizer, DataLoader], tuple[nn.Module, torch.optim.Optimizer, DataLoader]]


def fit(student: nn.Module, train: DictDataset, objective: Objective, *, teacher: nn.Module | None = None,
        device: torch.device | None = None, eval_data: DictDataset | None = None, rank: int = 0,
        world_size: int = 1, ddp_wrap: Callable[[nn.Module], nn.Module] | None = None,
        privatize: Privatize | None = None, label: str = "student", progress: bool = True,
        trainable: Callable[[nn.Module], list] | None = None, bucket_by_length: bool = True) -> History:
    """Train `student` in place with `objective` and return its per-epoch history.

    DDP: pass rank, world_size and `ddp_wrap` (see kt_core.distill.ddp); `privatize` swaps in
    DP-SGD's model, optimizer and loader (security.dp.engine.make_private, passed in by the
    site's distiller) after the loader is built. `trainable` picks the
    parameters to optimize (default: all that require grad). `bucket_by_length` batches padded
    sequences of similar length together (off where batches must match another run's exactly)."""
    from tqdm import tqdm

    cfg = objective.config
    device = device or resolve_device(cfg.device)
    if objective.needs_teacher and teacher is None and (objective.needs_teacher_model or "teacher_logits" not in train.tensors):
        raise ValueError(f"method {objective.name!r} needs a teacher")
    torch.manual_seed(cfg.seed * 7919 + rank)  # dropout differs per process, as in any DDP job
    student.to(device)
    if teacher is not None:
        teacher.to(device).eval().requires_grad_(False)
        if objective.needs_teacher and "teacher_logits" not in train.tensors:
            # the teacher is fixed: its logits on the originals are computed once, not every epoch
            # (by every DDP process on the whole set: each process's shard changes every epoch)
            train = train.with_column("teacher_logits", predict(teacher, train, device, amp=cfg.amp).float())
    precision = precision_for(device, cfg.amp and privatize is None)
    sampler = DistributedSampler(train, num_replicas=world_size, rank=rank, shuffle=True, seed=cfg.seed)
    if bucket_by_length and train.mask:
        sampler = BucketBatchSampler(sampler, train.tensors[train.mask].sum(1), cfg.batch_size, cfg.seed)
        loader = DataLoader(train, batch_sampler=sampler, collate_fn=train.collate)
    else:
        loader = DataLoader(train, batch_size=cfg.batch_size, sampler=sampler, collate_fn=train.collate)
    model = ddp_wrap(student) if ddp_wrap else student
    params = trainable(student) if trainable else [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if privatize is not None:
        model, optimizer, loader = privatize(model, optimizer, loader)
    total_steps = max(1, cfg.epochs * len(loader))
    warm = int(cfg.warmup * total_steps)
    # linear warm-up then linear decay to zero: the usual recipe for fine-tuning BERT-like models
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: (s + 1) / max(1, warm) if s < warm else max(0.0, (total_steps - s) / max(1, total_steps - warm)))
    scaler = precision.scaler(device)
    generator = torch.Generator().manual_seed(cfg.seed * 1000 + rank)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    history = History(label, device=str(device), precision=precision.name, world_size=world_size)
    main = rank == 0
    # DP-SGD clips per sample: no clip of the whole gradient on top
    stepping = _Stepping(scaler, schedule, precision, params,
                         cfg.max_grad_norm if cfg.max_grad_norm > 0 and privatize is None else 0.0)
    for epoch in range(1, cfg.epochs + 1):
        sampler.set_epoch(epoch)
        model.train()
        synchronize(device)
        started = time.perf_counter()
        bar = tqdm(loader, desc=f"{label} epoch {epoch}/{cfg.epochs}", unit="batch", leave=False,
                   disable=not (progress and main and sys.stderr.isatty()), mininterval=1.0)
        total, steps, seen, sums = _epoch(bar, model, teacher, objective, optimizer, stepping, device, generator)
        synchronize(device)
        seconds = time.perf_counter() - started
        record = EpochRecord(epoch, total / max(1, steps), {k: v / max(1, steps) for k, v in sums.items()},
                             seen * world_size, seconds, seen * world_size / seconds if seconds else 0.0)
        if eval_data is not None and main:
            record.eval = evaluate(student, eval_data, device)
        history.epochs.append(record)
        if main:
            acc = f", eval accuracy {record.eval['accuracy']:.4f}" if record.eval else ""
            log.info("%s epoch %d/%d: loss %.4f (%s), %.0f samples/s%s", label, epoch, cfg.epochs, record.loss,
                     ", ".join(f"{k} {v:.4f}" for k, v in record.parts.items()), record.samples_per_s, acc)
    if device.type == "cuda":
        history.max_memory_bytes = int(torch.cuda.max_memory_allocated(device))
    return history


@dataclass
class _Stepping:
    """How fit() steps: mixed precision, the learning-rate schedule, the optional gradient clip."""
    scaler: object
    schedule: object
    precision: object
    params: list
    clip: float


def _epoch(bar, model, teacher, objective: Objective, optimizer, how: _Stepping, device, generator):
    """One pass over the loader: (loss sum, steps, examples seen, loss parts summed)."""
    sums: dict[str, float] = {}
    total, steps, seen = 0.0, 0, 0
    for batch in bar:
        batch = to_device(batch, device)
        with how.precision.autocast(device):
            loss, parts = objective.loss(model, teacher, batch, generator)
        optimizer.zero_grad(set_to_none=True)
        how.scaler.scale(loss).backward()
        if how.clip:
            how.scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(how.params, how.clip)
        how.scaler.step(optimizer)
        how.scaler.update()
        how.schedule.step()
        steps += 1
        seen += int(batch["labels"].shape[0])
        total += float(loss.detach())
        for k, v in parts.items():
            sums[k] = sums.get(k, 0.0) + v
        bar.set_postfix(loss=f"{total / steps:.4f}")
    return total, steps, seen, sums


# ---------------------------------------------------------------------------------------------
# evaluation and timing
# ---------------------------------------------------------------------------------------------

@torch.no_grad()
def predict(model: nn.Module, data: DictDataset, device: torch.device, batch_size: int = 256,
            amp: bool = True) -> Tensor:
    """Logits for every example, in order, on the CPU."""
    was_training = model.training
    model.eval()
    precision = precision_for(device, amp)
    # shortest first, so each batch is cut to its own length; results go back to data order
    order = torch.argsort(data.tensors[data.mask].sum(1), stable=True) if data.mask else torch.arange(len(data))
    out = []
    for start in range(0, len(data), batch_size):
        batch = data.collate(data.__getitems__(order[start:start + batch_size]))
        with precision.autocast(device):
            out.append(model(to_device(batch, device)).float().cpu())
    model.train(was_training)
    logits = torch.cat(out)
    return torch.empty_like(logits).index_copy_(0, order, logits)


def evaluate(model: nn.Module, data: DictDataset, device: torch.device | None = None, batch_size: int = 256) -> dict:
    device = device or next(model.parameters()).device
    logits = predict(model, data, device, batch_size)
    labels = data.tensors["labels"]
    return {"accuracy": float((logits.argmax(-1) == labels).float().mean()),
            "loss": float(F.cross_entropy(logits, labels)), "n": len(labels)}


@torch.no_grad()
def inference_speed(model: nn.Module, data: DictDataset, device: torch.device, *, batch_size: int = 64,
                    latency_samples: int = 32, throughput_batches: int = 8) -> dict:
    """Latency of one example at a time (median, ms) and throughput at `batch_size` (examples/s),
    on real examples of `data` so that sequence lengths are realistic."""
    model.eval().to(device)
    n = len(data)
    singles = [data.collate(data.__getitems__([i % n])) for i in range(latency_samples)]
    model(to_device(singles[0], device))  # warm-up: lazy initialisation, allocator
    times = []
    for batch in singles:
        batch = to_device(batch, device)
        synchronize(device)
        t0 = time.perf_counter()
        model(batch)
        synchronize(device)
        times.append(time.perf_counter() - t0)
    times.sort()
    batches = [data.collate(data.__getitems__([(b * batch_size + i) % n for i in range(batch_size)]))
               for b in range(throughput_batches)]
    model(to_device(batches[0], device))
    synchronize(device)
    t0 = time.perf_counter()
    for batch in batches:
        model(to_device(batch, device))
    synchronize(device)
    seconds = time.perf_counter() - t0
    return {"latency_ms": 1000 * times[len(times) // 2], "throughput_per_s": batch_size * throughput_batches / seconds,
            "batch_size": batch_size, "device": str(device)}


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
