"""Bytes per round per participant: WAFFLe (factorized) vs dense FedAvg, LoRA and FFA-LoRA.

Two sources that must agree: the factor manifest (`shared_nbytes`, what the egress guard lets out)
and a real federation (`RoundSummary.bytes_by_site`, the tensor payload bytes the
coordinator received per site and round; gRPC/TLS framing not included). A participant also
downloads the global shared state once per round: the same size, by construction.
"""
from __future__ import annotations

from kt_core.manifest import manifest_of
from kt_core.models import ModelConfig, build_model

from bench import overhead
from bench.common import (Options, PKI, federation_config, find_run, mib, pyplot, run_federation, say, site_names,
                          table)

NAME = "bytes"
DESCRIPTION = "bytes per round per participant: WAFFLe vs dense, LoRA, FFA-LoRA (manifest and measured)"
MODES = ("dense", "waffle", "lora", "ffa_lora")
TARGET_RATIO = 10.0
N_FACTORS, LORA_RANK = overhead.N_FACTORS, 8

# (label, data set, input_dim, hidden); the first is measured in a real federation: the overhead
# benchmark's model, so its dense and WAFFLe runs are reused when it ran first in the same invocation
ARCHS = [
    ("digits 64-1024-896-10 (overhead bench)", overhead.DATASET, 64, overhead.HIDDEN),
    ("digits 64-256-128-10 (waffle grid)", "digits", 64, (256, 128)),
    ("fmnist 784-256-128-10 (ktfed demo)", "fashion-mnist", 784, (256, 128)),
    ("fmnist 784-1024-512-10", "fashion-mnist", 784, (1024, 512)),
]


def manifest_bytes(mode: str, input_dim: int, hidden) -> tuple[int, int]:
    cfg = ModelConfig(adapter=mode, input_dim=input_dim, hidden=tuple(hidden), n_factors=N_FACTORS, lora_rank=LORA_RANK)
    m = manifest_of(build_model(cfg))
    return m.shared_numel(), m.shared_nbytes()


def run(opts: Options) -> dict:
    out = {"n_factors": N_FACTORS, "lora_rank": LORA_RANK, "target_ratio": TARGET_RATIO,
           "manifest": [], "measured": {}}
    rows = []
    for label, dataset, input_dim, hidden in ARCHS:
        dense_numel, dense_bytes = manifest_bytes("dense", input_dim, hidden)
        for mode in MODES:
            numel, nbytes = manifest_bytes(mode, input_dim, hidden)
            rec = {"arch": label, "dataset": dataset, "hidden": list(hidden), "mode": mode, "shared_params": numel,
                   "bytes_up": nbytes, "bytes_up_down": 2 * nbytes, "dense_over_mode": dense_bytes / nbytes}
            out["manifest"].append(rec)
            rows.append([label if mode == "dense" else "", mode, f"{numel:,}", f"{nbytes:,}", mib(nbytes),
                         f"{dense_bytes / nbytes:.1f}x"])
    say(table(["architecture", "mode", "shared params", "bytes up/round", "", "dense / mode"], rows,
              title=f"from the factor manifests (WAFFLe K={N_FACTORS}, LoRA rank {LORA_RANK}; download = "
                    f"the same again)"))

    # a real federation per mode on the first architecture
    label, dataset, input_dim, hidden = ARCHS[0]
    rounds = opts.rounds or (1 if opts.quick else 2)
    n_sites = 1 if opts.quick else 2   # --quick: a smoke test, each participant process costs seconds
    sites = site_names(n_sites)
    pki, measured_rows = None, []
    try:
        for mode in MODES:
            meta = dict(mode=mode, hidden=tuple(hidden), dataset=dataset, n_factors=N_FACTORS, chunk=1 << 20)
            result = find_run(**meta)
            if result is not None:
                say(f"[bytes] {mode}: reusing the {result.label} run of this invocation "
                    f"({len(result.rounds)} rounds x {len(result.rounds[0]['contributors'])} sites)")
            elif opts.quick and mode != "waffle":
                continue        # --quick measures WAFFLe only unless the overhead runs are there to reuse
            else:
                say(f"[bytes] measuring {mode} on {label}: {n_sites} participant processes, {rounds} rounds")
                pki = pki or PKI(n_sites)
                cfg = federation_config(sites=sites, rounds=rounds, adapter=mode, hidden=hidden, dataset=dataset,
                                        n_factors=N_FACTORS, lora_rank=LORA_RANK, epochs=1, batch_size=32,
                                        lr=0.01, max_steps=1)
                result = run_federation(f"bytes-{mode}", pki, sites, cfg, rounds, keep=opts.keep,
                                        meta=meta,
                                        on_round=lambda r, m=mode: say(
                                            f"  {m} round {r['round']}: {r['bytes_by_site']}"))
            per = [b for r in result.rounds for b in r["bytes_by_site"].values()]
            expected = manifest_bytes(mode, input_dim, hidden)[1]
            out["measured"][mode] = {
                "arch": label, "run": result.label,
                "rounds": [{"round": r["round"], "bytes_by_site": r["bytes_by_site"],
                            "bytes_received": r["bytes_received"]} for r in result.rounds],
                "bytes_per_round_per_participant": sum(per) / len(per), "min": min(per), "max": max(per),
                "manifest_bytes": expected, "matches_manifest": min(per) == max(per) == expected}
    finally:
        if pki is not None:
            pki.close()

    dense_ref = out["measured"].get("dense", {}).get("bytes_per_round_per_participant")
    dense_src = "measured"
    if dense_ref is None:
        dense_ref, dense_src = manifest_bytes("dense", input_dim, hidden)[1], "manifest"
    for mode, rec in out["measured"].items():
        ratio = dense_ref / rec["bytes_per_round_per_participant"]
        rec["dense_over_mode"] = ratio
        measured_rows.append([mode, f"{rec['bytes_per_round_per_participant']:,.0f}",
                              mib(rec["bytes_per_round_per_participant"]), f"{rec['manifest_bytes']:,}",
                              "yes" if rec["matches_manifest"] else "NO", f"{ratio:.1f}x"])
    say(table(["mode", "bytes up/round/site", "", "manifest", "equal", f"dense ({dense_src}) / mode"], measured_rows,
              title=f"\nmeasured in real federations ({label}; bytes_by_site, every round and site)"))

    waffle = out["measured"].get("waffle")
    if waffle:
        ratio = waffle["dense_over_mode"]
        out["waffle_vs_dense_ratio"] = ratio
        out["target_met"] = ratio >= TARGET_RATIO
        say(f"\nWAFFLe vs dense on {label}: {ratio:.1f}x fewer bytes per round per participant "
            f"(target >= {TARGET_RATIO:.0f}x: {'MET' if ratio >= TARGET_RATIO else 'NOT MET'})")
        others = [r for r in out["manifest"] if r["mode"] == "waffle" and r["arch"] != label]
        for r in others:
            say(f"  (manifest, {r['arch']}: {r['dense_over_mode']:.1f}x"
                f"{'' if r['dense_over_mode'] >= TARGET_RATIO else ' - below target'})")
    _plot(out, opts)
    return out


def _plot(out: dict, opts: Options) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4))
    archs = [a[0] for a in ARCHS]
    width = 0.8 / len(MODES)
    for i, mode in enumerate(MODES):
        values = [next(r["bytes_up"] for r in out["manifest"] if r["arch"] == a and r["mode"] == mode) for a in archs]
        ax.bar([j + i * width for j in range(len(archs))], values, width, label=mode)
    ax.set_xticks([j + width * (len(MODES) - 1) / 2 for j in range(len(archs))])
    ax.set_xticklabels(archs, fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("bytes uploaded per round per participant")
    measured = out["measured"].values()
    agree = "measured runs match it" if measured and all(m["matches_manifest"] for m in measured) else \
        "a measured run DIFFERS, see the JSON"
    ax.set_title(f"shared-state size by adapter (manifest; {agree})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    opts.out.mkdir(parents=True, exist_ok=True)
    fig.savefig(opts.out / f"{NAME}.png", dpi=110)
    plt.close(fig)
