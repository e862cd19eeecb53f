"""The coordinator's check of an unmasked SecAgg sum (coordinator.secagg_round.check_unmasked):
inputs encoded by the rule always pass it, and an input that skipped its clip or carried a count
outside 1..max_weight makes it refuse the sum."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator.secagg_round import check_unmasked
from security import secagg
from security.secagg import SecAggError, SecAggProtocolSettings

SETTINGS = SecAggProtocolSettings(clip_norm=5.0, bits=16)


def _sum(encoded: list[np.ndarray]) -> tuple[np.ndarray, int]:
    total = np.zeros_like(encoded[0], dtype=np.uint64)
    for e in encoded:
        total += e
    return secagg.decode_sum((total % (1 << 32)).astype(np.uint32), SETTINGS.bits)


def _honest(update: np.ndarray, samples: int, max_weight: int, n: int, seed: int) -> np.ndarray:
    # what participant.secagg_update encodes: w / M * clip(update), then w
    w = min(samples, max_weight)
    clipped = secagg.clip_l2(update, SETTINGS.clip_norm)
    return secagg.encode_input(clipped * (w / max_weight), w, SETTINGS.clip_norm, SETTINGS.bits, n,
                               np.random.default_rng(seed))


@settings(max_examples=60, deadline=None)
@given(n=st.integers(2, 6), d=st.integers(1, 40), max_weight=st.integers(1, 50), seed=st.integers(0, 2 ** 16),
       scale=st.sampled_from([1e-3, 1.0, 5.0, 1e3]))
def test_inputs_encoded_by_the_rule_always_pass(n, d, max_weight, seed, scale):
    rng = np.random.default_rng(seed)
    encoded = [_honest(rng.normal(size=d) * scale, int(rng.integers(1, 3 * max_weight)), max_weight, n, seed + i)
               for i in range(n)]
    total, weight = _sum(encoded)
    check_unmasked(total, weight, n, max_weight, SETTINGS)


def test_an_input_that_skipped_its_clip_is_refused():
    n, d, m = 3, 20, 10
    rng = np.random.default_rng(0)
    encoded = [_honest(rng.normal(size=d), 10, m, n, i) for i in range(n - 1)]
    # the hostile input: weight m, but its update clipped to 10 x clip_norm (a valid encoding)
    big = np.full(d, 10 * SETTINGS.clip_norm / np.sqrt(d))
    encoded.append(secagg.encode_input(big, m, 10 * SETTINGS.clip_norm, SETTINGS.bits, n, rng))
    total, weight = _sum(encoded)
    with pytest.raises(SecAggError, match="not clipped"):
        check_unmasked(total, weight, n, m, SETTINGS)


@pytest.mark.parametrize("count", [11, 1000, (1 << 32) - 25])   # above max_weight; negative mod 2^32
def test_an_input_with_a_count_no_site_may_carry_is_refused(count):
    n, d, m = 3, 8, 10
    rng = np.random.default_rng(1)
    encoded = [_honest(rng.normal(size=d), 10, m, n, i) for i in range(n - 1)]
    hostile = _honest(rng.normal(size=d), 10, m, n, 9)
    hostile[-1] = np.uint32(count)
    total, weight = _sum(encoded + [hostile])
    with pytest.raises(SecAggError, match="counts sum to"):
        check_unmasked(total, weight, n, m, SETTINGS)
