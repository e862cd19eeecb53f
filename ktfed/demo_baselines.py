"""The demo's two reference points per site, beside its federated result: the model it started from
(the navigation demo: the pretrained backbone alone; the image demo: round 0's initial model), and
the same site trained alone with the federation's budget.

Both run the product's own site code (`participant.trainer.LocalTrainer`: the run's task, its data
and its kept optimizer) on the run's config: the backbone alone is the site's model before its
first round (its adapters start as the identity), and local-only takes the rounds the coordinator
would have planned (the same epochs, batch size, learning rate, step cap and per-round seed) with
no aggregation in between. Both are then scored by the task's own final evaluation, the rollouts
every site runs after the federation (the same unseen seeds), so the three numbers are paired, and
by its `evaluate` on the site's own test split (as `test_<metric>`; `test_accuracy` is what the
demo's table and plot show per round).
Under record-level DP the site trained alone spends the same epsilon (its own ledger, in
`state_dir`), so the comparison holds the privacy budget fixed as well.
"""
from __future__ import annotations

from pathlib import Path

from coordinator.strategy import strategy_for
from kt_core.config import RunConfig
from participant.trainer import LocalTrainer


def site_baselines(config: RunConfig, site: str, backbone: Path | None, state_dir: Path) -> dict[str, dict]:
    """{"backbone": evaluation, "local_only": evaluation} for one site: the task's final_evaluation
    dict with the test split's metrics (`evaluate`) beside it; "backbone" is the untrained start
    when the task hosts none. Nothing is written outside `state_dir`; nothing is sent anywhere."""
    trainer = LocalTrainer(site, "local-only", config, state_dir, backbone=backbone)
    out = {"backbone": _score(trainer)}
    strategy = strategy_for(config)   # the coordinator's per-round plan, without its aggregation
    for round_no in range(1, config.federation.rounds + 1):
        t = strategy.configure(round_no)
        trainer.train(t.epochs, t.batch_size, t.lr, t.max_steps, t.seed, round_no=round_no,
                      attempt_id=f"local-only-{round_no}")
    out["local_only"] = _score(trainer)
    return out


def _score(trainer: LocalTrainer) -> dict:
    result = dict(trainer.task.final_evaluation(trainer.built, trainer.data))
    result.update({f"test_{k}": v for k, v in trainer.evaluate().items()})
    return result


def report(baselines: dict[str, dict], federated: dict[str, dict]) -> list[str]:
    """Lines per site: success rate on its own level and on the held-out ones, for the backbone
    alone, local-only and federated (nothing for a task without rollouts)."""
    if not any("success_rate" in (base.get("local_only") or {}) for base in baselines.values()):
        return []

    def sr(r: dict | None, key: str) -> str:
        value = (r or {}).get(key)
        return f"{value:.2f}" if isinstance(value, (int, float)) else "  - "

    lines = ["success rate on unseen seeds, own level / held-out level: the backbone alone, the site trained "
             "alone with the same budget, federated:"]
    for site, base in baselines.items():
        fed = federated.get(site)
        cells = [f"{name} {sr(r, 'success_rate')} / {sr(r, 'held_out_success_rate')}"
                 for name, r in (("backbone", base.get("backbone")), ("local-only", base.get("local_only")),
                                 ("federated", fed))]
        lines.append(f"  {site}: " + ", ".join(cells))
    return lines


def report_accuracy(baselines: dict[str, dict], federated: dict[str, float]) -> list[str]:
    """Lines per site for a task scored by its test split alone (the image demo): the initial
    model, the site trained alone and federated (`federated`: the test accuracy of the model it keeps)."""
    start, alone = metric_of(baselines, "backbone"), metric_of(baselines, "local_only")
    rows = [(site, start[site], alone[site], federated[site]) for site in baselines
            if site in start and site in alone and isinstance(federated.get(site), (int, float))]
    if not rows:
        return []
    lines = ["local test accuracy: the initial model, the site trained alone with the same budget "
             "(rounds, epochs, learning rate and epsilon), federated:"]
    for site, start, alone, fed in rows:
        lines.append(f"  {site}: initial {start:.3f}, local-only {alone:.3f}, federated {fed:.3f} "
                     f"({fed - alone:+.3f} from federating)")
    return lines


def metric_of(baselines: dict[str, dict], point: str, metric: str = "test_accuracy") -> dict[str, float]:
    """site -> one metric ("test_accuracy"; the navigation task's rollouts also "success_rate") of
    one reference point ("backbone" or "local_only"), for the sites that have it."""
    out = {}
    for site, base in baselines.items():
        value = (base.get(point) or {}).get(metric)
        if isinstance(value, (int, float)):
            out[site] = value
    return out
