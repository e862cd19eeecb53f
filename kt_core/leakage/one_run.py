"""An epsilon lower bound from one training run with canaries (Steinke, Nasr, Jagielski, "Privacy
Auditing with One (1) Training Run", NeurIPS 2023).

m canaries are each included in the training data independently with probability 1/2. After the
run the auditor scores every canary, guesses "included" for the k+ highest scores and "excluded"
for the k- lowest, and abstains on the rest. If the mechanism is (eps, delta)-DP, the number of
correct guesses W among the r = k+ + k- guesses satisfies (their Theorem 5.2)

    P[W >= v] <= P[Binomial(r, p) >= v] + 2 m delta * max_{i=1..v} P[v > Binomial(r, p) >= v - i] / i,
    p = e^eps / (1 + e^eps),

so an observed v whose probability under this bound is below beta refutes (eps, delta)-DP: the
largest such eps is a lower bound on the true eps with confidence 1 - beta. The guess counts are
fixed before looking at the outcome; when several are tried the confidence is split between them
(Bonferroni), so the bound stays valid.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch


def _binom_pmf(n: int, p: float) -> np.ndarray:
    """P[Binomial(n, p) = k] for k = 0..n, computed in log space (n may be in the thousands)."""
    k = torch.arange(n + 1, dtype=torch.float64)
    log_choose = (torch.lgamma(torch.tensor(n + 1.0, dtype=torch.float64)) - torch.lgamma(k + 1)
                  - torch.lgamma(n - k + 1))
    log_q = math.log1p(-p) if p < 1 else -math.inf
    with np.errstate(invalid="ignore"):
        log_pmf = log_choose.numpy() + k.numpy() * math.log(p) + np.where(k.numpy() < n, (n - k.numpy()) * log_q, 0.0)
    return np.exp(log_pmf)


def p_value(m: int, r: int, v: int, eps: float, delta: float = 0.0) -> float:
    """Bound on P[W >= v] for an (eps, delta)-DP mechanism (Theorem 5.2 above)."""
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= v <= r <= m, got v={v}, r={r}, m={m}")
    if v == 0:
        return 1.0
    p = 1.0 / (1.0 + math.exp(-eps))
    pmf = _binom_pmf(r, p)
    tail = float(pmf[v:].sum())
    if delta == 0:
        return min(1.0, tail)
    # alpha = max over i of P[v > Binomial >= v - i] / i
    below = np.cumsum(pmf[v - 1::-1])
    alpha = float(np.max(below / np.arange(1, v + 1)))
    return min(1.0, tail + 2 * m * delta * alpha)


def epsilon_lower_bound(m: int, r: int, v: int, delta: float = 0.0, beta: float = 0.05) -> float:
    """The largest eps that v correct guesses out of r refute at confidence 1 - beta (0 if none)."""
    if r == 0 or p_value(m, r, v, 0.0, delta) >= beta:
        return 0.0
    lo, hi = 0.0, 1.0
    while p_value(m, r, v, hi, delta) < beta:
        lo, hi = hi, hi * 2
        if hi > 1e3:
            return hi
    while hi - lo > 1e-4:       # a bound is reported to 3 decimals
        mid = (lo + hi) / 2
        if p_value(m, r, v, mid, delta) < beta:
            lo = mid
        else:
            hi = mid
    return lo


@dataclass(frozen=True)
class AuditResult:
    epsilon_lower_bound: float
    guesses: int           # r
    correct: int           # v
    canaries: int          # m
    confidence: float      # 1 - beta

    def to_dict(self) -> dict:
        return {"epsilon_lower_bound": self.epsilon_lower_bound, "guesses": self.guesses,
                "correct": self.correct, "canaries": self.canaries, "confidence": self.confidence}


def audit(scores: np.ndarray, included: np.ndarray, delta: float = 0.0, beta: float = 0.05,
          guess_fractions=(0.02, 0.05, 0.1, 0.2, 0.4)) -> AuditResult:
    """Guess from canary scores (higher = "included") and convert to an eps lower bound.

    Each fraction f fixes k+ = k- = f*m/2 in advance; beta is split evenly across the fractions, and
    the best bound among them is returned."""
    scores, included = np.asarray(scores, np.float64), np.asarray(included, bool)
    m = len(scores)
    order = np.argsort(-scores, kind="mergesort")
    share = beta / len(guess_fractions)
    best = AuditResult(0.0, 0, 0, m, 1 - beta)
    for f in guess_fractions:
        half = max(1, int(f * m / 2))
        top, bottom = order[:half], order[-half:]
        v = int(included[top].sum() + (~included[bottom]).sum())
        eps = epsilon_lower_bound(m, 2 * half, v, delta, share)
        if eps > best.epsilon_lower_bound:
            best = AuditResult(eps, 2 * half, v, m, 1 - beta)
    return best
