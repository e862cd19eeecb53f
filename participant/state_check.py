"""The site's check of the global states the coordinator sends: no longer a step than the run's
aggregation rule allows.

The coordinator may be hostile too. Whatever it claims, one round of the run's rule moves the
global state by at most `max_global_step` (L2, over the shared tensors): the server learning rate
times the longest mean step (`clip_norm` under secure aggregation, where the coordinator checks the
unmasked sum against it, coordinator.secagg_round.check_unmasked; `RunConfig.max_update_norm` for
plain uploads, which the coordinator clips to it), plus what the rule itself adds: the fixed-point
rounding of secure aggregation and the Gaussian noise of central user-level DP. A state further
from the last one this site accepted than that many rounds of it could be is refused
(`StateStepRefused`): the round is refused, or at the end of the run the final state is not taken
and the site's last local model is what it keeps. So a coordinator cannot swap the sites' model for
one of its own in a round; it can still walk it there one bounded step a round, which no check
here can tell from honest training. The first state is measured from the round-0 model the site
builds itself from the run's seed, as the coordinator does, so a site that joins late or restarts
is bounded by the rounds the run has had.
"""
from __future__ import annotations

import logging
import math
from typing import Iterable, Mapping

import numpy as np

from kt_core.codec import TensorSpec
from kt_core.config import RunConfig
from security.secagg.quantize import error_bound

log = logging.getLogger(__name__)

# ||N(0, s^2 I_d)|| <= s (sqrt(d) + t) but with probability exp(-t^2 / 2) (Gaussian concentration
# of a 1-Lipschitz function): at t = 10, 2e-22, never in a run
NOISE_TAIL = 10.0
# the states travel as float32: storing g + step rounds each element by up to |g| 2^-24
FLOAT32_SLACK = 2.0 ** -23


class StateStepRefused(ValueError):
    """A global state this site does not take: further from the last accepted one than the run's
    rule allows, or not laid out as the run's shared tensors (`StateSteps.check_layout`)."""


def max_global_step(config: RunConfig, numel: int) -> float:
    """The longest L2 step one round of this run's aggregation can give a global state of `numel`
    shared elements."""
    secagg, privacy = config.secagg, config.privacy
    if secagg.enabled:
        # each of n inputs rounds by < 2^-bits a coordinate; the sum is divided by W >= n and
        # multiplied by max_weight
        step = secagg.clip_norm + config.max_weight() * error_bound(1, secagg.bits) * math.sqrt(numel)
    else:
        step = config.max_update_norm()
    if privacy.enabled and privacy.mechanism == "central":
        # the coordinator's noise has std z S / n, at most z S (n >= 1)
        step += privacy.user_noise_multiplier * privacy.update_clip_norm * (math.sqrt(numel) + NOISE_TAIL)
    return config.federation.server_lr * step


def _names(names: list[str], most: int = 3) -> str:
    shown = ", ".join(repr(n[:80]) for n in names[:most])
    return shown + (f" and {len(names) - most} more" if len(names) > most else "")


def state_distance(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> tuple[float, float]:
    """(||a - b||, ||a|| + ||b||) over the tensors both hold, in float64."""
    diff = scale = 0.0
    for name in a.keys() & b.keys():
        x, y = np.asarray(a[name], np.float64), np.asarray(b[name], np.float64)
        if x.shape != y.shape:
            raise StateStepRefused(f"tensor {name!r} changed shape from {list(y.shape)} to {list(x.shape)}")
        diff += float(np.sum((x - y) ** 2))
        scale += math.sqrt(float(np.sum(x * x))) + math.sqrt(float(np.sum(y * y)))
    return math.sqrt(diff), scale


class StateSteps:
    """The last global state this site accepted in a run, and the check of the next against it."""

    def __init__(self, run_id: str, config: RunConfig, initial: Mapping[str, np.ndarray] | None = None):
        """`initial`: the round-0 shared state this site built from the run's seed (the coordinator
        builds the same, coordinator.coordinator.initial_state), so even the first state a site is
        sent, whichever round it joins at, is measured from there."""
        self.run_id, self.config = run_id, config
        self.last: tuple[int, dict[str, np.ndarray]] | None = None   # (rounds completed, shared tensors)
        if initial is not None:
            self.last = (0, {n: np.array(a, copy=True) for n, a in initial.items()})

    def check_layout(self, specs: Iterable[TensorSpec]) -> None:
        """The tensors a global state declares are this run's shared tensors, by name, dtype and
        shape, or StateStepRefused, before a byte of them arrives: a coordinator cannot make the
        site allocate what its model does not hold (the wire allows 2 GiB a declared tensor, and
        any number of them), nor slip in or leave out a tensor."""
        if self.last is None:
            return
        expected = {n: (str(a.dtype), tuple(a.shape)) for n, a in self.last[1].items()}
        declared = {s.name: (s.dtype, tuple(s.shape)) for s in specs}
        if declared == expected:
            return
        problems = []
        if extra := sorted(declared.keys() - expected.keys()):
            problems.append(f"{len(extra)} tensor(s) this site's model does not share: {_names(extra)}")
        if missing := sorted(expected.keys() - declared.keys()):
            problems.append(f"{len(missing)} of its shared tensors missing: {_names(missing)}")
        differing = [n for n in sorted(declared.keys() & expected.keys()) if declared[n] != expected[n]]
        problems += [f"{n!r} declared {declared[n][0]}{list(declared[n][1])}, the model's is "
                     f"{expected[n][0]}{list(expected[n][1])}" for n in differing[:3]]
        raise StateStepRefused("the global state's tensors are not this run's shared tensors: " + "; ".join(problems))

    def accept(self, completed: int, state: Mapping[str, np.ndarray]) -> None:
        """Take `state`, named as the global state after `completed` rounds, or raise
        StateStepRefused. Without an initial state the first one is taken as it is: there is
        nothing to measure it against."""
        shared = dict(state)   # a global state holds the shared tensors only
        if self.last is not None:
            before, previous = self.last
            rounds = completed - before
            if rounds < 0 or rounds > self.config.federation.rounds:
                raise StateStepRefused(f"the global state is named as after {completed} rounds, but this site already "
                                       f"took the state after {before} of the run's {self.config.federation.rounds}")
            numel = sum(int(np.asarray(a).size) for a in shared.values())
            distance, scale = state_distance(shared, previous)
            allowed = rounds * max_global_step(self.config, numel) + FLOAT32_SLACK * scale
            if distance > allowed:
                raise StateStepRefused(
                    f"the global state after {completed} rounds lies {distance:.6g} (L2) from the one after {before}, "
                    f"more than the {allowed:.6g} that {rounds} round(s) of the run's aggregation can move it "
                    "(server_lr x clip_norm, README \"One site's pull on the mean\"; at round 0: the model this "
                    "site built from the run's seed, which a task's build must reproduce exactly)")
        self.last = (completed, {n: np.array(a, copy=True) for n, a in shared.items()})
