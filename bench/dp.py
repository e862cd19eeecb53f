"""DP-SGD cost: step time (and on a GPU, samples/s and memory) relative to plain SGD in the same run,
per Opacus per-sample-gradient mode.

Models
  demo         the demo's model: WAFFLe MLP 784-256-128-10, K = 5 (ktfed demo's [model] section on
               Fashion-MNIST's 784 inputs), per-sample gradients of its factorized layers by the
               project's own rule (security.dp.grad_samplers, `hooks` mode)
  dense-mlp    the same MLP with plain dense layers (the FedAvg baseline; every Opacus mode applies)
  transformer  a small pre-norm transformer encoder classifier over token ids, built here: 5.0M
               parameters on a GPU, so that GPU numbers are not dominated by launch overhead
               (0.53M in the full CPU run, 0.08M in quick mode)

Modes: plain SGD, then `hooks`, `ew`, `functorch` (what security.dp.engine offers) and `ghost`
(Opacus' fast gradient clipping; engine does not offer it, so it is driven with Opacus directly).
A mode the model cannot use is recorded as "unsupported: <reason>", with engine.check_model's own
refusal where it has one.

One DP step is what engine.train_dp does per batch: per-sample gradients, clipping to
max_grad_norm, Gaussian noise, the optimizer step (SGD with momentum, as the demo). Batches are
fixed and already on the device, so the figures are the model's step, not data loading. To survive
a shared, noisy host, all modes of one model run interleaved: R rounds, each timing a few steps of
every mode, and the ratio to plain is the median over rounds of (mode / plain in the same round).
On CPU the minor page faults per step are shown too: on this host, first touches of the freshly
allocated per-sample gradient tensors are a large share of a DP step on wide dense layers.
On CPU (one thread) a second table times one participant round end to end with the product's own
functions, kt_core.train.train_local vs security.dp.engine.train_dp (Poisson sampling, KL term),
on the demo model.

Device: CPU by default; `KTFED_BENCH_DEVICE=cuda python -m bench dp`, or
`python -m bench.dp --device cuda [--quick] [--out DIR]`. On CUDA: batch sizes 64 and 256,
samples/s and torch.cuda.max_memory_allocated per mode.
"""
from __future__ import annotations

import argparse
import gc
import os
import resource
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import participant.privacy  # noqa: F401  registers the adapters' per-sample gradient rules, as a site does
from kt_core.models import ModelConfig, build_model, kl_divergence
from kt_core.train import TrainConfig, make_optimizer_for, train_local
from security.dp.engine import GRAD_SAMPLE_MODES, DPSettings, DPUnsupportedError, check_model, train_dp
from security.dp import grad_samplers

from bench.common import RESULTS, Options, pyplot, say, table, write_json

NAME = "dp"
DESCRIPTION = "DP-SGD step time vs plain SGD per Opacus grad-sample mode (demo model, dense MLP, transformer)"
DEVICE_ENV = "KTFED_BENCH_DEVICE"
MODES = ("plain", *GRAD_SAMPLE_MODES, "ghost")
NOISE_MULTIPLIER = 1.0
MAX_GRAD_NORM = 1.0
LR = 0.05                 # the demo's [train] lr
DEMO_BATCH = 64           # the demo's [train] batch_size
DEMO_MODEL = dict(adapter="waffle", input_dim=784, hidden=(256, 128), num_classes=10)


def bench_device() -> torch.device:
    """The device named by KTFED_BENCH_DEVICE (default cpu); refuses cuda when there is none."""
    name = os.environ.get(DEVICE_ENV, "cpu").strip() or "cpu"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"{DEVICE_ENV}={name} but torch {torch.__version__} sees no CUDA device")
    if device.type not in ("cpu", "cuda"):
        raise RuntimeError(f"{DEVICE_ENV}={name}: only cpu and cuda are supported")
    return device


# ---------------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------------

class Block(nn.Module):
    """A pre-norm encoder block. Attention is built from nn.Linear projections and
    F.scaled_dot_product_attention rather than nn.MultiheadAttention, which Opacus has no
    per-sample rule for (it would need opacus.layers.DPMultiheadAttention)."""

    def __init__(self, d: int, heads: int, ff: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.norm2 = nn.LayerNorm(d)
        self.ff1 = nn.Linear(d, ff)
        self.ff2 = nn.Linear(ff, d)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, d)
        x = x + self.proj(attn)
        return x + self.ff2(F.gelu(self.ff1(self.norm2(x))))


class TinyTransformer(nn.Module):
    def __init__(self, vocab: int, seq_len: int, d: int, heads: int, layers: int, ff: int, classes: int = 10):
        super().__init__()
        self.tokens = nn.Embedding(vocab, d)
        self.positions = nn.Embedding(seq_len, d)
        self.blocks = nn.ModuleList(Block(d, heads, ff) for _ in range(layers))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)
        self.register_buffer("pos_ids", torch.arange(seq_len), persistent=False)

    def forward(self, ids: Tensor) -> Tensor:
        # positions per sample, materialized over the batch: Opacus needs a batch dimension on every
        # layer's input, and its ghost norm for embeddings calls .view() on the ids (no expand())
        b, t = ids.shape
        x = self.tokens(ids) + self.positions(self.pos_ids[:t].repeat(b, 1))
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x).mean(dim=1))


TRANSFORMER_SIZES = {
    # ~5.0M parameters: the size DESIGN.md quotes GPU figures for
    "gpu": dict(vocab=1000, seq_len=64, d=256, heads=4, layers=6, ff=1024),
    "cpu": dict(vocab=1000, seq_len=32, d=128, heads=4, layers=2, ff=512),
    "cpu-quick": dict(vocab=500, seq_len=16, d=64, heads=4, layers=1, ff=256),
}


@dataclass
class ModelSpec:
    label: str
    description: str
    build: Callable[[], nn.Module]
    batch: Callable[[int, torch.device, torch.Generator], tuple[Tensor, Tensor]]


def model_specs(device: torch.device, quick: bool) -> list[ModelSpec]:
    def mlp(mode: str) -> Callable[[], nn.Module]:
        return lambda: build_model(ModelConfig(**{**DEMO_MODEL, "adapter": mode}, seed=0))

    def images(b, dev, gen):
        return (torch.randn(b, DEMO_MODEL["input_dim"], generator=gen).to(dev),
                torch.randint(0, 10, (b,), generator=gen).to(dev))

    size_key = "gpu" if device.type == "cuda" else ("cpu-quick" if quick else "cpu")
    size = TRANSFORMER_SIZES[size_key]

    def tokens(b, dev, gen):
        return (torch.randint(0, size["vocab"], (b, size["seq_len"]), generator=gen).to(dev),
                torch.randint(0, 10, (b,), generator=gen).to(dev))

    hidden = "-".join(str(h) for h in DEMO_MODEL["hidden"])
    return [
        ModelSpec("demo", f"WAFFLe MLP 784-{hidden}-10, K={ModelConfig(**DEMO_MODEL).n_factors} (ktfed demo)", mlp("waffle"), images),
        ModelSpec("dense-mlp", f"dense MLP 784-{hidden}-10", mlp("dense"), images),
        ModelSpec("transformer", f"transformer d={size['d']} L={size['layers']} ff={size['ff']} heads={size['heads']} "
                  f"seq={size['seq_len']} vocab={size['vocab']}", lambda: _seeded(TinyTransformer, **size), tokens),
    ]


def _seeded(cls, **kwargs) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return cls(**kwargs)


def public_params(model: nn.Module, x: Tensor, y: Tensor) -> list[nn.Parameter]:
    """Parameters the data loss never reaches (WAFFLe's Kumaraswamy sticks, in the KL term only):
    one probe backward, as the participant finds them; train_dp keeps them out of Opacus."""
    model.zero_grad(set_to_none=True)
    with torch.random.fork_rng(devices=[]):
        F.cross_entropy(model(x[:2]), y[:2]).backward()
    public = [p for p in model.parameters() if p.requires_grad and p.grad is None]
    model.zero_grad(set_to_none=True)
    return public


# ---------------------------------------------------------------------------------------------
# one training step per mode
# ---------------------------------------------------------------------------------------------

def make_step(model: nn.Module, mode: str, batch: int, x: Tensor, y: Tensor) -> Callable[[], None]:
    """A closure doing one optimizer step of `mode` on (x, y); raises DPUnsupportedError (or Opacus'
    own error) when the model cannot be trained that way. The DP modes are set up as
    security.dp.engine.train_dp sets them up (gate recording, wrap_model, DPOptimizer)."""
    from opacus.grad_sample.utils import wrap_model
    from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
    from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

    model.train()
    public = {id(p) for p in public_params(model, x, y)}
    for p in model.parameters():
        if id(p) in public:
            p.requires_grad_(False)
    private = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(private, lr=LR, momentum=0.9)
    if mode == "plain":
        def step():
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()
        return step

    # ghost clipping computes per-sample gradients (or their norms) through the same hooks as `hooks`
    check_model(model, "hooks" if mode == "ghost" else mode)
    grad_samplers.instrument(model)
    if mode == "ghost":
        gsm = wrap_model(model, "ghost", batch_first=True, loss_reduction="mean", strict=False,
                         max_grad_norm=MAX_GRAD_NORM)
        dp_opt = DPOptimizerFastGradientClipping(opt, noise_multiplier=NOISE_MULTIPLIER, max_grad_norm=MAX_GRAD_NORM,
                                                 expected_batch_size=batch, loss_reduction="mean")
        criterion = DPLossFastGradientClipping(gsm, dp_opt, nn.CrossEntropyLoss(reduction="mean"), "mean")

        def step():
            dp_opt.zero_grad(set_to_none=True)
            criterion(gsm(x), y).backward()   # two backward passes: norms, then the reweighted loss
            dp_opt.step()
        return step

    extra = {} if mode == "ew" else {"strict": False}
    try:
        gsm = wrap_model(model, mode, batch_first=True, loss_reduction="mean", **extra)
    except NotImplementedError as err:
        raise DPUnsupportedError(f"Opacus cannot compute per-sample gradients in {mode!r} mode: {err}") from None
    # the noise comes from the global generator here: engine's OS-seeded CPU generator cannot feed
    # CUDA tensors, and which generator draws the noise does not change the step's cost
    dp_opt = DPOptimizer(opt, noise_multiplier=NOISE_MULTIPLIER, max_grad_norm=MAX_GRAD_NORM,
                         expected_batch_size=batch, loss_reduction="mean")

    def step():
        dp_opt.zero_grad(set_to_none=True)
        F.cross_entropy(gsm(x), y).backward()
        dp_opt.step()
    return step


def _oneline(err: Exception, limit: int = 300) -> str:
    return " ".join(str(err).split())[:limit]


def _minor_faults() -> int:
    """First touches of fresh memory; on this host they are a large part of a step that allocates
    big per-sample gradient tensors (host-side only: CUDA allocations do not show here)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _ready(spec: ModelSpec, mode: str, batch: int, x: Tensor, y: Tensor, device: torch.device,
           warmup: int) -> Callable[[], None]:
    """A fresh model on the device with its step function, warmed up."""
    step = make_step(spec.build().to(device), mode, batch, x, y)
    for _ in range(warmup):
        step()
    _sync(device)
    return step


def _footprint(spec: ModelSpec, mode: str, batch: int, x: Tensor, y: Tensor, device: torch.device,
               warmup: int) -> int:
    """Peak CUDA memory of one mode alone above what was allocated before it (the batch): model,
    optimizer state, activations, per-sample gradients or norms. Built, run and dropped on its own,
    since in the timing phase every mode's model is resident at once."""
    gc.collect()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step = _ready(spec, mode, batch, x, y, device, warmup)
    peak = torch.cuda.max_memory_allocated(device) - base
    del step
    gc.collect()
    return int(peak)


def measure_model(spec: ModelSpec, batch: int, device: torch.device, rounds: int, steps: int,
                  warmup: int = 2) -> dict:
    """Every mode of one model at one batch size: first each mode alone (support, warm-up, and on
    CUDA its memory footprint), then `rounds` interleaved rounds of one untimed and `steps` timed steps per mode."""
    gen = torch.Generator().manual_seed(1)
    x, y = spec.batch(batch, device, gen)
    params = sum(p.numel() for p in spec.build().parameters())
    steps_by_mode: dict[str, Callable[[], None]] = {}
    res: dict[str, dict] = {}
    for mode in MODES:
        try:
            memory = _footprint(spec, mode, batch, x, y, device, warmup) if device.type == "cuda" else None
            steps_by_mode[mode] = _ready(spec, mode, batch, x, y, device, warmup)
        except (DPUnsupportedError, NotImplementedError) as err:
            res[mode] = {"status": f"unsupported: {_oneline(err)}"}
            continue
        except (RuntimeError, ValueError, TypeError) as err:  # e.g. out of memory, or an Opacus limitation
            res[mode] = {"status": f"failed: {type(err).__name__}: {_oneline(err)}"}
            continue
        res[mode] = {"status": "ok"}
        if memory is not None:
            res[mode]["peak_memory_bytes"] = memory

    per_round: dict[str, list[float]] = {m: [] for m in steps_by_mode}
    faults: dict[str, int] = {m: 0 for m in steps_by_mode}
    for _ in range(rounds):
        for mode, step in steps_by_mode.items():
            # one untimed step first: the previous mode's frees leave the allocator (and on this host
            # the page tables) in a state a site running one mode all along would not see
            step()
            _sync(device)
            f0 = _minor_faults()
            t0 = time.perf_counter()
            for _ in range(steps):
                step()
            _sync(device)
            per_round[mode].append((time.perf_counter() - t0) / steps)
            faults[mode] += _minor_faults() - f0
    plain = per_round.get("plain")
    for mode, times in per_round.items():
        s = float(np.median(times))
        res[mode].update(ms_per_step=s * 1e3, samples_per_s=batch / s, ms_per_step_rounds=[t * 1e3 for t in times],
                         minor_page_faults_per_step=faults[mode] / (rounds * steps))
        if plain:
            res[mode]["ratio_to_plain"] = float(np.median([t / p for t, p in zip(times, plain)]))
    del steps_by_mode
    return {"params": params, "batch": batch, "rounds": rounds, "steps_per_round": steps, "modes": res}


# ---------------------------------------------------------------------------------------------
# one participant round with the product's own functions (CPU)
# ---------------------------------------------------------------------------------------------

def participant_round(steps: int, repeats: int) -> dict:
    """train_local vs train_dp (hooks, Poisson sampling, KL as a public term) on the demo model for
    `steps` steps of batch 64 from the same synthetic data; seconds per step, alternating the two."""
    cfg = ModelConfig(**DEMO_MODEL, seed=0)
    n = DEMO_BATCH * steps
    gen = torch.Generator().manual_seed(2)
    x, y = torch.randn(n, DEMO_MODEL["input_dim"], generator=gen), torch.randint(0, 10, (n,), generator=gen)
    train_cfg = TrainConfig(epochs=1, batch_size=DEMO_BATCH, lr=LR, max_steps=steps)
    plain, dp, ratios = [], [], []
    for r in range(repeats):
        model = build_model(cfg)
        result = train_local(model, x, y, TrainConfig(**{**train_cfg.__dict__, "seed": r}))
        plain.append(result.seconds / result.steps)

        model = build_model(cfg)
        public = public_params(model, x, y)
        public_ids = {id(p) for p in public}
        private = [p for p in model.parameters() if p.requires_grad and id(p) not in public_ids]
        result = train_dp(model, x, y, loss_fn=F.cross_entropy, optimizer=make_optimizer_for(private, train_cfg),
                          settings=DPSettings(noise_multiplier=NOISE_MULTIPLIER, max_grad_norm=MAX_GRAD_NORM,
                                              batch_size=DEMO_BATCH, epochs=1, max_steps=steps, grad_sample_mode="hooks"),
                          public_loss=lambda m=model: kl_divergence(m) / n, public_params=public,
                          public_optimizer=make_optimizer_for(public, train_cfg), seed=r)
        dp.append(result.seconds / max(result.steps, 1))
        ratios.append(dp[-1] / plain[-1])
    return {"model": "demo", "steps": steps, "repeats": repeats, "batch_size": DEMO_BATCH,
            "plain_ms_per_step": float(np.median(plain)) * 1e3, "dp_hooks_ms_per_step": float(np.median(dp)) * 1e3,
            "ratio": float(np.median(ratios)),
            "functions": "kt_core.train.train_local vs security.dp.engine.train_dp (hooks, Poisson sampling)"}


# ---------------------------------------------------------------------------------------------
# run
# ---------------------------------------------------------------------------------------------

def run(opts: Options) -> dict:
    import opacus

    device = bench_device()
    cuda = device.type == "cuda"
    threads = torch.get_num_threads()
    if not cuda:
        torch.set_num_threads(1)  # a shared 2-core host: one thread is steadier, and the ratios are what count
    batches = (64, 256) if cuda else (DEMO_BATCH,)
    rounds, steps = (1, 1) if opts.quick else ((5, 10) if cuda else (7, 4))   # --quick: a smoke test
    warmup = 1 if opts.quick else 2
    out = {"device": str(device), "device_name": torch.cuda.get_device_name(device) if cuda else "cpu",
           "torch": torch.__version__, "opacus": opacus.__version__, "threads": torch.get_num_threads(),
           "noise_multiplier": NOISE_MULTIPLIER, "max_grad_norm": MAX_GRAD_NORM, "optimizer": f"SGD lr {LR} momentum 0.9",
           "dtype": "float32", "batches": list(batches), "rounds": rounds, "steps_per_round": steps,
           "notes": {"ghost": "Opacus fast gradient clipping (not offered by security.dp.engine): layers with a norm "
                              "sampler (nn.Linear, nn.Embedding) get ghost norms, the others (the project's adapters, "
                              "LayerNorm) fall back to their per-sample gradient rule",
                     "x plain": "median over rounds of (mode step time / plain step time in the same round)"},
           "models": {}}
    say(f"[dp] {out['device_name']}, torch {torch.__version__}, opacus {opacus.__version__}, "
        f"{out['threads']} thread(s); batches {list(batches)}; {rounds} interleaved rounds x {steps} steps per mode")
    if cuda:
        # cuBLAS allocates its workspace on the first product: not any one mode's memory
        a = torch.ones(64, 64, device=device, requires_grad=True)
        (a @ a).sum().backward()
        _sync(device)
    try:
        with warnings.catch_warnings():
            # the first layer's input needs no gradient, so Opacus' full backward hooks say so on every
            # step (engine.train_dp silences the same warning); functorch mode tries a CPU autocast
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            warnings.filterwarnings("ignore", message="In CPU autocast")
            for spec in model_specs(device, opts.quick):
                entry = {"description": spec.description, "batches": {}}
                for batch in batches:
                    t0 = time.monotonic()
                    r = measure_model(spec, batch, device, rounds, steps, warmup)
                    entry["params"] = r["params"]
                    entry["batches"][str(batch)] = r
                    say(f"  {spec.label} ({r['params']:,} parameters), batch {batch}: {time.monotonic() - t0:.1f} s")
                out["models"][spec.label] = entry
            if not cuda:
                out["participant_round"] = participant_round(steps=2 if opts.quick else 30,
                                                             repeats=1 if opts.quick else 3)
    finally:
        torch.set_num_threads(threads)

    _print(out)
    _plot(out, opts)
    return out


def _print(out: dict) -> None:
    cuda = out["device"].startswith("cuda")
    rows = []
    for label, entry in out["models"].items():
        for batch, r in entry["batches"].items():
            for mode, m in r["modes"].items():
                if m["status"] != "ok":
                    rows.append([label, batch, mode, "-", "-", "-", "-", m["status"]])
                    continue
                row = [label, batch, mode, f"{m['ms_per_step']:.2f}", f"{m['samples_per_s']:,.0f}",
                       f"{m['ratio_to_plain']:.2f}"]
                row.append(f"{m['peak_memory_bytes'] / 2**20:,.0f}" if cuda else f"{m['minor_page_faults_per_step']:,.0f}")
                rows.append(row + ["ok"])
    headers = ["model", "batch", "mode", "ms/step", "samples/s", "x plain",
               "peak MiB (mode alone)" if cuda else "page faults/step", "status"]
    say(table(headers, rows, align="lrl" + "r" * (len(headers) - 4) + "l",
              title=f"\nDP-SGD vs plain SGD on {out['device_name']} (x plain = median over rounds of the "
                    f"same-round ratio; noise {out['noise_multiplier']}, clip {out['max_grad_norm']})"))
    for label, entry in out["models"].items():
        say(f"  {label}: {entry['description']}, {entry['params']:,} parameters")
    pr = out.get("participant_round")
    if pr:
        say(table(["function", "ms/step"], [["train_local (plain)", f"{pr['plain_ms_per_step']:.2f}"],
                                            ["train_dp (hooks)", f"{pr['dp_hooks_ms_per_step']:.2f}"],
                                            ["ratio", f"{pr['ratio']:.2f}"]],
                  title=f"\none participant round on the demo model, the product's functions ({pr['steps']} steps "
                        f"of ~{pr['batch_size']}, median of {pr['repeats']})"))


def _plot(out: dict, opts: Options) -> None:
    plt = pyplot()
    panels = [(label, batch, r) for label, e in out["models"].items() for batch, r in e["batches"].items()]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.6), squeeze=False)
    for ax, (label, batch, r) in zip(axes[0], panels):
        modes = [m for m in MODES if m in r["modes"]]
        ratios = [r["modes"][m].get("ratio_to_plain", 0.0) for m in modes]
        bars = ax.bar(modes, ratios, color=["grey" if m == "plain" else "tab:blue" for m in modes])
        for bar, m in zip(bars, modes):
            if r["modes"][m]["status"] != "ok":
                ax.text(bar.get_x() + bar.get_width() / 2, 0.05, "n/a", ha="center", fontsize=8, rotation=90)
        ax.set_title(f"{label}, batch {batch}", fontsize=9)
        ax.tick_params(axis="x", labelrotation=45, labelsize=8)
        ax.set_ylabel("step time / plain SGD")
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"DP-SGD cost per grad-sample mode ({out['device_name']})", fontsize=10)
    fig.tight_layout()
    opts.out.mkdir(parents=True, exist_ok=True)
    fig.savefig(opts.out / f"{stem(out['device'])}.png", dpi=110)
    plt.close(fig)


def stem(device: str) -> str:
    """Results file name: a CUDA run gets its own, so it does not overwrite the CPU figures."""
    return NAME if device == "cpu" else f"{NAME}-{device.replace(':', '')}"


def main(argv: list[str] | None = None) -> int:
    """`python -m bench.dp --device cuda`: the device option that `python -m bench` does not have."""
    parser = argparse.ArgumentParser(prog="python -m bench.dp", description=DESCRIPTION)
    parser.add_argument("--device", default=os.environ.get(DEVICE_ENV, "cpu"), help="cpu or cuda[:N]")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    os.environ[DEVICE_ENV] = args.device
    t0 = time.monotonic()
    data = run(Options(quick=args.quick, out=args.out))
    data = {"benchmark": NAME, "quick": args.quick, "wall_s": time.monotonic() - t0, "cpus": os.cpu_count(), **data}
    say(f"\nwrote {write_json(args.out, stem(data['device']), data)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
