"""The site's local distiller: compress the site's teacher into a small student, on the site.

    ktfed participant distill --config site.toml [--finetune-teacher] [--nproc N]

reads the `[distill]` section (kt_core.distill.config), loads the site's teacher checkpoint and
data, trains a student with MixKD, plain KD or no KD (kt_core.distill), and writes into
`distill.out_dir`: student.safetensors, report.json and curves.png (teacher vs student).

The student and its training data never leave the site: this module opens no connection and
writes nothing outside out_dir (and, with --finetune-teacher, the teacher checkpoint it was told
to write). The report carries the student's SHA-256, not its weights.

Several processes (DDP) run when launched by torchrun or with `processes`/--nproc > 1; with
`[distill.dp] enabled`, DP-SGD goes through security.dp.engine: each process clips per-sample
gradients and rank 0 adds the noise (see `opacus_privatizer`).
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict
from pathlib import Path

import torch

from kt_core.distill import ddp
from kt_core.distill.bert import build_student, check_student_size
from kt_core.distill.checkpoint import state_digest
from kt_core.distill.config import SiteDistillConfig, load_site_config
from kt_core.distill.device import capabilities
from kt_core.distill.loop import History, evaluate, fit, inference_speed
from kt_core.distill.mixkd import DistillConfig, make_objective
from kt_core.distill.text import (TextDataError, freeze_word_embeddings, load_pretrained, load_text_data,
                                  load_text_model, save_text_model)

log = logging.getLogger("ktfed.participant.distill")

STUDENT_FILE, REPORT_FILE, CURVES_FILE = "student.safetensors", "report.json", "curves.png"


def opacus_privatizer(noise_multiplier: float, max_grad_norm: float):
    """fit()'s `privatize` hook: DP-SGD through security.dp.engine.make_private (Opacus
    underneath: Poisson sampling, per-sample clipping, Gaussian noise from OS entropy). Under DDP
    the model arrives wrapped in the engine's distributed wrapper: every process clips, rank 0
    alone adds noise, the sum is all-reduced."""
    from security.dp.engine import make_private

    def privatize(model, optimizer, loader):
        privatize.training = make_private(model, optimizer, loader, noise_multiplier=noise_multiplier,
                                          max_grad_norm=max_grad_norm)
        t = privatize.training
        return t.module, t.optimizer, t.data_loader

    return privatize


def ddp_wrap_for(cfg: SiteDistillConfig, ctx: ddp.DistContext, device: torch.device):
    if not ctx.distributed:
        return None
    if cfg.dp.enabled:
        from security.dp.engine import distributed_wrapper

        return distributed_wrapper()
    return ddp.wrapper(ctx, device)


def run_distill(cfg: SiteDistillConfig, *, finetune_teacher: bool = False, ctx: ddp.DistContext | None = None,
                progress: bool = True) -> dict:
    """Distill one student; returns the report (also written to out_dir/report.json on rank 0)."""
    ctx = ctx or ddp.DistContext.from_env()
    device = ddp.setup(ctx, cfg.train.device)
    try:
        if cfg.task == "text":
            return _run_text(cfg, ctx, device, finetune_teacher, progress)
        from kt_core.distill import nav  # the navigation task pulls in kt_core.vln: only when asked for

        return nav.run_site_distill(cfg, ctx, device, progress=progress, write=_write_outputs)
    finally:
        ddp.teardown()


def _run_text(cfg: SiteDistillConfig, ctx: ddp.DistContext, device: torch.device, finetune_teacher: bool,
              progress: bool) -> dict:
    started = time.monotonic()
    data = load_text_data(cfg.data, cache_dir=cfg.out_dir / "cache")
    log.info("text data: %s", data.describe())
    teacher_history = None
    if finetune_teacher:
        teacher = load_pretrained(len(data.labels))
        ft = cfg.teacher_finetune
        tcfg = DistillConfig(method="none", epochs=ft.epochs, lr=ft.lr, batch_size=ft.batch_size, seed=cfg.train.seed,
                             device=cfg.train.device, amp=cfg.train.amp)
        teacher_history = fit(teacher, data.train, make_objective(tcfg), device=device, eval_data=data.test,
                              rank=ctx.rank, world_size=ctx.world_size, ddp_wrap=ddp.wrapper(ctx, device),
                              label="teacher", progress=progress, trainable=freeze_word_embeddings)
        if ctx.is_main:
            save_text_model(cfg.teacher, teacher, data.labels, extra={"fine_tuned_on": len(data.train)})
            log.info("teacher written to %s", cfg.teacher)
        ddp.barrier()
    else:
        teacher, meta = load_text_model(cfg.teacher)
        labels = tuple(meta["extra"].get("labels", ()))
        if labels and labels != data.labels:
            raise TextDataError(f"distill.teacher: {cfg.teacher} was trained on labels {list(labels)}, "
                                f"the site's data has {list(data.labels)}")
        if teacher.config.num_labels != len(data.labels):
            raise TextDataError(f"distill.teacher: {cfg.teacher} predicts {teacher.config.num_labels} classes, "
                                f"the site's data has {len(data.labels)}")
    source = load_pretrained(len(data.labels)) if cfg.student_init == "pretrained" else teacher
    student = build_student(source, cfg.student, teacher=teacher, token_counts=data.token_counts, seed=cfg.train.seed)
    params = check_student_size(student, teacher)
    privatize = opacus_privatizer(cfg.dp.noise_multiplier, cfg.dp.max_grad_norm) if cfg.dp.enabled else None
    history = fit(student, data.student_train, make_objective(cfg.train), teacher=teacher, device=device,
                  eval_data=data.test, rank=ctx.rank, world_size=ctx.world_size,
                  ddp_wrap=ddp_wrap_for(cfg, ctx, device), privatize=privatize, label=f"student ({cfg.train.method})",
                  progress=progress)
    if not ctx.is_main:
        return {}
    cpu = torch.device("cpu")
    report = {
        "task": "text", "method": cfg.train.method, "labels": list(data.labels),
        "data": {"train": len(data.train), "student_train": len(data.student_train), "test": len(data.test)},
        "teacher": {"path": str(cfg.teacher), "parameters": params[1], "test": evaluate(teacher, data.test, device),
                    "cpu_speed": inference_speed(teacher.to(cpu), data.test, cpu)},
        "student": {"parameters": params[0], "layers": student.config.layers, "hidden": student.config.hidden,
                    "vocab": student.config.vocab_size, "test": evaluate(student, data.test, device),
                    "cpu_speed": inference_speed(student.to(cpu), data.test, cpu)},
        "history": history.to_dict(), "teacher_history": teacher_history.to_dict() if teacher_history else None,
        "dp": asdict(cfg.dp), "epsilon": _epsilon(privatize), "world_size": ctx.world_size,
        "device": str(device), "capabilities": capabilities(), "wall_s": time.monotonic() - started,
    }
    report["student"]["retained"] = report["student"]["test"]["accuracy"] / max(1e-9, report["teacher"]["test"]["accuracy"])
    report["compression"] = params[1] / params[0]
    return _write_outputs(cfg, student, report, lambda path: save_text_model(
        path, student, data.labels, extra={"method": cfg.train.method, "distilled_from": str(cfg.teacher)}))


def _epsilon(privatize) -> dict | None:
    """(epsilon, delta) this distillation spent, delta = min(1e-5, 1 / (10 N))."""
    training = getattr(privatize, "training", None)
    if training is None:
        return None
    delta = min(1e-5, 0.1 / training.records)
    return {"epsilon": training.epsilon(delta), "delta": delta, "accountant": "prv"}


def _write_outputs(cfg: SiteDistillConfig, student, report: dict, save) -> dict:
    """Everything goes under out_dir, on this machine: the student, the report, the curves."""
    out = cfg.out_dir
    out.mkdir(parents=True, exist_ok=True)
    save(out / STUDENT_FILE)
    report["student"]["path"] = str(out / STUDENT_FILE)
    report["student"]["sha256"] = state_digest(student)
    report["curves"] = str(out / CURVES_FILE)
    tmp = out / (REPORT_FILE + ".tmp")
    tmp.write_text(json.dumps(report, indent=2, default=str) + "\n")
    os.replace(tmp, out / REPORT_FILE)
    plot_curves(report, out / CURVES_FILE)
    return report


def plot_curves(report: dict, path: Path) -> None:
    """Teacher vs student: test accuracy per epoch (action accuracy for navigation; the teacher's
    fine-tuning when it ran here, else its final accuracy as a line), and the student's loss parts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    th = report.get("teacher_history")
    if th and th["epochs"] and th["epochs"][0].get("eval"):
        ax1.plot([e["epoch"] for e in th["epochs"]], [e["eval"]["accuracy"] for e in th["epochs"]], marker="o",
                 label="teacher (fine-tuning)")
    teacher_value = report["teacher"]["test"].get("accuracy")
    if teacher_value is not None:
        ax1.axhline(teacher_value, ls="--", color="grey", label=f"teacher {teacher_value:.3f}")
    epochs = report["history"]["epochs"]
    values = [e["eval"]["accuracy"] for e in epochs if e.get("eval")]
    if values:
        ax1.plot(range(1, len(values) + 1), values, marker="o",
                 label=f"student ({report['method']}, {report['student']['parameters']:,} params)")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("test accuracy" if report["task"] == "text" else "action accuracy (unseen episodes)")
    ax1.legend(fontsize=8)
    ax1.grid(alpha=0.3)
    for part in sorted({k for e in epochs for k in e["parts"]}):
        ax2.plot([e["epoch"] for e in epochs], [e["parts"].get(part) for e in epochs], marker=".", label=part)
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("student training loss")
    ax2.legend(fontsize=8)
    ax2.grid(alpha=0.3)
    from matplotlib.ticker import MaxNLocator

    for ax in (ax1, ax2):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(f"{report['task']} distillation: teacher {report['teacher']['parameters']:,} params vs student "
                 f"{report['student']['parameters']:,}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# -- several processes on this machine (without torchrun) ------------------------------------

def _spawned(config_path: str, device: str | None, finetune_teacher: bool) -> None:
    torch.set_num_threads(1)
    cfg = load_site_config(Path(config_path))
    if device:
        cfg = cfg.with_device(device)
    run_distill(cfg, finetune_teacher=finetune_teacher, progress=False)


def run_local_processes(config_path: Path, nproc: int, *, device: str | None = None,
                        finetune_teacher: bool = False) -> dict:
    """`nproc` DDP processes on this machine, as torchrun would start them; returns rank 0's report."""
    cfg = load_site_config(config_path)
    ddp.spawn(_spawned, nproc, args=(str(config_path), device, finetune_teacher))
    return json.loads((cfg.out_dir / REPORT_FILE).read_text())


def history_summary(history: History) -> str:
    last = history.epochs[-1]
    acc = f", test accuracy {last.eval['accuracy']:.4f}" if last.eval else ""
    return f"{len(history.epochs)} epoch(s), {history.samples_per_s:.0f} samples/s on {history.device}{acc}"


__all__ = ["run_distill", "run_local_processes", "opacus_privatizer", "plot_curves", "STUDENT_FILE",
           "REPORT_FILE", "CURVES_FILE"]
