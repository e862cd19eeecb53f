"""SecAgg building blocks: primitives, Shamir, quantization, neighbour graphs, settings."""
from __future__ import annotations

import itertools
import random

import numpy as np
import pytest
from hypothesis import given, settings as hsettings, strategies as st

from security.secagg import SecAggError, SecAggProtocolSettings, check_capacity, effective_degree, neighbours
from security.secagg import primitives as P
from security.secagg import quantize as Q
from security.secagg import shamir

FAST = hsettings(max_examples=40, deadline=None)


# ---------------------------------------------------------------- primitives

def test_key_agreement_is_symmetric_and_bound_to_context():
    a, b = P.KeyPair.generate(), P.KeyPair.generate()
    info = P.pair_info("x", "run", 1, "a", "b")
    assert P.agree(a.private, b.public, info) == P.agree(b.private, a.public, P.pair_info("x", "run", 1, "b", "a"))
    assert P.agree(a.private, b.public, info) != P.agree(a.private, b.public, P.pair_info("x", "run", 2, "a", "b"))


def test_aes_gcm_refuses_other_associated_data_and_tampering():
    key = bytes(range(32))
    sealed = P.seal(key, b"secret share", b"aad-1")
    assert P.open_sealed(key, sealed, b"aad-1", "t") == b"secret share"
    with pytest.raises(SecAggError, match="authentication failed"):
        P.open_sealed(key, sealed, b"aad-2", "t")
    bad = bytearray(sealed)
    bad[-1] ^= 1
    with pytest.raises(SecAggError, match="authentication failed"):
        P.open_sealed(key, bytes(bad), b"aad-1", "t")
    with pytest.raises(SecAggError, match="too short"):
        P.open_sealed(key, b"short", b"aad-1", "t")


def test_mask_expansion_is_aes_ctr_from_full_32_byte_seed():
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
    seed = bytes(range(32))
    m = P.expand_mask(seed, 1000)
    assert m.dtype == np.uint32 and m.shape == (1000,)
    ks = Cipher(algorithms.AES(seed), modes.CTR(bytes(16))).encryptor().update(bytes(4000))
    assert m.tobytes() == ks  # exactly the AES-256-CTR keystream
    assert np.array_equal(P.expand_mask(seed, 1000), m)
    # every seed byte matters (no folding to 32 bits)
    for i in (0, 5, 31):
        other = bytearray(seed)
        other[i] ^= 1
        assert not np.array_equal(P.expand_mask(bytes(other), 1000), m)
    with pytest.raises(SecAggError):
        P.expand_mask(b"\x00" * 4, 10)


def test_masks_look_uniform():
    m = P.expand_mask(b"k" * 32, 200_000)
    assert abs(m.astype(np.float64).mean() / 2**32 - 0.5) < 0.01
    assert len(np.unique(m)) > 199_000


def test_pack_unpack_round_trip_and_errors():
    data = P.pack(b"a", "bc", 7)
    assert P.unpack(data, 3, "t")[:2] == [b"a", b"bc"]
    with pytest.raises(SecAggError, match="truncated"):
        P.unpack(data[:-1], 3, "t")
    with pytest.raises(SecAggError, match="trailing"):
        P.unpack(data + b"x", 3, "t")


# ---------------------------------------------------------------- Shamir

@FAST
@given(st.binary(min_size=32, max_size=32), st.integers(2, 9), st.data())
def test_shamir_any_t_shares_reconstruct(secret, n, data):
    t = data.draw(st.integers(1, n))
    xs = data.draw(st.lists(st.integers(1, 65535), min_size=n, max_size=n, unique=True))
    shares = list(shamir.split(secret, xs, t).values())
    subset = data.draw(st.permutations(shares))[: data.draw(st.integers(t, n))]
    assert shamir.reconstruct(subset, t) == secret
    assert shamir.reconstruct(subset, t, verify_extra=True) == secret
    if t > 1:
        with pytest.raises(SecAggError, match="refusing to reconstruct"):
            shamir.reconstruct(subset[: t - 1], t)


def test_shamir_detects_a_wrong_extra_share_and_checks_input():
    shares = list(shamir.split(b"s" * 32, [1, 2, 3, 4], 2).values())
    shares[3] = shamir.Share(shares[3].x, (shares[3].y + 1) % shamir.PRIME)
    with pytest.raises(SecAggError, match="inconsistent shares"):
        shamir.reconstruct(shares, 2, verify_extra=True)
    with pytest.raises(SecAggError, match="duplicate"):
        shamir.reconstruct([shares[0], shares[0]], 2)
    with pytest.raises(SecAggError, match="32 bytes"):
        shamir.split(b"short", [1, 2], 2)
    with pytest.raises(SecAggError, match="threshold"):
        shamir.split(b"s" * 32, [1, 2], 3)
    with pytest.raises(SecAggError, match="68 bytes"):
        shamir.Share.from_bytes(b"x" * 10)
    assert shamir.Share.from_bytes(shares[0].to_bytes()) == shares[0]


# ---------------------------------------------------------------- quantization

def test_capacity_refuses_overflow_prone_configurations():
    with pytest.raises(SecAggError, match="overflow-prone"):
        check_capacity(1000, 1e6, 16)
    check_capacity(1000, 1.0, 16)          # 1000 * 65536 < 2^31
    with pytest.raises(SecAggError, match="overflow-prone"):
        check_capacity(32769, 1.0, 16)     # 32769 * 65536 > 2^31 - 1
    with pytest.raises(SecAggError, match="clip_norm"):
        check_capacity(3, float("nan"), 16)
    with pytest.raises(SecAggError, match="bits"):
        check_capacity(3, 1.0, 40)


def test_clipping_is_on_the_whole_vector_not_per_element():
    x = np.array([3.0, 4.0])
    c = Q.clip_l2(x, 1.0)
    assert np.allclose(c, [0.6, 0.8])       # direction kept; per-element clipping would give [1, 1]
    assert np.allclose(Q.clip_l2(x, 10.0), x)
    with pytest.raises(SecAggError, match="NaN"):
        Q.clip_l2([np.nan], 1.0)


def test_stochastic_rounding_is_unbiased():
    rng = np.random.default_rng(1)
    x = np.full(200_000, 0.3 / 2**4)        # 0.3 of one quantization step at bits=4
    q = Q.quantize(x, 1e6, 4, rng).view(np.int32)
    assert set(np.unique(q)) == {0, 1}
    assert abs(q.mean() - 0.3) < 0.01


@FAST
@given(st.integers(1, 8), st.integers(1, 40), st.integers(4, 20), st.floats(0.1, 100), st.data())
def test_dequantized_sum_within_stated_bound(n, m, bits, clip, data):
    from hypothesis.extra.numpy import arrays
    clip = min(clip, (2**31 - 1) / n / 2**bits * 0.99)
    xs = [data.draw(arrays(np.float64, m, elements=st.floats(-1e3, 1e3))) for _ in range(n)]
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32)))
    Q.check_capacity(n, clip, bits)
    total = np.zeros(m, dtype=np.uint32)
    for x in xs:
        total += Q.quantize(x, clip, bits, rng)
    expect = sum(Q.clip_l2(x, clip) for x in xs)
    assert np.all(np.abs(Q.dequantize(total, bits) - expect) < Q.error_bound(n, bits) + 1e-9 * clip * n)


def test_encode_input_checks_count_and_appends_it():
    v = Q.encode_input(np.ones(3), 7, 10.0, 8, 4)
    assert v.dtype == np.uint32 and v.shape == (4,) and v[-1] == 7
    with pytest.raises(SecAggError, match="sample count"):
        Q.encode_input(np.ones(3), -1, 10.0, 8, 4)
    with pytest.raises(SecAggError, match="sample count"):
        Q.encode_input(np.ones(3), 2**31, 10.0, 8, 4)


# ---------------------------------------------------------------- graph

@FAST
@given(st.integers(3, 60), st.integers(2, 60), st.binary(min_size=16, max_size=32))
def test_graph_symmetric_regular(n, k, seed):
    ids = [f"p{i}" for i in range(n)]
    g = neighbours(ids, k, seed)
    d = effective_degree(n, k)
    for u, vs in g.items():
        assert u not in vs
        assert len(vs) == d
        for v in vs:
            assert u in g[v]
    if k >= n - 1:
        assert d == n - 1
    elif not (k % 2 and n % 2):
        assert d == k


def test_graph_complete_when_k_zero_and_depends_on_seed():
    ids = [f"p{i}" for i in range(10)]
    assert all(len(v) == 9 for v in neighbours(ids, 0, b"s" * 16).values())
    assert neighbours(ids, 4, b"a" * 16) == neighbours(ids, 4, b"a" * 16)
    assert neighbours(ids, 4, b"a" * 16) != neighbours(ids, 4, b"b" * 16)


# ---------------------------------------------------------------- settings

@pytest.mark.parametrize("kwargs, n, field", [
    ({"threshold": 2}, 5, "threshold t=2 is too small"),
    ({"threshold": 6}, 5, "exceeds"),
    ({"threshold": 1}, 2, "too small"),
    ({"neighbours": -1}, 5, "neighbours"),
    ({"neighbours": 1}, 5, "neighbours"),
    ({"clip_norm": 0}, 5, "clip_norm"),
    ({"clip_norm": float("inf")}, 5, "clip_norm"),
    ({"bits": 31}, 5, "bits"),
    ({"bits": 2.5}, 5, "bits"),
    ({"enabled": "yes"}, 5, "enabled"),
    ({"clip_norm": 1e6, "bits": 16}, 1000, "overflow-prone"),
    ({}, 1, "at least 2"),
])
def test_settings_validation_names_the_field(kwargs, n, field):
    with pytest.raises(SecAggError, match=field):
        SecAggProtocolSettings(**kwargs).validate(n)


def test_settings_defaults_and_config_io():
    s = SecAggProtocolSettings()
    s.validate(5)
    assert s.threshold_for(5) == 3 and s.threshold_for(2) == 2
    s2 = SecAggProtocolSettings(neighbours=4)
    assert s2.holders(100) == 5 and s2.threshold_for(100) == 3
    assert SecAggProtocolSettings.from_mapping(s.to_dict()) == s
    with pytest.raises(SecAggError, match="unknown secagg setting"):
        SecAggProtocolSettings.from_mapping({"treshold": 3})
