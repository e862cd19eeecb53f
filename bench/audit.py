"""Audit-log overhead per round: the same federation with the audit log on and off, in one run.

Each configuration (plain uploads, and secure aggregation) runs twice, audit on and audit off
(`--no-audit` on every process), alternating, so the machine's load drifts across both. Time: the
median of the coordinator's round seconds, and the time between two rounds' commits (which also
holds the coordinator's persisting). Bytes: what each producer's audit log grew by per round.
"""
from __future__ import annotations

import os
import shutil
import statistics

from bench.common import Options, PKI, federation_config, pyplot, run_federation, say, site_names, table

NAME = "audit"
DESCRIPTION = "audit log overhead per round (time and bytes) vs audit off, 3 sites, mTLS"
N_SITES = 3
# --quick: a smoke test, plain uploads only, one site (every participant process costs seconds to start)
QUICK_SITES = 1


def _gaps(completed_at: dict[int, float]) -> list[float]:
    rounds = sorted(completed_at)
    return [completed_at[b] - completed_at[a] for a, b in zip(rounds, rounds[1:])]


def _audit_bytes(workdir, sites) -> dict[str, int]:
    out = {"coordinator": (workdir / "coordinator" / "audit" / "audit.jsonl").stat().st_size}
    for site in sites:
        out[site] = (workdir / "sites" / site / "audit" / "audit.jsonl").stat().st_size
    return out


def run(opts: Options) -> dict:
    rounds = opts.rounds or (3 if opts.quick else 12)   # round 1 is left out: 3 leave a round and a gap
    n_sites = QUICK_SITES if opts.quick else N_SITES
    sites = site_names(n_sites)
    pki = PKI(n_sites)
    base = federation_config(sites=sites, rounds=rounds, adapter="waffle", hidden=(256, 128), max_steps=5)
    configs = {"plain": base}
    if not opts.quick:
        configs["secagg"] = base + "\n[secagg]\nenabled = true\nclip_norm = 100.0\n"
    results: dict[str, dict] = {}
    try:
        for label, toml in configs.items():
            for audit in (True, False):
                key = f"{label}/{'audit' if audit else 'no-audit'}"
                say(f"  {key}: {rounds} rounds")
                previous = os.environ.get("KTFED_NO_AUDIT")
                os.environ["KTFED_NO_AUDIT"] = "false" if audit else "true"
                try:
                    result = run_federation(key.replace("/", "-"), pki, sites, toml, rounds, keep=True,
                                            meta={"bench": NAME, "key": key})
                finally:
                    if previous is None:
                        del os.environ["KTFED_NO_AUDIT"]
                    else:
                        os.environ["KTFED_NO_AUDIT"] = previous
                # round 1 carries the participants' torch warm-up: leave it out of both
                seconds = [r["seconds"] for r in result.rounds[1:]]
                entry = {"round_seconds_median": statistics.median(seconds),
                         "commit_gap_median": statistics.median(_gaps(result.completed_at)[1:] or [0.0]),
                         "rounds": rounds}
                if audit:
                    size = _audit_bytes(result.workdir, sites)
                    entry["audit_bytes_per_round"] = {k: v / rounds for k, v in size.items()}
                results[key] = entry
                shutil.rmtree(result.workdir, ignore_errors=True)
    finally:
        pki.close()

    rows, summary = [], {}
    for label in configs:
        on, off = results[f"{label}/audit"], results[f"{label}/no-audit"]
        per_round = on["audit_bytes_per_round"]
        summary[label] = {
            "round_ms_audit": 1000 * on["round_seconds_median"], "round_ms_no_audit": 1000 * off["round_seconds_median"],
            "round_ratio": on["round_seconds_median"] / off["round_seconds_median"],
            "gap_ms_audit": 1000 * on["commit_gap_median"], "gap_ms_no_audit": 1000 * off["commit_gap_median"],
            "gap_ratio": on["commit_gap_median"] / max(off["commit_gap_median"], 1e-9),
            "audit_bytes_per_round_coordinator": per_round["coordinator"],
            "audit_bytes_per_round_site_mean": statistics.mean(v for k, v in per_round.items() if k != "coordinator")}
        s = summary[label]
        rows.append([label, f"{s['round_ms_no_audit']:.1f}", f"{s['round_ms_audit']:.1f}", f"{s['round_ratio']:.2f}x",
                     f"{s['gap_ms_no_audit']:.1f}", f"{s['gap_ms_audit']:.1f}", f"{s['gap_ratio']:.2f}x",
                     f"{s['audit_bytes_per_round_coordinator'] / 1024:.1f}",
                     f"{s['audit_bytes_per_round_site_mean'] / 1024:.1f}"])
    say(table(["config", "round ms off", "round ms on", "ratio", "commit gap off", "gap on", "ratio",
               "coord kB/round", "site kB/round"], rows,
              title=f"audit log on vs off (median over rounds 2..{rounds}; same invocation, alternating)"))
    png = _plot(opts, summary)
    return {"rounds": rounds, "sites": n_sites, "runs": results, "summary": summary, "png": png}


def _plot(opts: Options, summary: dict):
    plt = pyplot()
    if plt is None:
        return None
    labels = list(summary)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    xs = range(len(labels))
    ax.bar([x - 0.2 for x in xs], [summary[k]["round_ms_no_audit"] for k in labels], width=0.4, label="audit off")
    ax.bar([x + 0.2 for x in xs], [summary[k]["round_ms_audit"] for k in labels], width=0.4, label="audit on")
    ax.set_xticks(list(xs), labels)
    ax.set_ylabel("median round time (ms)")
    ax.set_title("audit log overhead per round")
    ax.legend()
    fig.tight_layout()
    path = opts.out / "audit.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)
