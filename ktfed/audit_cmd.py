"""`ktfed audit`: the privacy auditor's commands.

    ktfed audit verify DIR... --ca CA.crt       check every chain, signature and cross-reference,
                                                strictly: every site's log, each run sealed; exit 0
                                                when all verify, 1 naming the first bad entry
                 [--partial] [--run RUN]        the lenient reading (a missing log or an unsealed
                                                run is a warning); only the entries of RUN
    ktfed audit report DIR... --ca CA.crt --out report/
                                                a self-contained HTML page + report.json + PNG plots,
                                                and a line per site: its policy held, or its violations
                                                (exit 1 when verification failed; the report says why)
    ktfed audit attack [--out DIR]              the empirical leakage tests (kt_core.leakage) under six
                                                conditions, with the real SecAgg and DP accountant

`register(subparsers)` adds these to the main CLI. The leakage conditions are wired here because
they need both kt_core (models) and security (SecAgg, accountant), which only ktfed may join.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path


def register(subparsers) -> None:
    audit = subparsers.add_parser("audit", help="privacy audit: verify logs, write the report, run leakage tests")
    sub = audit.add_subparsers(dest="audit_command", required=True)

    p = sub.add_parser("verify", help="verify audit logs offline against the federation CA")
    p.add_argument("dirs", nargs="+", metavar="DIR",
                   help="audit folders (each holds audit.jsonl and certs/), or the state folders holding them")
    _add_ca_args(p)
    p.add_argument("--json", action="store_true", help="print the full result as JSON")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("report", help="write the auditor's report (HTML, JSON, PNG)")
    p.add_argument("dirs", nargs="+", metavar="DIR", help="audit folders, or the state folders holding them")
    _add_ca_args(p)
    p.add_argument("--out", default="audit-report", help="output folder (default: audit-report)")
    p.add_argument("--leakage", help="folder written by `ktfed audit attack --out` to include in the report")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("attack", help="empirical leakage tests: gradient inversion, membership, one-run epsilon")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="write leakage.json and reconstructions.png here")
    p.add_argument("--conditions", help="comma-separated subset of: " + ", ".join(_condition_names()))
    p.add_argument("--quick", action="store_true", help="fewer inversion iterations and membership rounds")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--json", action="store_true", help="print the table as JSON")
    p.set_defaults(func=cmd_attack)


def _add_ca_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ca", help="the federation CA certificate (ca.crt)")
    p.add_argument("--pki", help="a PKI folder made by `ktfed pki` (uses its ca.crt)")
    p.add_argument("--partial", action="store_true",
                   help="the lenient reading: a missing peer log, an unsealed run or an unclosed log is a "
                        "warning, not an error (what cannot be pinned is listed)")
    p.add_argument("--run", action="append", metavar="RUN",
                   help="only the entries of this run (repeatable); logs without it are left out")


def _ca_path(args) -> Path:
    if args.ca:
        return Path(args.ca)
    if args.pki:
        return Path(args.pki) / "ca.crt"
    raise SystemExit("error: give --ca CA.crt (or --pki DIR): logs are verified against the federation CA")


def _verify(args):
    from security.audit import AuditError, verify

    ca = _ca_path(args)
    if not ca.is_file():
        print(f"error: no CA certificate at {ca}", file=sys.stderr)
        return None
    try:
        return verify([Path(d) for d in args.dirs], ca, partial=args.partial, runs=args.run)
    except (AuditError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return None


def cmd_verify(args) -> int:
    result = _verify(args)
    if result is None:
        return 2
    print(json.dumps(result.to_dict(), indent=2) if args.json else result.summary())
    return 0 if result.ok else 1


def cmd_report(args) -> int:
    from ktfed.audit_report import write_report

    if args.leakage and not (Path(args.leakage) / "leakage.json").is_file():
        print(f"error: no leakage.json in {args.leakage} (write it with `ktfed audit attack --out DIR`)",
              file=sys.stderr)
        return 2
    result = _verify(args)
    if result is None:
        return 2
    paths = write_report(result, Path(args.out), leakage_dir=Path(args.leakage) if args.leakage else None)
    print(result.summary())
    for site in paths["site_policies"]:   # each site's policy against what it sent (report section 5)
        print(site["line"])
    print(f"report written: {paths['html']} (with {', '.join(p.name for p in paths['files'])})")
    return 0 if result.ok else 1


# ---------------------------------------------------------------- leakage tests

def _condition_names() -> list[str]:
    return ["dense-1step", "dense-multistep", "factorized", "dp", "secagg", "dp+secagg"]


def accountant(sample_rate: float, noise_multiplier: float, steps: int, delta: float) -> float:
    """The project's primary accountant (PRV), as the sites' ledgers use it."""
    from security.dp.accounting import RoundSpend, epsilon

    return epsilon([RoundSpend(sample_rate, noise_multiplier, steps)], delta, "prv")


def secagg_aggregate(seed: int = 0, clip_norm: float = 100.0, bits: int = 20):
    """The sample-weighted mean as the coordinator gets it from secure aggregation: each site masks
    count * update (and its count); the server unmasks only the sums. Refuses an update the L2 clip
    would change, so the experiment measures SecAgg, not clipping."""
    import numpy as np

    from security.secagg import SecAggProtocolSettings, simulate

    rng = np.random.default_rng(seed)

    def aggregate(updates: dict, counts: dict):
        weighted = {s: np.asarray(u, np.float64) * counts[s] for s, u in updates.items()}
        largest = max(float(np.linalg.norm(w)) for w in weighted.values())
        if largest > clip_norm:
            raise ValueError(f"a weighted update has L2 norm {largest:.3g} > SecAgg clip {clip_norm}: raise clip_norm")
        total, count, _ = simulate(weighted, counts, SecAggProtocolSettings(clip_norm=clip_norm, bits=bits), rng=rng)
        return total / count

    return aggregate


def run_attacks(seed: int = 0, conditions: list[str] | None = None, quick: bool = False, progress=None):
    """The leakage suite with the real secure aggregation and the project's accountant."""
    from kt_core.leakage import CONDITIONS, SuiteSettings, run_suite

    chosen = CONDITIONS
    if conditions:
        unknown = sorted(set(conditions) - {c.name for c in CONDITIONS})
        if unknown:
            raise ValueError(f"unknown condition(s) {unknown}; choose from {[c.name for c in CONDITIONS]}")
        chosen = tuple(c for c in CONDITIONS if c.name in conditions or c.name == "dense-1step")
    settings = SuiteSettings(seed=seed)
    if quick:
        settings = SuiteSettings(seed=seed, dlg_iterations=150, mia_rounds=8, canaries=300)
    return run_suite(settings, chosen, aggregate=secagg_aggregate(seed), accountant=accountant, progress=progress)


def cmd_attack(args) -> int:
    import torch

    from kt_core.leakage import format_table

    torch.set_num_threads(max(1, args.threads))
    names = [c.strip() for c in args.conditions.split(",")] if args.conditions else None
    try:
        result = run_attacks(args.seed, names, args.quick,
                             progress=None if args.json else (lambda msg: print(f"  {msg}", file=sys.stderr)))
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    data = _jsonable(result.to_dict())
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "leakage.json").write_text(json.dumps(data, indent=2))
        plot_reconstructions(result, out / "reconstructions.png")
    print(json.dumps(data, indent=2) if args.json else format_table(result))
    problems = [r["condition"] for r in result.rows if isinstance(r.get("epsilon_accountant"), float)
                and r["epsilon_lower_bound"] > r["epsilon_accountant"]]
    if problems:
        # the audit refutes the accountant: a bug in the DP mechanism or its accounting
        print(f"error: the empirical epsilon lower bound exceeds the accountant's epsilon for {problems}",
              file=sys.stderr)
        return 1
    return 0


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return "inf" if value > 0 else "-inf"
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def plot_reconstructions(result, path: Path) -> Path:
    """The victim's images (top row), then the attacker's best analytic and inversion guesses under
    each condition."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [("original", result.targets)]
    for r in result.rows:
        images = result.reconstructions[r["condition"]]
        rows.append((f"{r['condition']}\nanalytic", images["analytic"]))
        rows.append((f"{r['condition']}\ninversion", images["dlg"]))
    cols = len(result.targets)
    fig, axes = plt.subplots(len(rows), cols, figsize=(1.3 * cols + 1.6, 1.15 * len(rows)), squeeze=False)
    for i, (label, images) in enumerate(rows):
        for j in range(cols):
            ax = axes[i][j]
            ax.imshow(images[j].reshape(8, 8), cmap="gray_r", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=7)
    fig.suptitle("What the attacker reconstructs of the victim's batch", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
