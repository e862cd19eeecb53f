"""Secure aggregation at the coordinator: which step of an attempt is open, who it waits for, and
what the unmasked sum means.

The protocol itself lives in security.secagg (SecAggServer); this class only keeps the
bookkeeping a networked round needs around it: a step is open until every participant still
expected has answered, or its deadline passes, or the participant's stream drops. No gRPC here:
the round engine drives it, the servicer hands it bytes.
"""
from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass, field
from typing import Mapping

import numpy as np

from kt_core import vector
from kt_core.config import ConfigError, RunConfig
from security import secagg
from security.dp import user_level
from security.secagg import SecAggError, SecAggServer, SecAggSettings

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


def protocol_settings(config: RunConfig) -> SecAggSettings:
    return SecAggSettings.from_mapping(config.secagg.protocol_settings())


def check_config(config: RunConfig, shared: vector.Specs) -> None:
    """Refuse a run whose [secagg] (or its pairing with [privacy]) cannot give what it promises.
    Raises ConfigError naming the field."""
    s, p, fed = config.secagg, config.privacy, config.federation
    distributed = p.enabled and p.mode == "distributed"
    if distributed and not s.enabled:
        raise ConfigError("privacy.mode: distributed noise shares give their guarantee only under secure "
                          "aggregation; set secagg.enabled = true")
    if not s.enabled:
        return
    n_max = min(len(fed.sites), fed.max_participants)
    settings = protocol_settings(config)
    try:
        settings.validate(max(n_max, 2))
    except SecAggError as err:
        raise ConfigError(str(err)) from None
    if fed.min_participants < 2:
        raise ConfigError("federation.min_participants: secure aggregation needs at least 2 participants")
    if settings.threshold and fed.min_participants < settings.threshold:
        raise ConfigError(f"federation.min_participants: {fed.min_participants} is below secagg.threshold "
                          f"{settings.threshold}; every smaller round would abort")
    if distributed:
        t_min = settings.threshold_for(fed.min_participants)
        if t_min < p.min_survivors:
            raise ConfigError(f"privacy.min_survivors: the noise is calibrated for {p.min_survivors} honest "
                              f"survivors but a round of {fed.min_participants} may unmask with t = {t_min}; "
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
    settings: SecAggSettings
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

    def check_open(self, participant_id: str, step: str) -> None:
        """What can be refused before the payload is read (wrong step, not expected, duplicate)."""
        if step not in STEPS:
            raise SecAggError(f"unknown secure aggregation step {step!r}")
        if participant_id in self.received and step == self.step:
            raise DuplicateSubmission(f"{participant_id} already sent its {step} for round {self.round_no}")
        if step != self.step:
            raise OutOfPhase(f"{step} is not open: round {self.round_no} is at step {self.step}")
        if participant_id not in self.expected:
            raise SecAggError(f"{participant_id} is not expected at step {step} of round {self.round_no} "
                              "(not in the roster, or dropped at an earlier step)")

    def receive(self, participant_id: str, step: str, payload: bytes, metrics: Mapping[str, float]) -> None:
        self.check_open(participant_id, step)
        message = _MESSAGE[step].from_bytes(payload)
        if message.sender != participant_id:
            raise SecAggError(f"{step} message claims sender {message.sender!r}, but the caller is {participant_id}")
        getattr(self.server, _RECEIVE[step])(message)
        self.received.add(participant_id)
        self.bytes_in[participant_id] = self.bytes_in.get(participant_id, 0) + len(payload)
        if step == "masked_input":
            self.metrics[participant_id] = dict(metrics)
            self.payload_digests[participant_id] = hashlib.sha256(payload).hexdigest()

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
        # A site encodes weight_i / scale * update_i: scale the sum back.
        weighted = vector.unflatten(total * float(self.weight_scale), self.shared)
        return SecAggResult(weighted, weight, tuple(result.survivors), tuple(result.dropped),
                            tuple(result.responders))


class DuplicateSubmission(SecAggError):
    """A second answer to the same step from one participant."""


class OutOfPhase(SecAggError):
    """An answer to a step that is not open (early, late, or replayed from an earlier step)."""
