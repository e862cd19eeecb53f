"""Privacy accounting for the Poisson-subsampled Gaussian mechanism (DP-SGD, DP-FedAvg).

A history is a list of `RoundSpend(sample_rate, noise_multiplier, steps)`. The cumulative epsilon
is always computed by composing the *whole* history at the fixed delta (never by summing per-round
epsilons, which would overstate it badly: epsilon grows roughly with sqrt(steps), not linearly).

Primary accountant: PRV (Gopi, Lee, Wutschitz, NeurIPS 2021; Opacus' implementation), which
returns an upper bound whose slack we keep small (`eps_error` relative to epsilon). Cross-check:
RDP (Mironov 2017; Opacus' orders), a looser upper bound. Both figures are kept in the ledger;
the budget is enforced on the primary accountant's figure, or on the larger of the two when the
primary cannot be computed.
"""
from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

# Opacus is imported where it is used: importing it costs about two CPU seconds, which every
# coordinator and participant process would otherwise pay at start, DP or not.

ACCOUNTANTS = ("prv", "rdp")

# Opacus' RDP analysis warns for every order it drops; those orders are simply not used.
logging.getLogger("opacus.accountants.analysis.rdp").setLevel(logging.ERROR)
# ... and when the best order is the largest one tried; the bound it returns is still valid.
warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")


class AccountingError(ValueError):
    """Parameters the accountant cannot evaluate."""


@dataclass(frozen=True)
class RoundSpend:
    """`steps` compositions of the Poisson-subsampled Gaussian mechanism with rate q and noise sigma."""

    sample_rate: float
    noise_multiplier: float
    steps: int

    def validate(self) -> None:
        if not (0 < self.sample_rate <= 1):
            raise AccountingError(f"sample_rate must be in (0, 1], got {self.sample_rate!r}")
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier > 0):
            raise AccountingError(f"noise_multiplier must be > 0, got {self.noise_multiplier!r}")
        if self.steps < 0:
            raise AccountingError(f"steps must be >= 0, got {self.steps!r}")


def accountant_version() -> str:
    import opacus

    return f"opacus {opacus.__version__}"


def _history(spends: Iterable[RoundSpend]) -> list[tuple[float, float, int]]:
    """Opacus' history format, merging neighbours with equal parameters (same composition)."""
    out: list[tuple[float, float, int]] = []
    for s in spends:
        s.validate()
        if s.steps == 0:
            continue
        if out and out[-1][0] == s.noise_multiplier and out[-1][1] == s.sample_rate:
            out[-1] = (s.noise_multiplier, s.sample_rate, out[-1][2] + s.steps)
        else:
            out.append((s.noise_multiplier, s.sample_rate, s.steps))
    return out


def _rdp(history, delta: float) -> float:
    from opacus.accountants import RDPAccountant

    acc = RDPAccountant()
    acc.history = list(history)
    with warnings.catch_warnings():  # "optimal order is the largest alpha": the bound stays valid
        warnings.simplefilter("ignore")
        return float(acc.get_epsilon(delta))


def _prv(history, delta: float, eps_hint: float) -> float:
    from opacus.accountants import PRVAccountant

    acc = PRVAccountant()
    acc.history = list(history)
    # The PRV accountant returns estimate + eps_error (an upper bound). Keep the slack well under
    # 1% of epsilon, using the (larger) RDP figure as the scale.
    eps_error = min(0.01, max(1e-3, 2e-3 * eps_hint))
    with np.errstate(divide="ignore"):   # q = 1 (user level): log(1 - q) = -inf is handled by Opacus
        return float(acc.get_epsilon(delta, eps_error=eps_error))


def epsilons(spends: Sequence[RoundSpend], delta: float) -> dict[str, float]:
    """Cumulative epsilon of the whole history at `delta`, by both accountants."""
    if not (0 < delta < 1):
        raise AccountingError(f"delta must be in (0, 1), got {delta!r}")
    history = _history(spends)
    if not history:
        return {"prv": 0.0, "rdp": 0.0}
    rdp = _rdp(history, delta)
    try:
        prv = _prv(history, delta, rdp)
    except (ValueError, RuntimeError, OverflowError, FloatingPointError) as err:  # numerical failure
        logging.getLogger(__name__).warning("PRV accountant failed (%s); using the RDP bound", err)
        prv = rdp
    return {"prv": prv, "rdp": rdp}


def epsilon(spends: Sequence[RoundSpend], delta: float, accountant: str = "prv") -> float:
    if accountant not in ACCOUNTANTS:
        raise AccountingError(f"unknown accountant {accountant!r} (choose {', '.join(ACCOUNTANTS)})")
    return epsilons(spends, delta)[accountant]


def noise_multiplier_for(target_epsilon: float, delta: float, sample_rate: float, steps: int,
                         accountant: str = "prv") -> float:
    """The smallest noise multiplier (to within 0.5% of epsilon) whose `steps`-fold composition
    stays within target_epsilon by `accountant`.

    RDP's bound is looser than PRV's, so the noise RDP needs is an upper end for PRV's: search RDP
    first (cheap, Opacus' own search), then bisect PRV below it."""
    if not (target_epsilon > 0 and math.isfinite(target_epsilon)):
        raise AccountingError(f"target_epsilon must be > 0, got {target_epsilon!r}")
    if steps < 1:
        raise AccountingError("steps must be >= 1")
    if not (0 < delta < 1):
        raise AccountingError(f"delta must be in (0, 1), got {delta!r}")
    if accountant not in ACCOUNTANTS:
        raise AccountingError(f"unknown accountant {accountant!r} (choose {', '.join(ACCOUNTANTS)})")
    from opacus.accountants.utils import get_noise_multiplier

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            high = float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta,
                                              sample_rate=sample_rate, steps=steps, accountant="rdp",
                                              epsilon_tolerance=0.002 * target_epsilon))
    except ValueError as err:
        raise AccountingError(f"no noise multiplier reaches epsilon {target_epsilon} at delta {delta} "
                              f"with sample rate {sample_rate:.4g} over {steps} steps: {err}") from None
    if accountant == "rdp":
        return high

    def eps_at(sigma: float) -> float:
        return epsilons([RoundSpend(sample_rate, sigma, steps)], delta)["prv"]

    # Illinois (regula falsi) on log epsilon against log sigma: the curve is smooth and monotone,
    # so a few PRV evaluations (each ~0.3 s) suffice. Invariant: eps(low) > target >= eps(high).
    low = high / 2
    e_high, e_low = eps_at(high), eps_at(low)
    while e_low <= target_epsilon:   # rarely: PRV allows less than half of RDP's noise
        high, e_high, low = low, e_low, low / 2
        e_low = eps_at(low)
    f_low, f_high = math.log(e_low / target_epsilon), math.log(e_high / target_epsilon)
    side = 0
    for _ in range(40):
        if e_high >= target_epsilon * 0.995 or high - low < 1e-4 * high:
            break
        x = math.exp((math.log(low) * f_high - math.log(high) * f_low) / (f_high - f_low))
        if not low < x < high:
            x = (low + high) / 2
        e_x = eps_at(x)
        f_x = math.log(e_x / target_epsilon)
        if e_x <= target_epsilon:
            high, e_high, f_high = x, e_x, f_x
            if side == -1:
                f_low /= 2
            side = -1
        else:
            low, e_low, f_low = x, e_x, f_x
            if side == 1:
                f_high /= 2
            side = 1
    return high
