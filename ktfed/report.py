"""What the demo prints and draws: the live per-round table, the summary and the accuracy plot."""
from __future__ import annotations

from pathlib import Path

from kt_core.config import RunConfig, load_file
from kt_core.tasks import KEPT_LAST_LOCAL, task_for
from kt_core.wire import federation_pb2 as pb


class RoundTable:
    """Round, accuracy per site, bytes uploaded per site, round time: one row per completed round."""

    def __init__(self, sites: list[str]):
        self.sites = sites
        self.accuracy: dict[str, list[tuple[int, float]]] = {s: [] for s in sites}
        # the navigation task's rollouts per round ([vln] round_rollout_episodes), round 0 included
        self.success: dict[str, list[tuple[int, float]]] = {s: [] for s in sites}
        self.uploaded = 0
        self.uploads = 0

    def header(self) -> str:
        acc = " ".join(f"{'acc ' + s:>12}" for s in self.sites)
        sent = " ".join(f"{'kB ' + s:>11}" for s in self.sites)
        return f"{'round':>5} {acc} {sent} {'time':>7}"

    def row(self, record: pb.RoundSummary) -> str:
        lines = []
        if record.round == 1:  # round 0: the initial model, as each site measured it before training
            before = [record.metrics.get(f"{s}/accuracy_before") for s in self.sites]
            for site, value in zip(self.sites, before):
                if value is not None:
                    self.accuracy[site].append((0, value))
                start = record.metrics.get(f"{site}/success_rate_before")
                if start is not None:
                    self.success[site].append((0, start))
            lines.append(f"{0:>5} " + " ".join(_cell(v, 12) for v in before) + " "
                         + " ".join(f"{'-':>11}" for _ in self.sites) + f" {'-':>7}")
        accs = []
        for site in self.sites:
            value = record.metrics.get(f"{site}/accuracy")
            accs.append(value)
            if value is not None:
                self.accuracy[site].append((record.round, value))
            rate = record.metrics.get(f"{site}/success_rate")
            if rate is not None:
                self.success[site].append((record.round, rate))
        sent = [record.bytes_by_site.get(s) for s in self.sites]
        self.uploaded += sum(b for b in sent if b)
        self.uploads += sum(1 for b in sent if b)
        lines.append(f"{record.round:>5} " + " ".join(_cell(v, 12) for v in accs) + " "
                     + " ".join(f"{b / 1000:>11.1f}" if b else f"{'-':>11}" for b in sent)
                     + f" {record.seconds:>6.2f}s")
        return "\n".join(lines)

    def plot(self, path: Path, title: str, alone: dict[str, float] | None = None,
             alone_success: dict[str, float] | None = None) -> Path | None:
        """The per-round panels; `alone` / `alone_success`: each site's accuracy / success rate when
        trained alone with the same budget, drawn as a dashed line in the site's colour on the
        accuracy / success-rate panel."""
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return None
        panels = [(self.accuracy, "local test accuracy", alone or {})]
        if any(self.success.values()):
            panels.append((self.success, "success rate (rollouts, unseen seeds)", alone_success or {}))
        fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
        for ax, (series, label, references) in zip(axes[0], panels):
            for site, points in series.items():
                if points:
                    line, = ax.plot([r for r, _ in points], [a for _, a in points], marker="o", label=site)
                    if site in references:
                        ax.axhline(references[site], color=line.get_color(), linestyle="--", linewidth=1,
                                   label=f"{site} alone")
            ax.set_xlabel("round")
            ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
            ax.legend()
        fig.suptitle(title)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path


def _cell(value: float | None, width: int) -> str:
    return f"{value:>{width}.3f}" if value is not None else f"{'-':>{width}}"


def _final_evaluations(workdir: Path, sites: list[str]) -> dict[str, dict]:
    """Each site's STATE/evaluation-<run>.json (its task's evaluation at the end of the run)."""
    import json

    out = {}
    for site in sites:
        found = sorted((workdir / "sites" / site).glob("evaluation-*.json"))
        if found:
            out[site] = json.loads(found[-1].read_text())
    return out


def kept_model_accuracy(table: RoundTable, evaluations: dict[str, dict]) -> dict[str, float]:
    """Each site's test accuracy of the model it keeps, from its final evaluation; where a site wrote
    none, its last round's (that round's local training, before the last aggregation)."""
    out = {s: pts[-1][1] for s, pts in table.accuracy.items() if pts}
    for site, evaluation in evaluations.items():
        value = evaluation.get("test_accuracy")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[site] = float(value)
    return out


def _kept(evaluation: dict | None) -> str:
    model = (evaluation or {}).get("model")
    return "" if not isinstance(model, str) else ("last local model; " if model.startswith(KEPT_LAST_LOCAL)
                                                  else "final aggregate; ")


def dense_bytes_per_update(config: RunConfig) -> int:
    """What one update of the same model would cost with dense FedAvg (every weight shared)."""
    return task_for(config).dense_update_bytes()


def _audit_lines(workdir: Path, audit_dirs: list[Path]) -> list[str]:
    """The audit logs' verification, the epsilon each site spent, and each site's policy judged
    against what it sent (ktfed.audit_policy, as the auditor's report does)."""
    from ktfed.audit_policy import check_sites
    from security.audit import verify

    result = verify(audit_dirs, workdir / "pki" / "ca.crt")
    lines = [f"audit logs ({len(audit_dirs)} producers, hash-chained and signed): "
             f"{'verified' if result.ok else 'NOT verified'}, {sum(len(v.entries) for v in result.logs)} entries; "
             f"check or report them offline with: ktfed audit verify|report {workdir / 'coordinator' / 'audit'} "
             f"{workdir / 'sites'}/*/audit --pki {workdir / 'pki'}"]
    ledger = {}   # each site's last DP ledger entry: what it spent of its budget by the end
    for v in result.logs:
        ledger.update({v.producer: e.body for e in v.entries if e.kind == "dp" and v.role != "coordinator"})
    if ledger:
        lines.append("differential privacy: record-level DP-SGD at every site, epsilon spent of its budget: "
                     + ", ".join(f"{site} {_number(b, 'epsilon_cumulative'):.2f} of {_number(b, 'budget'):g}"
                                 for site, b in sorted(ledger.items()))
                     + f" (delta {_number(next(iter(ledger.values())), 'delta'):g})")
    checks = check_sites(result)
    policies = {d: p for c in checks for d, p in c.policies.items()}
    if len(policies) == 1:   # the demo gives every site the same rules: say once what "held" held to
        (digest, policy), = policies.items()
        lines.append(f"site policy {digest[:12]} (every site's own file in {workdir / 'policies'}): "
                     + "; ".join(policy["rules"]))
    return lines + [c.line() for c in checks]


def _number(body: dict, key: str) -> float:
    from security.audit import AuditError, as_float

    try:
        return as_float(body.get(key)) or 0.0
    except AuditError:
        return float("nan")


def summary(status: pb.RunStatus, table: RoundTable, settings, workdir: Path, seconds: float,
            baselines: dict[str, dict] | None = None) -> str:
    """What the demo prints after the run; `baselines`: ktfed.demo_baselines' per-site reference
    points, shown beside the federated result."""
    lines = [f"run {status.header.run_id} {status.state}: {status.rounds_completed} rounds in {seconds:.1f}s"
             + (f", {status.aborted_attempts} aborted attempt(s) retried" if status.aborted_attempts else "")]
    evaluations = _final_evaluations(workdir, table.sites)
    final = kept_model_accuracy(table, evaluations)
    lines.append("final local test accuracy of the model each site keeps (the final aggregate with its private "
                 "factors, or its last local model where that scored higher on its validation part): " + ", ".join(
                     f"{s} {final[s]:.3f} ({_kept(evaluations.get(s))}round 0: {pts[0][1]:.3f})"
                     for s, pts in table.accuracy.items() if pts and s in final))
    config = load_file(workdir / "run.toml").resolved()
    if any(table.success.values()):
        lines.append("success rate per round (rollouts on unseen seeds of the site's level; round 0: before training): "
                     + "; ".join(f"{s} " + " ".join(f"{v:.2f}" for _, v in pts) for s, pts in table.success.items() if pts))
    lines += task_for(config).report_final(evaluations)
    # imported here: the site's training code it runs is heavy, and most of this module is not
    from ktfed.demo_baselines import metric_of, report, report_accuracy

    if baselines:
        lines += report(baselines, evaluations) or report_accuracy(baselines, final)
    dense = dense_bytes_per_update(config) * table.uploads
    if table.uploaded:
        lines.append(f"bytes uploaded: {table.uploaded:,} in {table.uploads} updates of shared factors; "
                     f"dense FedAvg of the same model would send {dense:,} ({dense / table.uploaded:.1f}x more)")
    secure = [r.round for r in status.rounds if r.secagg]
    if secure:
        lines.append(f"secure aggregation: on in {len(secure)} of {len(status.rounds)} rounds (t-of-n masking; "
                     f"the coordinator saw only each round's sum; SecAgg summary per round in its SQLite)")
    audit_dirs = [workdir / "coordinator" / "audit"] + sorted((workdir / "sites").glob("*/audit"))
    if all((d / "audit.jsonl").is_file() for d in audit_dirs):
        lines += _audit_lines(workdir, audit_dirs)
    references = baselines or {}
    png = table.plot(workdir / "accuracy.png", f"ktfed demo: {settings.adapter}, {len(table.sites)} sites",
                     metric_of(references, "local_only"), metric_of(references, "local_only", "success_rate"))
    lines.append(f"coordinator state (SQLite + safetensors): {workdir / 'coordinator'}")
    lines.append(f"site-local state (private factors, never sent): {workdir / 'sites'}")
    lines.append(f"logs: {workdir / 'logs'}" + (f"; accuracy plot: {png}" if png else ""))
    return "\n".join(lines)

