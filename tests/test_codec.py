"""The tensor codec: raw little-endian bytes, chunks, digests, and the assembler's refusals."""
from __future__ import annotations

import hashlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from kt_core import codec

arrays = hnp.arrays(
    dtype=st.sampled_from([np.float32, np.float64, np.int64, np.uint8, np.int32]),
    shape=hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=17),
    elements={"allow_nan": False, "allow_infinity": False})


def _roundtrip(tensors, chunk):
    encoded = codec.encode(tensors)
    assembler = codec.TensorAssembler([s for s, _ in encoded], max_chunk_bytes=chunk)
    for spec, raw in encoded:
        for offset, data in codec.iter_chunks(raw, chunk):
            assembler.add(spec.name, offset, data)
    return assembler.finish(), encoded


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(st.text("abcdefgh._", min_size=1, max_size=8), arrays, min_size=1, max_size=4),
       st.integers(1, 300))
def test_roundtrip_through_chunks_is_exact(tensors, chunk):
    out, encoded = _roundtrip(tensors, chunk)
    assert set(out) == set(tensors)
    for name, array in tensors.items():
        assert out[name].dtype == array.dtype and out[name].shape == array.shape
        np.testing.assert_array_equal(out[name], array)
    assert sum(len(raw) for _, raw in encoded) == sum(a.nbytes for a in tensors.values())


@given(arrays)
def test_encoding_is_little_endian_and_order_independent(array):
    big = array.astype(array.dtype.newbyteorder(">"))
    assert codec.to_bytes(big) == codec.to_bytes(array)
    assert codec.spec_of("t", array).sha256 == hashlib.sha256(codec.to_bytes(array)).digest()


def test_state_digest_binds_names_shapes_and_content():
    a = {"w": np.zeros((2, 3), np.float32), "b": np.ones(3, np.float32)}
    digest = codec.state_digest(s for s, _ in codec.encode(a))
    assert digest == codec.state_digest(reversed([s for s, _ in codec.encode(a)]))
    for changed in ({"w": np.zeros((3, 2), np.float32), "b": a["b"]},
                    {"w2": a["w"], "b": a["b"]},
                    {"w": a["w"], "b": np.full(3, 2, np.float32)},
                    {"w": a["w"].astype(np.float64), "b": a["b"]}):
        assert codec.state_digest(s for s, _ in codec.encode(changed)) != digest


def _assembler(array, **kw):
    spec = codec.spec_of("t", array)
    return codec.TensorAssembler([spec], **kw), codec.to_bytes(array)


@pytest.mark.parametrize("case, reason", [
    ("undeclared", "undeclared"), ("big_chunk", "chunk_too_large"), ("gap", "offset"),
    ("overflow", "size"), ("short", "incomplete"), ("digest", "digest_mismatch"), ("nan", "nonfinite"),
])
def test_assembler_refusals(case, reason):
    array = np.arange(16, dtype=np.float32)
    asm, raw = _assembler(array, max_chunk_bytes=32)
    with pytest.raises(codec.WireError) as info:
        if case == "undeclared":
            asm.add("other", 0, raw[:8])
        elif case == "big_chunk":
            asm.add("t", 0, raw[:40])
        elif case == "gap":
            asm.add("t", 8, raw[8:16])
        elif case == "overflow":
            asm.add("t", 0, raw[:32]); asm.add("t", 32, raw[32:]); asm.add("t", 64, b"x")  # noqa: E702
        elif case == "short":
            asm.add("t", 0, raw[:32]); asm.finish()  # noqa: E702
        elif case == "digest":
            bad = bytearray(raw); bad[0] ^= 1  # noqa: E702
            asm.add("t", 0, bytes(bad[:32])); asm.add("t", 32, bytes(bad[32:])); asm.finish()  # noqa: E702
        elif case == "nan":
            nan = array.copy(); nan[3] = np.nan  # noqa: E702
            asm, raw = _assembler(nan, max_chunk_bytes=64)
            asm.add("t", 0, raw); asm.finish()  # noqa: E702
    assert info.value.reason == reason


@pytest.mark.parametrize("spec, reason", [
    (codec.TensorSpec("t", "complex64", (2,), b"\0" * 32, 16), "dtype"),
    (codec.TensorSpec("t", "float32", (2,), b"\0" * 32, 12), "size"),
    (codec.TensorSpec("t", "float32", (1 << 20,), b"\0" * 32, 4 << 20), "size_limit"),
    (codec.TensorSpec("t", "float32", (2,), b"\0" * 31, 8), "digest"),
])
def test_specs_refused_before_any_data(spec, reason):
    with pytest.raises(codec.WireError) as info:
        codec.TensorAssembler([spec], max_tensor_bytes=1 << 20)
    assert info.value.reason == reason


def test_duplicate_declaration_refused():
    spec = codec.spec_of("t", np.zeros(2, np.float32))
    with pytest.raises(codec.WireError, match="declared twice"):
        codec.TensorAssembler([spec, spec])
