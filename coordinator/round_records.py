"""What the engine writes down when an attempt ends: the user-level DP a round applied (store and
audit log) and the attempt's end in the audit log (with the SecAgg steps each site missed)."""
from __future__ import annotations

from typing import TYPE_CHECKING

from coordinator.attempt import Attempt
from coordinator.strategy import PrivacyRound

if TYPE_CHECKING:
    from coordinator.rounds import RoundEngine


def record_privacy(engine: "RoundEngine", round_no: int, r: PrivacyRound | None) -> None:
    """The user-level DP the strategy applied to round `round_no` (None: none), for the store and
    the auditor."""
    if r is None:
        return
    engine.store.record_privacy_round(engine.run_id, round_no, r.mechanism, r.noise_multiplier, r.clip_norm,
                                      r.contributors, r.noise_std, r.delta, r.epsilon_prv, r.epsilon_rdp,
                                      r.accountant_version)
    trail = engine.trail
    if trail.enabled:
        trail.audit.log_dp(run=engine.run_id, round=round_no, level="user", sample_rate=1.0,
                           noise_multiplier=r.noise_multiplier, steps=1, max_grad_norm=r.clip_norm,
                           delta=r.delta, epsilon_round=r.epsilon_round_prv, epsilon_cumulative=r.epsilon_prv,
                           epsilon_cumulative_rdp=r.epsilon_rdp, accountant="prv",
                           accountant_version=r.accountant_version,
                           params={"mechanism": r.mechanism, "contributors": r.contributors, "central_noise_std": r.noise_std})


def audit_attempt_end(engine: "RoundEngine", attempt: Attempt, secagg_event: str, how: str) -> None:
    """The attempt's end ("completed" or "aborted: …"); under SecAgg also the outcome and, per
    site, the first step it did not answer."""
    sa = attempt.secagg
    if sa is not None:
        missing: dict[str, str] = {}
        for step, _answered, absent in sa.history:
            for site_id in absent:
                missing.setdefault(site_id, step)
        engine.trail.secagg(engine.run_id, attempt.round, secagg_event, attempt.secagg_summary, missing,
                            sa.threshold, sa.roster)
    engine.trail.attempt_closed(attempt.round, how)
