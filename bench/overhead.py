"""Framework overhead per round: what a round costs beyond the participants' own compute.

    overhead = RoundSummary.seconds - max over sites of "<site>/compute_seconds"

`seconds` is the coordinator's clock from pushing the task to finishing the aggregate, so the
overhead holds the task push, the download of the global state, the upload (encode, mTLS, chunking,
digests, validation) and the aggregation. It does not hold the coordinator's persisting of the new
state (safetensors + fsync + SQLite), which happens after `seconds` is taken; that shows up in the
`gap` column: the time between two rounds' commits that neither round's `seconds` covers.
"""
from __future__ import annotations

from kt_core.manifest import manifest_of
from kt_core.models import ModelConfig, build_model

from bench.common import (Options, PKI, fmt, federation_config, mib, percentiles, pyplot, run_federation, say,
                          site_names, table)

NAME = "overhead"
DESCRIPTION = "framework overhead per round (round wall time minus the slowest site's compute), 3 sites, mTLS"
TARGET_MS = 50.0
N_SITES = 3
HIDDEN = (1024, 896)    # with digits' 64 inputs: ~1.0M shared parameters when dense
DATASET = "digits"


def variants() -> list[dict]:
    return [
        dict(label="dense-1M", mode="dense", hidden=HIDDEN, n_factors=16),
        dict(label="waffle", mode="waffle", hidden=HIDDEN, n_factors=16),
    ]


def shared_size(v: dict) -> tuple[int, int]:
    cfg = ModelConfig(mode=v["mode"], input_dim=64, hidden=tuple(v["hidden"]), n_factors=v["n_factors"])
    m = manifest_of(build_model(cfg))
    return m.shared_numel(), m.shared_nbytes()


def analyse(result) -> list[dict]:
    rows = []
    prev_commit = None
    for r in result.rounds:
        compute = r["compute_seconds"]
        slowest_site = max(compute, key=compute.get) if compute else None
        slowest = compute[slowest_site] if compute else float("nan")
        commit = result.completed_at.get(r["round"])
        gap = None
        if commit is not None and prev_commit is not None:
            gap = (commit - prev_commit - r["seconds"]) * 1000
        prev_commit = commit
        rows.append({"round": r["round"], "round_ms": r["seconds"] * 1000, "slowest_compute_ms": slowest * 1000,
                     "slowest_site": slowest_site, "overhead_ms": (r["seconds"] - slowest) * 1000,
                     "gap_ms": gap, "contributors": len(r["contributors"]),
                     "bytes_up_per_site": max(r["bytes_by_participant"].values(), default=0)})
    return rows


def run(opts: Options) -> dict:
    rounds = opts.rounds or (3 if opts.quick else 10)
    sites = site_names(N_SITES)
    pki = PKI(N_SITES)
    out = {"target_median_ms": TARGET_MS, "sites": N_SITES, "rounds": rounds, "dataset": DATASET,
           "transport": "gRPC, mutual TLS, 127.0.0.1", "train": "1 local epoch capped at 2 steps of 32",
           "variants": {}}
    try:
        for v in variants():
            numel, nbytes = shared_size(v)
            say(f"[overhead] {v['label']}: {v['mode']} {list(v['hidden'])} on {DATASET}, {numel:,} shared "
                f"parameters ({mib(nbytes)} per upload), {N_SITES} participant processes, {rounds} rounds")

            def progress(r, label=v["label"]):
                compute = r["compute_seconds"]
                slowest = max(compute.values(), default=float("nan"))
                say(f"  {label} round {r['round']:>2}/{rounds}: {r['seconds'] * 1000:7.1f} ms, slowest compute "
                    f"{slowest * 1000:7.1f} ms, overhead {(r['seconds'] - slowest) * 1000:6.1f} ms")

            cfg = federation_config(sites=sites, rounds=rounds, mode=v["mode"], hidden=v["hidden"], dataset=DATASET,
                                    n_factors=v["n_factors"], epochs=1, batch_size=32, lr=0.01, max_steps=2)
            meta = dict(mode=v["mode"], hidden=tuple(v["hidden"]), dataset=DATASET, n_factors=v["n_factors"])
            result = run_federation(f"overhead-{v['label']}", pki, sites, cfg, rounds, keep=opts.keep,
                                    meta=meta, on_round=progress)
            rows = analyse(result)
            steady = [r["overhead_ms"] for r in rows if r["round"] >= 2] or [r["overhead_ms"] for r in rows]
            stats = percentiles(steady)
            stats_all = percentiles([r["overhead_ms"] for r in rows])
            gaps = percentiles([r["gap_ms"] for r in rows if r["gap_ms"] is not None])
            round_ms = percentiles([r["round_ms"] for r in rows if r["round"] >= 2] or [r["round_ms"] for r in rows])
            out["variants"][v["label"]] = {
                "mode": v["mode"], "hidden": list(v["hidden"]), "n_factors": v["n_factors"],
                "shared_params": numel, "shared_bytes": nbytes,
                "overhead_ms_steady": stats, "overhead_ms_all_rounds": stats_all, "round_ms_steady": round_ms,
                "gap_ms": gaps, "target_met": stats["median"] < TARGET_MS,
                "startup_s": result.startup_s, "wall_s": result.wall_s, "rounds": rows}
            say(table(["round", "round ms", "slowest compute ms", "slowest site", "overhead ms", "gap ms"],
                      [[r["round"], f"{r['round_ms']:.1f}", f"{r['slowest_compute_ms']:.1f}", r["slowest_site"],
                        f"{r['overhead_ms']:.1f}", fmt(r["gap_ms"], ".1f")] for r in rows],
                      title=f"\n{v['label']}: per round (gap = time between commits not inside `seconds`: "
                            f"persisting + starting the next round)"))
            say()
    finally:
        pki.close()

    summary = []
    for label, d in out["variants"].items():
        s = d["overhead_ms_steady"]
        summary.append([label, f"{d['shared_params']:,}", mib(d["shared_bytes"]), s["n"], f"{s['median']:.1f}",
                        f"{s['p90']:.1f}", f"{s['max']:.1f}", f"{d['round_ms_steady']['median']:.1f}",
                        fmt(d["gap_ms"]["median"], ".1f"), "met" if d["target_met"] else "NOT met"])
    say(table(["model", "shared params", "upload", "rounds", "median ms", "p90 ms", "max ms", "round ms (median)",
               "gap ms (median)", f"median < {TARGET_MS:.0f} ms"], summary,
              title="overhead per round, rounds 2.. (round 1 includes warm-up; all rounds are in the JSON)"))
    dense = out["variants"].get("dense-1M")
    if dense:
        verdict = "MET" if dense["target_met"] else "NOT MET"
        say(f"\ntarget (median framework overhead < {TARGET_MS:.0f} ms per round, ~1M-parameter dense model): "
            f"{verdict} ({dense['overhead_ms_steady']['median']:.1f} ms)")
    _plot(out, opts)
    return out


def _plot(out: dict, opts: Options) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, d in out["variants"].items():
        rows = d["rounds"]
        ax.plot([r["round"] for r in rows], [r["overhead_ms"] for r in rows], marker="o", label=f"{label} overhead")
        ax.plot([r["round"] for r in rows], [r["round_ms"] for r in rows], ls=":", alpha=0.6, label=f"{label} round")
    ax.axhline(TARGET_MS, color="red", lw=0.8, ls="--", label=f"target {TARGET_MS:.0f} ms")
    ax.set_xlabel("round")
    ax.set_ylabel("ms")
    ax.set_yscale("log")
    ax.set_title(f"framework overhead per round ({out['sites']} sites, mTLS, loopback)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    opts.out.mkdir(parents=True, exist_ok=True)
    fig.savefig(opts.out / f"{NAME}.png", dpi=110)
    plt.close(fig)
