"""Secure aggregation at the coordinator: which step of an attempt is open, who it waits for, what
the unmasked sum means (`SecAggRound`), and the driver that runs a secure attempt for the round
engine (`SecAggDriver`).

The protocol itself lives in security.secagg (SecAggServer); `SecAggRound` only keeps the
bookkeeping a networked round needs around it: a step is open until every participant still
expected has answered, or its deadline passes, or the participant's stream drops. No gRPC here:
the round engine hands the driver its attempts, the servicer hands it bytes.
"""
from __future__ import annotations

import hashlib
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Mapping

import numpy as np
from cryptography import x509

from coordinator.admission import check_metrics
from coordinator.errors import Code, DuplicateSubmission, OutOfPhase, Refusal, secagg_refusal
from coordinator.store import UploadRecord
from kt_core import vector
from kt_core.config import ConfigError, RunConfig
from security import secagg
from security.dp import user_level
from security.secagg import SecAggError, SecAggServer, SecAggProtocolSettings

log = logging.getLogger(__name__)

# The steps in protocol order: each name is what a participant sends at that step.
STEPS = ("advertise", "share_keys", "masked_input", "consistency", "unmask")
_MESSAGE = {"advertise": secagg.KeyAdvertisement, "share_keys": secagg.ShareKeys,
            "masked_input": secagg.MaskedInput, "consistency": secagg.ConsistencyAck,
            "unmask": secagg.UnmaskShares}
_RECEIVE = {"advertise": "receive_advertisement", "share_keys": "receive_shares",
            "masked_input": "receive_masked_input", "consistency": "receive_ack", "unmask": "receive_unmask"}
# Generous bounds for the small steps: a few hundred bytes per peer (keys, shares, signatures).
SMALL_STEP_BASE_BYTES = 64 * 1024
SMALL_STEP_PER_PEER_BYTES = 4 * 1024


def check_config(config: RunConfig, shared: vector.Specs) -> None:
    """Refuse a run whose [secagg] (or its pairing with [privacy]) cannot give what it promises.
    Raises ConfigError naming the field."""
    s, p, fed = config.secagg, config.privacy, config.federation
    distributed = p.enabled and p.mechanism == "distributed"
    if distributed and not s.enabled:
        raise ConfigError("privacy.mechanism: distributed noise shares give their guarantee only under secure "
                          "aggregation; set secagg.enabled = true")
    if not s.enabled:
        return
    n_max = min(len(fed.sites), fed.max_sites)
    settings = SecAggProtocolSettings.from_section(config.secagg)
    try:
        settings.validate(max(n_max, 2))
    except SecAggError as err:
        raise ConfigError(str(err)) from None
    if fed.min_sites < 2:
        raise ConfigError("federation.min_sites: secure aggregation needs at least 2 participants")
    if settings.threshold and fed.min_sites < settings.threshold:
        raise ConfigError(f"federation.min_sites: {fed.min_sites} is below secagg.threshold "
                          f"{settings.threshold}; every smaller round would abort")
    if distributed:
        t_min = settings.threshold_for(fed.min_sites)
        if t_min < p.min_survivors:
            raise ConfigError(f"privacy.min_survivors: the noise is calibrated for {p.min_survivors} honest "
                              f"survivors but a round of {fed.min_sites} may unmask with t = {t_min}; "
                              "raise secagg.threshold or lower privacy.min_survivors")
        # The SecAgg clip must not bind on a clipped update plus its noise share, or the shares would
        # no longer sum to the Gaussian the accountant assumes.
        std = user_level.distributed_share_std(p.user_noise_multiplier, p.update_clip_norm, p.min_survivors)
        room = p.update_clip_norm + 4.0 * std * math.sqrt(vector.vector_length(shared))
        if s.clip_norm < room:
            raise ConfigError(f"secagg.clip_norm: {s.clip_norm:g} would clip distributed noise shares; it must be "
                              f">= update_clip_norm + 4 sigma sqrt(d) = {room:.4g}")


@dataclass
class SecAggResult:
    weighted_sum: dict[str, np.ndarray]   # sum over survivors of weight_i * clipped update_i
    weight: int                           # sum over survivors of weight_i (the hidden counts)
    survivors: tuple[str, ...]
    dropped: tuple[str, ...]              # shared keys, then sent no masked input
    responders: tuple[str, ...]


@dataclass
class SecAggRound:
    """One attempt's secure aggregation. Call with the round engine's lock held."""

    run_id: str
    round_no: int
    roster: tuple[str, ...]
    settings: SecAggProtocolSettings
    shared: vector.Specs
    weight_scale: int
    verify_keys: Mapping | None = None
    step: str = "advertise"
    expected: set[str] = field(default_factory=set)
    received: set[str] = field(default_factory=set)
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    payload_digests: dict[str, str] = field(default_factory=dict)   # masked inputs, for the record
    bytes_in: dict[str, int] = field(default_factory=dict)
    history: list[tuple[str, tuple[str, ...], tuple[str, ...]]] = field(default_factory=list)

    def __post_init__(self):
        self.settings.validate(len(self.roster))
        self.length = vector.vector_length(self.shared) + 1   # + the hidden count
        self.server = SecAggServer(self.run_id, self.round_no, self.roster, self.settings, self.length,
                                   verify_keys=self.verify_keys)
        self.expected = set(self.roster)

    @property
    def threshold(self) -> int:
        return self.server.t

    def max_payload(self, step: str) -> int:
        if step == "masked_input":
            return 4 * self.length + SMALL_STEP_BASE_BYTES
        return SMALL_STEP_BASE_BYTES + SMALL_STEP_PER_PEER_BYTES * len(self.roster)

    def check_open(self, site_id: str, step: str) -> None:
        """What can be refused before the payload is read (wrong step, not expected, duplicate)."""
        if step not in STEPS:
            raise SecAggError(f"unknown secure aggregation step {step!r}")
        if site_id in self.received and step == self.step:
            raise DuplicateSubmission(f"{site_id} already sent its {step} for round {self.round_no}")
        if step != self.step:
            raise OutOfPhase(f"{step} is not open: round {self.round_no} is at step {self.step}")
        if site_id not in self.expected:
            raise SecAggError(f"{site_id} is not expected at step {step} of round {self.round_no} "
                              "(not in the roster, or dropped at an earlier step)")

    def receive(self, site_id: str, step: str, payload: bytes, metrics: Mapping[str, float]) -> None:
        self.check_open(site_id, step)
        message = _MESSAGE[step].from_bytes(payload)
        if message.sender != site_id:
            raise SecAggError(f"{step} message claims sender {message.sender!r}, but the caller is {site_id}")
        getattr(self.server, _RECEIVE[step])(message)
        self.received.add(site_id)
        self.bytes_in[site_id] = self.bytes_in.get(site_id, 0) + len(payload)
        if step == "masked_input":
            self.metrics[site_id] = dict(metrics)
            self.payload_digests[site_id] = hashlib.sha256(payload).hexdigest()

    def waiting_for(self, alive: set[str]) -> set[str]:
        return (self.expected & alive) - self.received

    def close(self) -> dict[str, tuple[str, bytes]]:
        """Close the open step: participant -> (next step, message that opens it) for each one that
        goes on. Raises SecAggError (the round must abort) when fewer than t answered."""
        answered = tuple(sorted(self.received))
        missing = tuple(sorted(self.expected - self.received))
        self.history.append((self.step, answered, missing))
        if missing:
            log.warning("secagg round %d: %s missing at step %s", self.round_no, ", ".join(missing), self.step)
        if self.step == "advertise":
            out = {u: m.to_bytes() for u, m in self.server.close_advertise().items()}
        elif self.step == "share_keys":
            out = {u: m.to_bytes() for u, m in self.server.close_share_keys().items()}
        elif self.step == "masked_input":
            survivors = self.server.close_masked_input()
            data = survivors.to_bytes()
            out = {u: data for u in survivors.survivors}
        elif self.step == "consistency":
            out = {u: m.to_bytes() for u, m in self.server.close_consistency().items()}
        else:
            raise SecAggError("the unmask step ends with finish(), not close()")
        self.step = STEPS[STEPS.index(self.step) + 1]
        self.expected = set(out)
        self.received = set()
        return {u: (self.step, data) for u, data in out.items()}

    def finish(self) -> SecAggResult:
        """Unmask: the weighted sum of the survivors' clipped updates and the sum of their weights."""
        answered = tuple(sorted(self.received))
        self.history.append(("unmask", answered, tuple(sorted(self.expected - self.received))))
        result = self.server.finish()
        total, weight = secagg.decode_sum(result.total, self.settings.bits)
        check_unmasked(total, weight, len(result.survivors), self.weight_scale, self.settings)
        # A site encodes weight_i / scale * update_i: scale the sum back.
        weighted = vector.unflatten(total * float(self.weight_scale), self.shared)
        return SecAggResult(weighted, weight, tuple(result.survivors), tuple(result.dropped),
                            tuple(result.responders))


def check_unmasked(total: np.ndarray, weight: int, n: int, max_weight: int, settings: SecAggProtocolSettings) -> None:
    """Refuse an unmasked sum that n inputs encoded by the rule could not add up to.

    Each honest input carries a count w in 1..max_weight and (w / max_weight) times an update
    clipped to clip_norm, so the sum of the counts W lies in [n, n * max_weight] and the sum's L2
    norm is at most W / max_weight * clip_norm (plus the fixed-point rounding): the mean step
    applied is then never longer than clip_norm, as in a plain upload (README "One site's pull on
    the mean"). An input that broke the rule cannot be told from the others here, so the attempt
    aborts (recorded, with this reason) rather than folding in a sum one site inflated."""
    if not n <= weight <= n * max_weight:
        raise SecAggError(f"the unmasked counts sum to {weight}, outside [{n}, {n * max_weight}] for {n} inputs "
                          f"of weight 1..{max_weight}: an input carried a count no site may")
    bound = weight / max_weight * settings.clip_norm + secagg.error_bound(n, settings.bits) * math.sqrt(total.size)
    norm = float(np.linalg.norm(total))
    if not norm <= bound:
        raise SecAggError(f"the unmasked sum has L2 norm {norm:.6g}, above the {bound:.6g} that {n} inputs "
                          f"weighing {weight} in all and clipped to secagg.clip_norm {settings.clip_norm:g} can "
                          "reach: an input was not clipped or weighted by the rule")


class SecAggDriver:
    """Runs the secure attempts of one round engine: opens each step, takes the sites' answers,
    and folds the unmasked sum into the engine's strategy. Everything it touches of the engine is
    held under the engine's lock (`engine.cond`)."""

    def __init__(self, engine):
        self.engine = engine

    def new_round(self, round_no: int, selected) -> SecAggRound:
        e = self.engine
        verify = None
        if e.config.secagg.active:
            verify = {site: x509.load_pem_x509_certificate(e.sessions.certificate(site)).public_key() for site in selected}
        settings = SecAggProtocolSettings.from_section(e.config.secagg)
        return SecAggRound(e.run_id, round_no, tuple(sorted(selected)), settings, e.shared_specs,
                           e.strategy.max_weight(), verify_keys=verify)

    @staticmethod
    def can_rejoin(attempt, site_id: str) -> bool:
        """A secure round can take a site back only before it advertised keys: its protocol
        state did not survive the lost connection."""
        sa = attempt.secagg
        return sa is None or (sa.step == "advertise" and site_id not in sa.received)

    def check(self, site_id: str, round_no: int, attempt_id: bytes, step: str, size: int):
        """Everything that can be refused before a SecAgg payload is read; returns the attempt."""
        with self.engine.cond:
            attempt = self.engine.answers.answered_by(site_id, round_no, attempt_id, f"secure aggregation {step}")
            sa = attempt.secagg
            if sa is None:
                raise Refusal(Code.FAILED_PRECONDITION, f"round {attempt.round} does not run under secure aggregation")
            try:
                sa.check_open(site_id, step)
            except SecAggError as err:
                raise secagg_refusal(err) from None
            limit = sa.max_payload(step)
            if not 0 < size <= limit:
                raise Refusal(Code.RESOURCE_EXHAUSTED if size > limit else Code.INVALID_ARGUMENT,
                              f"{step}: declared payload of {size} bytes is outside 1..{limit}")
            return attempt

    def submit(self, attempt, site_id: str, step: str, payload: bytes, metrics: Mapping[str, float],
               countersignature: bytes = b"") -> None:
        """Hand one participant's answer to the open SecAgg step."""
        if step == "masked_input":
            check_metrics(metrics)
        e = self.engine
        with e.cond:
            if attempt is not e.attempt or attempt.closed:
                raise Refusal(Code.FAILED_PRECONDITION, f"round {attempt.round} closed while the {step} was in flight")
            try:
                attempt.secagg.receive(site_id, step, payload, metrics)
            except SecAggError as err:
                raise secagg_refusal(err) from None
            e.answers.audit_received(attempt, site_id, f"secagg/{step}", hashlib.sha256(payload).hexdigest(),
                             countersignature=countersignature, nbytes=len(payload))
            e.cond.notify_all()
        log.info("round %d: secure aggregation %s from %s (%d bytes)", attempt.round, step, site_id,
                 len(payload))

    def collect(self, attempt) -> str | None:
        """Drive the SecAgg steps; None when the sum is folded in, else why the attempt aborts.

        The advertise step waits as long as the round (sites advertise once their update is
        ready); every later step waits `secagg.step_timeout_s`. A site whose stream drops, or that
        does not answer in time, is a dropout: the protocol recovers its masks if t others remain."""
        problem = self._run_steps(attempt)
        if problem is not None:
            return problem
        sa = attempt.secagg
        try:
            result = sa.finish()
        except SecAggError as err:
            return f"secure aggregation: {err}"
        if result.weight <= 0:
            return "secure aggregation: the survivors' weights sum to zero"
        e = self.engine
        e.strategy.add_aggregate(result.weighted_sum, result.weight)
        with e.cond:
            for site_id in result.survivors:
                # what the record holds of a site: the size and digest of its masked vector
                attempt.uploads[site_id] = UploadRecord(site_id, attempt.attempt_id.hex(), 0, (), sa.bytes_in.get(site_id, 0),
                                                    sa.payload_digests[site_id])
                metrics = sa.metrics.get(site_id, {})
                e.sites[site_id].note_privacy(metrics)
                attempt.note_metrics(site_id, metrics)
            attempt.dropped = set(attempt.selected) - set(result.survivors) - set(attempt.declined)
        attempt.secagg_summary = summary(sa, result)
        log.info("round %d: secure aggregation unmasked the sum of %d input(s) (t=%d); masks of %s recovered",
                 attempt.round, len(result.survivors), sa.threshold, ", ".join(result.dropped) or "nobody")
        return None

    def _run_steps(self, attempt) -> str | None:
        """Open step after step until the unmask step has its answers; why not, if it cannot."""
        e, sa = self.engine, attempt.secagg
        deadline = attempt.deadline
        while True:
            with e.cond:
                while not e.stopped.is_set():
                    alive = (e.sessions.connected() & attempt.selected) - set(attempt.declined)
                    if not sa.waiting_for(alive) or time.monotonic() >= deadline:
                        break
                    e.cond.wait(timeout=min(deadline - time.monotonic(), 0.5))
                if e.stopped.is_set():
                    attempt.closed = True
                    return "stopped"
                if sa.step == "unmask":
                    attempt.closed = True
                    return None
                try:
                    out = sa.close()
                except SecAggError as err:
                    attempt.closed = True
                    return f"secure aggregation: {err}"
                for site_id, (step, payload) in out.items():
                    if site_id in e.sessions:
                        e.push_secagg_step(attempt, site_id, step, payload)
                deadline = time.monotonic() + e.config.secagg.step_timeout_s
                log.info("round %d: secure aggregation step %s opened for %d participant(s)",
                         attempt.round, sa.step, len(out))


def summary(sa: SecAggRound, result: SecAggResult) -> dict:
    """What secure aggregation did in a round, for the record (never an individual update)."""
    return {
        "roster": list(sa.roster), "threshold": sa.threshold, "neighbours": sa.settings.neighbours,
        "active": sa.settings.active, "survivors": list(result.survivors),
        "dropped_after_sharing_keys": list(result.dropped), "responders": list(result.responders),
        # whose secrets the coordinator reconstructed: the self-mask seeds of the survivors,
        # the mask keys of those who dropped after sharing keys (never both for one site)
        "reconstructed_self_mask_of": list(result.survivors),
        "reconstructed_mask_key_of": list(result.dropped),
        "steps": [{"step": step, "answered": list(a), "missing": list(m)} for step, a, m in sa.history],
        "vector_length": sa.length, "bits": sa.settings.bits, "clip_norm": sa.settings.clip_norm,
        "weight_scale": sa.weight_scale}
