"""A site's optimizer, kept from round to round (momentum buffers, Adam moments) and on its disk.

Why. A round is a few local steps (a 10-site digits federation: 2-3 batches a site a round). An
optimizer built afresh every round starts Adam with empty moments, so its first steps are
sign-like steps of the full learning rate on every entry, noise included, and SGD's momentum never
builds up. On a product of factors (WAFFLe's W_a diag(r b) W_b) those steps did more harm than
progress: the model a site held after its own local training scored *below* the one it had just
received (digits, 10 sites, Adam, partition seeds 1-2: 0.84-0.94 after local training vs 0.88-0.97
after aggregation) and the aggregate learned slowly. Keeping each site's optimizer state between
rounds, as the site keeps its private factors, measured on the same validation cells (mean local
test accuracy after aggregation, fresh -> kept, `bench/README.md` has the grid):

    WAFFLe  Adam  Dirichlet 1.0 0.900 -> 0.963, Dirichlet 0.5 0.942 -> 0.965, 2-class shards 0.964 -> 0.982
    WAFFLe  SGD   Dirichlet 1.0 0.919 -> 0.973, Dirichlet 0.5 0.932 -> 0.970, 2-class shards 0.957 -> 0.987
    FedAvg  SGD   Dirichlet 1.0 0.910 -> 0.966, 2-class shards 0.832 -> 0.928; Adam about unchanged

The state never leaves the site: it is derived from the site's data as its private factors are,
and like them it is written next to them (`save` / `load`, safetensors, names checked). After
aggregation the shared tensors are replaced in place, so the moments carried over describe the
site's recent steps on the previous global model: a stale estimate that still beats none, which is
what the figures above measure. `TrainConfig.keep_optimizer_state = False` restores the fresh
optimizer per round. DP-SGD builds its own (security.dp.engine) and does not use this.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from kt_core.train import TrainConfig, make_optimizer

# what each optimizer keeps per parameter ("step" is a scalar, the rest have the parameter's shape)
STATE_KEYS = {"adam": ("step", "exp_avg", "exp_avg_sq"), "sgd": ("momentum_buffer",)}
_SEP = "::"


class OptimizerStateError(ValueError):
    pass


class SiteOptimizer:
    """The optimizer of one site's model for a whole run: `for_round(cfg)` hands the same one back
    every round (with this round's learning rate), or a new one when the optimizer's kind changed."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.optimizer: torch.optim.Optimizer | None = None
        self._kind: tuple | None = None
        self._scales: list[float] = []

    @staticmethod
    def _kind_of(cfg: TrainConfig) -> tuple:
        return (cfg.optimizer, cfg.momentum) if cfg.optimizer == "sgd" else (cfg.optimizer,)

    def for_round(self, cfg: TrainConfig) -> torch.optim.Optimizer | None:
        """The optimizer for this round's training, None when the config asks for a fresh one
        (kt_core.train.train_steps then builds it)."""
        if not cfg.keep_optimizer_state:
            self.optimizer, self._kind = None, None
            return None
        if self.optimizer is None or self._kind != self._kind_of(cfg):
            self.optimizer, self._kind = make_optimizer(self.model, cfg), self._kind_of(cfg)
            lr0 = cfg.lr
            self._scales = [g["lr"] / lr0 for g in self.optimizer.param_groups]
        else:
            # the coordinator may choose another learning rate this round; the groups keep their
            # multipliers (kt_core.factorized.ScaledLRParameter)
            for group, scale in zip(self.optimizer.param_groups, self._scales, strict=True):
                group["lr"] = cfg.lr * scale
        return self.optimizer

    def reset(self) -> None:
        """Start the next round with a fresh optimizer (after a round whose training diverged: its
        moments must not carry on)."""
        self.optimizer, self._kind = None, None

    # -- on disk ----------------------------------------------------------------------------------
    def state_tensors(self) -> dict[str, Tensor]:
        """name::key -> tensor for every parameter with optimizer state (empty before any round)."""
        if self.optimizer is None:
            return {}
        names = {id(p): n for n, p in self.model.named_parameters()}
        out = {}
        for p, state in self.optimizer.state.items():
            for key, value in state.items():
                if isinstance(value, Tensor):
                    out[f"{names[id(p)]}{_SEP}{key}"] = value.detach().to("cpu", copy=True).contiguous()
        return out

    def save(self, path: Path) -> None:
        """Atomically (a torn file would refuse the next start); nothing written before a round."""
        tensors = self.state_tensors()
        if not tensors:
            return
        path = Path(path)
        tmp = path.with_suffix(".tmp")
        save_file(tensors, str(tmp), metadata={"optimizer": self._kind[0]})
        os.chmod(tmp, 0o600)   # derived from the site's data, like its private factors
        os.replace(tmp, path)

    def load(self, path: Path, cfg: TrainConfig) -> bool:
        """Restore the state `save` wrote, for this config's optimizer. False (and nothing
        changed) when there is no file or the config keeps no state; OptimizerStateError naming
        what is wrong when the file does not fit this model and optimizer."""
        path = Path(path)
        if not path.exists() or not cfg.keep_optimizer_state:
            return False
        try:
            tensors = load_file(str(path))
        except (SafetensorError, OSError) as err:
            raise OptimizerStateError(f"optimizer state {path} is unusable: {err}") from None
        state = self._check(tensors, cfg, path)
        optimizer = self.for_round(cfg)
        params = dict(self.model.named_parameters())
        for name, values in state.items():
            optimizer.state[params[name]] = values
        return True

    def _check(self, tensors: dict[str, Tensor], cfg: TrainConfig, path: Path) -> dict[str, dict]:
        keys = STATE_KEYS[cfg.optimizer] if cfg.optimizer == "adam" or cfg.momentum else ()
        params = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        state: dict[str, dict] = {}
        for full, value in sorted(tensors.items()):
            name, sep, key = full.rpartition(_SEP)
            where = f"optimizer state {path}: tensor {full!r}"
            if not sep or name not in params:
                raise OptimizerStateError(f"{where} names no trainable parameter of this model")
            if key not in keys:
                raise OptimizerStateError(f"{where}: {key!r} is not state of {cfg.optimizer} (expected {list(keys)})")
            p = params[name]
            shape = () if key == "step" else tuple(p.shape)
            if tuple(value.shape) != shape or not value.is_floating_point():
                raise OptimizerStateError(f"{where}: shape {tuple(value.shape)} {value.dtype}, expected {shape} floating")
            if not bool(torch.isfinite(value).all()) or (key in ("step", "exp_avg_sq") and bool((value < 0).any())):
                raise OptimizerStateError(f"{where}: holds non-finite or negative values")
            dtype = torch.float32 if key == "step" else p.dtype
            state.setdefault(name, {})[key] = value.to(device=p.device, dtype=dtype)
        for name, values in state.items():
            if set(values) != set(keys):
                raise OptimizerStateError(f"optimizer state {path}: parameter {name!r} lacks {sorted(set(keys) - set(values))}")
        return state
