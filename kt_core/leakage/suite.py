"""The leakage suite: every attack against every condition, side by side, in one seeded run.

For each condition (see scenario.CONDITIONS) three separate local rounds are simulated:

1. reconstruction: the victim site trains on a small batch (the attacker's best case); the attacker
   runs the analytic attack and gradient inversion on what it sees; PSNR / SSIM of the best match
   to each of the victim's images;
2. membership: the victim trains on its records; the attacker scores each candidate record by how
   much the observed update lowered its loss (loss before - loss after: the loss-threshold attack,
   calibrated per record by its loss under the global model) on members and never-seen records;
   ROC AUC and TPR at 1% FPR;
3. canaries: the same round with m gradient canaries, each included with probability 1/2; the
   one-run audit (Steinke et al. 2023) turns the attacker's guesses into an epsilon lower bound at
   95% confidence, which for the DP conditions must never exceed the accountant's epsilon.

Comparisons are made against the dense single-step condition of the same run ("baseline").
Callers supply how a SecAgg sum is formed (`aggregate`) and the DP accountant (`accountant`):
ktfed passes the real secure aggregation and the project's accountant; kt_core imports neither.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np
import torch

from kt_core.leakage import metrics, one_run
from kt_core.leakage.inversion import analytic_candidates, cross_entropy_grads, invert_gradients
from kt_core.leakage.scenario import (CONDITIONS, Canaries, Condition, attacker_forward, build, flatten,
                                      inferred_gates, local_update, make_splits, per_record_loss, shared_names,
                                      unflatten, warm_up)

# A reconstruction counts as measurably worse than the baseline's when its PSNR is at least this
# much lower: 3 dB is twice the mean squared error.
PSNR_MARGIN_DB = 3.0
# A victim image counts as recovered when the attacker's best guess beats the no-information guess
# (the public mean image, measured in the same run) by this much: a tenth of its squared error.
RECOVERED_DB = 10.0

Aggregate = Callable[[dict[str, np.ndarray], dict[str, int]], np.ndarray]
Accountant = Callable[[float, float, int, float], float]


@dataclass(frozen=True)
class SuiteSettings:
    seed: int = 0
    hidden: int = 32
    n_factors: int = 8
    lr: float = 0.1
    warmup_epochs: int = 2
    batch_images: int = 4        # the victim's batch in the reconstruction round
    members: int = 16            # records per site in the membership and canary rounds
    mia_rounds: int = 16         # membership rounds (a different victim each), scores pooled
    nonmembers: int = 200
    canaries: int = 500
    canary_norm: float = 10.0     # without DP nothing clips a record's gradient; with DP it is clipped
    delta: float = 1e-5
    dlg_iterations: int = 300
    baseline: str = "dense-1step"


@dataclass
class SuiteResult:
    settings: SuiteSettings
    rows: list[dict]
    targets: np.ndarray                      # the victim's images in the reconstruction round
    reconstructions: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    prior_psnr: float = 0.0                  # PSNR of guessing the public mean image: no leakage

    def to_dict(self) -> dict:
        return {"settings": asdict(self.settings), "prior_psnr": self.prior_psnr, "psnr_margin_db": PSNR_MARGIN_DB,
                "rows": self.rows}


def weighted_mean(updates: dict[str, np.ndarray], counts: dict[str, int]) -> np.ndarray:
    """The in-the-clear aggregate (used when no SecAgg implementation is supplied)."""
    total = sum(counts.values())
    return sum(updates[s] * counts[s] for s in updates) / total


def run_suite(settings: SuiteSettings = SuiteSettings(), conditions: tuple[Condition, ...] = CONDITIONS, *,
              aggregate: Aggregate | None = None, accountant: Accountant | None = None,
              progress: Callable[[str], None] | None = None) -> SuiteResult:
    torch.manual_seed(settings.seed)      # WAFFLe's gates draw from the global generator
    aggregate = aggregate or weighted_mean
    n_sites = max(c.sites for c in conditions)
    splits = make_splits(settings.seed, settings.mia_rounds + n_sites - 1, settings.members, settings.nonmembers)
    models = {}
    for kind in sorted({c.model for c in conditions}):
        model = build(kind, settings.seed, settings.hidden, settings.n_factors)
        models[kind] = warm_up(model, splits.public, settings.warmup_epochs, settings.lr, settings.seed)
    targets = splits.sites[0][0][: settings.batch_images].numpy()
    prior = splits.public[0].mean(0).numpy()
    result = SuiteResult(settings, [], targets,
                         prior_psnr=float(np.mean([metrics.psnr(prior, t) for t in targets])))
    for index, cond in enumerate(conditions):
        started = time.perf_counter()
        gen = torch.Generator().manual_seed(settings.seed * 1000 + index)
        row, images = _run_condition(cond, models[cond.model], splits, settings, gen, aggregate, accountant,
                                     result.prior_psnr)
        row["seconds"] = round(time.perf_counter() - started, 2)
        result.rows.append(row)
        result.reconstructions[cond.name] = images
        if progress:
            progress(f"{cond.name}: {row['seconds']} s")
    _compare_to_baseline(result.rows, settings.baseline)
    return result


def _observe(model, cond: Condition, site_data, lr, gen, aggregate: Aggregate, canaries=None) -> dict:
    """What the attacker sees: the victim's update, or the SecAgg mean over cond.sites sites."""
    names = shared_names(model)
    updates = [local_update(model, data, cond, lr, gen, canaries if i == 0 else None)
               for i, data in enumerate(site_data[: cond.sites])]
    if cond.sites == 1:
        return updates[0]
    flat = {f"site-{i}": flatten(u, names).numpy() for i, u in enumerate(updates)}
    counts = {f"site-{i}": len(data[1]) for i, data in enumerate(site_data[: cond.sites])}
    mean = torch.from_numpy(np.asarray(aggregate(flat, counts), dtype=np.float64))
    return unflatten(mean, updates[0], names)


def _run_condition(cond, model, splits, s: SuiteSettings, gen, aggregate, accountant,
                   prior_psnr: float) -> tuple[dict, dict]:
    row: dict = {"condition": cond.name, "description": cond.description}
    recon, images = reconstruction_round(cond, model, splits, s, gen, aggregate)
    best = np.maximum(recon["analytic"]["per_target_psnr"], recon["dlg"]["per_target_psnr"])
    row.update(analytic_psnr=recon["analytic"]["psnr"], analytic_ssim=recon["analytic"]["ssim"],
               dlg_psnr=recon["dlg"]["psnr"], dlg_ssim=recon["dlg"]["ssim"],
               leak_psnr=max(recon["analytic"]["psnr"], recon["dlg"]["psnr"]),
               recovered=float(np.mean(best >= prior_psnr + RECOVERED_DB)))
    row.update(membership_rounds(cond, model, splits, s, gen, aggregate))
    row.update(canary_round(cond, model, splits, s, gen, aggregate, accountant))
    return row, images


def _theta0(model) -> dict:
    params = dict(model.named_parameters())
    # in shared_names order: gradients and the observed update are compared tensor by tensor
    return {n: params[n].detach().clone() for n in shared_names(model)}


def reconstruction_round(cond, model, splits, s: SuiteSettings, gen, aggregate) -> tuple[dict, dict]:
    """The victim trains on `batch_images` images; the attacker inverts what it sees. Returns the
    best-match scores of both attacks, and the matched reconstructions."""
    factorized = cond.model == "factorized"
    theta0 = _theta0(model)
    batches = [(x[: s.batch_images], y[: s.batch_images]) for x, y in splits.sites]
    targets = batches[0][0].numpy()
    seen = _observe(model, cond, batches, s.lr, gen, aggregate)
    candidates = analytic_candidates(seen, "layers.0", factorized)
    analytic = metrics.best_match(targets, candidates)
    forward = attacker_forward(model, inferred_gates(model, seen) if factorized else {})
    labels = torch.cat([y for _, y in batches[: cond.sites]])
    grad_fn = cross_entropy_grads(forward, theta0, labels)
    dummies = invert_gradients(grad_fn, [-seen[n] for n in theta0], len(labels), targets.shape[1],
                               iterations=s.dlg_iterations, seed=s.seed)
    dlg = metrics.best_match(targets, dummies)
    images = {"analytic": _matched(candidates, analytic["matches"]), "dlg": _matched(dummies, dlg["matches"])}
    return {"analytic": analytic, "dlg": dlg}, images


def membership_rounds(cond, model, splits, s: SuiteSettings, gen, aggregate) -> dict:
    """Loss-threshold membership inference, one round per victim site, scores pooled (one small round
    is too noisy to compare conditions)."""
    factorized = cond.model == "factorized"
    theta0 = _theta0(model)
    members, outsiders = [], []
    for r in range(s.mia_rounds):
        seen = _observe(model, cond, splits.sites[r:], s.lr, gen, aggregate)
        forward = attacker_forward(model, inferred_gates(model, seen) if factorized else {})
        after = {n: theta0[n] + seen[n].to(theta0[n].dtype) for n in theta0}

        def score(data):
            return per_record_loss(forward, theta0, data) - per_record_loss(forward, after, data)

        members.append(score(splits.sites[r]))
        outsiders.append(score(splits.nonmembers))
    members, outsiders = np.concatenate(members), np.concatenate(outsiders)
    return {"mia_auc": metrics.roc_auc(members, outsiders),
            "mia_tpr_at_1pct_fpr": metrics.tpr_at_fpr(members, outsiders)}


def canary_round(cond, model, splits, s: SuiteSettings, gen, aggregate, accountant,
                 accountant_noise: float | None = None) -> dict:
    """The victim's round with m gradient canaries; the one-run epsilon lower bound, next to the
    accountant's epsilon for the mechanism as configured (`accountant_noise` overrides the noise
    multiplier the accountant is told: how a test models a mechanism that adds less noise than it
    claims)."""
    names = shared_names(model)
    dim = sum(p.numel() for n, p in model.named_parameters() if n in names)
    m = min(s.canaries, dim)
    canaries = Canaries(torch.randperm(dim, generator=gen)[:m], torch.rand(m, generator=gen) < 0.5, s.canary_norm)
    seen = _observe(model, cond, splits.sites, s.lr, gen, aggregate, canaries)
    scores = flatten(seen, names)[canaries.coords].numpy()
    if cond.dp and cond.batches != 1:
        raise ValueError(f"{cond.name}: the accounting here covers full-batch DP steps only (batches=1)")
    sigma = cond.noise_multiplier if accountant_noise is None else accountant_noise
    claims_dp = sigma > 0
    result = one_run.audit(scores, canaries.included.numpy(), delta=s.delta if claims_dp else 0.0)
    eps = math.inf
    if claims_dp:
        # full-batch steps: every record is in every step, so q = 1 and one step per epoch counts
        eps = accountant(1.0, sigma, cond.epochs, s.delta) if accountant is not None else None
    return {"epsilon_lower_bound": result.epsilon_lower_bound, "canary_guesses": result.guesses,
            "canary_correct": result.correct, "canaries": m, "epsilon_accountant": eps,
            "delta": s.delta if claims_dp else None}


def _matched(candidates: np.ndarray, matches: list[int]) -> np.ndarray:
    if len(candidates) == 0:
        return np.full((len(matches), 64), 0.5)
    return np.clip(np.asarray(candidates)[matches], 0, 1)


def _compare_to_baseline(rows: list[dict], baseline: str) -> None:
    base = next((r for r in rows if r["condition"] == baseline), None)
    if base is None:
        return
    for r in rows:
        r["psnr_drop_db"] = base["leak_psnr"] - r["leak_psnr"]
        r["reconstruction_worse"] = r["psnr_drop_db"] >= PSNR_MARGIN_DB
        r["mia_closer_to_chance"] = abs(r["mia_auc"] - 0.5) < abs(base["mia_auc"] - 0.5)


def format_table(result: SuiteResult) -> str:
    head = (f"{'condition':<16} {'analytic':>9} {'DLG':>7} {'DLG':>6} {'drop':>6} {'recov':>6} {'MIA':>6} "
            f"{'TPR@1%':>7} {'eps_lb':>7} {'eps_acct':>8} {'time':>6}")
    sub = (f"{'':<16} {'PSNR dB':>9} {'PSNR':>7} {'SSIM':>6} {'dB':>6} {'ered':>6} {'AUC':>6} {'FPR':>7} "
           f"{'(95%)':>7} {'':>8} {'s':>6}")
    lines = [head, sub]
    for r in result.rows:
        acct = r["epsilon_accountant"]
        acct_text = "inf" if acct == math.inf else ("-" if acct is None else f"{acct:.3f}")
        lines.append(f"{r['condition']:<16} {r['analytic_psnr']:>9.2f} {r['dlg_psnr']:>7.2f} {r['dlg_ssim']:>6.3f} "
                     f"{r.get('psnr_drop_db', 0.0):>6.2f} {r['recovered']:>6.2f} {r['mia_auc']:>6.3f} "
                     f"{r['mia_tpr_at_1pct_fpr']:>7.3f} "
                     f"{r['epsilon_lower_bound']:>7.3f} {acct_text:>8} {r['seconds']:>6.1f}")
    lines.append(f"no-leakage reference: PSNR of the public mean image = {result.prior_psnr:.2f} dB; "
                 f"'drop' = baseline ({result.settings.baseline}) best PSNR minus this row's; "
                 f"worse means a drop >= {PSNR_MARGIN_DB:g} dB; 'recovered' = share of the victim's images "
                 f"reconstructed >= {RECOVERED_DB:g} dB above that reference")
    return "\n".join(lines)
