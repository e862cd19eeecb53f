"""Streaming aggregation and limits, without a network: the upload spool, state files read and
written by offsets, FedAvg folding from disk, the limiter."""
from __future__ import annotations

import hashlib
import threading
import time

import grpc
import numpy as np
import pytest
from safetensors.numpy import load_file

from coordinator.limits import Limiter
from coordinator.errors import Refusal
from coordinator.spool import SpoolDir
from coordinator.state_file import CorruptStateError, open_state_file, write_state_file
from coordinator.store import Store
from coordinator.strategy import FedAvg
from kt_core import codec
from kt_core.config import ConfigError, FederationSettings, load_toml
from tests.conftest import fast_config


def _state(seed=0):
    rng = np.random.default_rng(seed)
    return {"b": rng.normal(size=(7,)).astype(np.float32), "w": rng.normal(size=(33, 5)).astype(np.float32),
            "z": np.zeros((0, 3), np.float32), "n": np.arange(10, dtype=np.int64)}


def _feed(receiver, tensors, chunk=16):
    for spec, raw in codec.encode(tensors):
        for offset, data in codec.iter_chunks(raw, chunk):
            receiver.add(spec.name, offset, data)


# -- the spool: the assembler's checks, on disk --------------------------------------------------

def test_spool_gives_back_exactly_what_was_sent_and_removes_its_file(tmp_path):
    spools = SpoolDir(tmp_path / "spool")
    tensors = _state()
    with spools.open([s for s, _ in codec.encode(tensors)], max_chunk_bytes=16) as spool:
        assert len(spools.files()) == 1
        _feed(spool, tensors, chunk=15)      # chunks that split float elements
        update = spool.finish()
        assert spool.bytes_received == sum(a.nbytes for a in tensors.values())
        for name, array in tensors.items():
            np.testing.assert_array_equal(update[name], array)
            assert np.concatenate(list(update.blocks(name, 4)) or [np.zeros(0)]).size == array.size
    assert spools.files() == []


def _bad_cases():
    tensors = {"w": np.arange(12, dtype=np.float32).reshape(3, 4)}
    specs = [s for s, _ in codec.encode(tensors)]
    raw = codec.to_bytes(tensors["w"])
    nan = {"w": tensors["w"].copy()}
    nan["w"][1, 2] = np.nan
    nan_specs = [s for s, _ in codec.encode(nan)]
    wrong = [codec.TensorSpec("w", "float32", (3, 4), hashlib.sha256(b"x").digest(), 48)]
    return {
        "undeclared": (specs, [("v", 0, raw[:8])]),
        "chunk_too_large": (specs, [("w", 0, raw[:32])]),
        "offset": (specs, [("w", 8, raw[8:16])]),
        "exceeds_declared": (specs, [("w", 0, raw[:16]), ("w", 16, raw[16:32]), ("w", 32, raw[32:48]),
                                     ("w", 48, b"\0" * 4)]),
        "incomplete": (specs, [("w", 0, raw[:16])]),
        "digest_mismatch": (wrong, [("w", i, raw[i:i + 16]) for i in range(0, 48, 16)]),
        "nonfinite": (nan_specs, [("w", i, codec.to_bytes(nan["w"])[i:i + 10]) for i in range(0, 48, 10)]),
    }


@pytest.mark.parametrize("reason", sorted(_bad_cases()))
def test_spool_refuses_what_the_assembler_refuses(tmp_path, reason):
    specs, chunks = _bad_cases()[reason]
    spools = SpoolDir(tmp_path)
    with pytest.raises(codec.WireError) as spooled:
        with spools.open(specs, max_chunk_bytes=16) as spool:
            for name, offset, data in chunks:
                spool.add(name, offset, data)
            spool.finish()
    assert spooled.value.reason == reason
    assert spools.files() == []   # removed on the error path too
    if reason != "exceeds_declared":  # the assembler calls that one "size"
        with pytest.raises(codec.WireError) as assembled:
            assembler = codec.TensorAssembler(specs, max_chunk_bytes=16)
            for name, offset, data in chunks:
                assembler.add(name, offset, data)
            assembler.finish()
        assert assembled.value.reason == reason


def test_spool_checks_declarations_before_creating_a_file(tmp_path):
    spools = SpoolDir(tmp_path)
    spec = codec.spec_of("w", np.zeros(4, np.float32))
    with pytest.raises(codec.WireError, match="declared twice"):
        spools.open([spec, spec])
    with pytest.raises(codec.WireError, match="exceeds the limit"):
        spools.open([spec], max_tensor_bytes=8)
    assert spools.files() == []


def test_leftover_spool_files_are_swept_at_startup(tmp_path):
    (tmp_path / "spool").mkdir()
    (tmp_path / "spool" / "dead.upload").write_bytes(b"half an upload")
    spools = SpoolDir(tmp_path / "spool")
    assert spools.files() == []


# -- state files ----------------------------------------------------------------------------------

def test_state_file_is_safetensors_and_streams_what_codec_encodes(tmp_path):
    state = _state(1)
    written = write_state_file(tmp_path / "s.safetensors", state, {"round": "1"})
    loaded = load_file(str(tmp_path / "s.safetensors"))   # the reference reader agrees
    assert set(loaded) == set(state)
    for name in state:
        np.testing.assert_array_equal(loaded[name], state[name])
        np.testing.assert_array_equal(written[name], state[name])
    encoded = codec.encode(state)
    assert written.digest == codec.state_digest(s for s, _ in encoded)
    assert list(written.specs) == [s for s, _ in encoded]
    expected = [(s.name, off, data) for s, raw in encoded for off, data in codec.iter_chunks(raw, 64)]
    assert list(written.chunks(64)) == expected
    reopened = open_state_file(tmp_path / "s.safetensors", written.digest)
    assert reopened.specs == written.specs and reopened.offsets == written.offsets


def test_state_file_damage_is_named(tmp_path):
    path = tmp_path / "s.safetensors"
    digest = write_state_file(path, _state(), {}).digest
    raw = path.read_bytes()
    path.write_bytes(raw[:-3])
    with pytest.raises(CorruptStateError, match="s.safetensors"):
        open_state_file(path, digest)
    path.write_bytes(b"\xff" * 8 + raw[8:])
    with pytest.raises(CorruptStateError, match="cannot be read"):
        open_state_file(path, digest)


def test_store_hands_out_state_files_without_loading_them(tmp_path):
    store = Store(tmp_path)
    state = _state(2)
    digest = store.create_run("r1", "{}", "{}", state)
    round_no, state_file, recorded = store.last_round("r1")
    assert round_no == 0 and recorded == digest == state_file.digest
    assert store.state_file("r1", digest) is state_file
    np.testing.assert_array_equal(state_file["w"], state["w"])
    store.close()


# -- FedAvg from disk ----------------------------------------------------------------------------

def test_fedavg_from_disk_equals_fedavg_in_memory_bit_for_bit(tmp_path):
    state = {"b": np.linspace(-1, 1, 5, dtype=np.float32), "w": np.random.default_rng(3).normal(
        size=(300, 1000)).astype(np.float32)}
    updates = [({n: np.random.default_rng(10 + i).normal(size=a.shape).astype(np.float32) for n, a in state.items()},
                n) for i, n in enumerate((3, 17, 1))]
    memory = FedAvg(server_lr=0.7)
    memory.begin(state)
    for update, n in updates:
        memory.add(update, n)
    expected = memory.finish()
    assert isinstance(expected, dict)

    on_disk = write_state_file(tmp_path / "g.safetensors", state, {})
    spools = SpoolDir(tmp_path / "spool")
    streamed = FedAvg(server_lr=0.7)
    streamed.begin(on_disk)
    for update, n in updates:
        with spools.open([s for s, _ in codec.encode(update)], max_chunk_bytes=1 << 20) as spool:
            _feed(spool, update, chunk=1 << 20)
            streamed.add(spool.finish(), n)
    result = streamed.finish()
    assert not isinstance(result, dict)   # lazy: the store writes it block by block
    out = write_state_file(tmp_path / "n.safetensors", result, {})
    for name in state:
        np.testing.assert_array_equal(out[name], expected[name])
    with pytest.raises(ValueError):
        streamed.add(updates[0][0], 1)    # the finished round holds no accumulators


# -- limits ---------------------------------------------------------------------------------------

class _Call:
    def __init__(self):
        self.callbacks = []

    def add_callback(self, fn):
        self.callbacks.append(fn)
        return True

    def end(self):
        for fn in self.callbacks:
            fn()


def test_concurrent_calls_per_participant_are_limited_and_released():
    limiter = Limiter()
    fed = FederationSettings(max_rpcs_per_site=2, rpc_rate_per_site=0)
    calls = [_Call(), _Call()]
    for call in calls:
        limiter.admit("site-a", fed, call.add_callback)
    limiter.admit("site-b", fed, _Call().add_callback)     # another site has its own allowance
    with pytest.raises(Refusal) as info:
        limiter.admit("site-a", fed, _Call().add_callback)
    assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert str(info.value).startswith("federation.max_rpcs_per_site: site-a already has 2 calls open")
    calls[0].end()
    calls[0].end()                                           # a second termination is not a second release
    assert limiter.open_calls("site-a") == 1
    limiter.admit("site-a", fed, lambda fn: False)           # already ended: released at once
    assert limiter.open_calls("site-a") == 1


def test_call_rate_is_a_token_bucket():
    now = [0.0]
    limiter = Limiter(clock=lambda: now[0])
    fed = FederationSettings(rpc_rate_per_site=5.0, max_rpcs_per_site=1000)
    for _ in range(10):                                      # a burst of two seconds' worth
        limiter.admit("site-a", fed, lambda fn: False)
    with pytest.raises(Refusal, match="federation.rpc_rate_per_site: site-a started calls faster than 5"):
        limiter.admit("site-a", fed, lambda fn: False)
    now[0] += 0.2                                            # one token back
    limiter.admit("site-a", fed, lambda fn: False)


def test_concurrent_uploads_wait_for_a_slot_then_are_refused():
    limiter = Limiter()
    fed = FederationSettings(max_concurrent_uploads=1, upload_queue_timeout_s=0.2)
    got, release = [], threading.Event()

    def second_upload():
        with limiter.upload_slot(FederationSettings(max_concurrent_uploads=1, upload_queue_timeout_s=30)):
            got.append(limiter.uploads_in_progress)
            release.wait(10)

    with limiter.upload_slot(fed):
        with pytest.raises(Refusal, match="federation.max_concurrent_uploads: 1 uploads are being received"):
            with limiter.upload_slot(fed):
                pass
        waiter = threading.Thread(target=second_upload)
        waiter.start()
        time.sleep(0.1)
        assert not got                                       # waiting, not refused
    deadline = time.monotonic() + 10
    while not got and time.monotonic() < deadline:
        time.sleep(0.01)
    assert got == [1]                                        # it got the slot once the first one ended
    release.set()
    waiter.join(10)
    assert limiter.uploads_in_progress == 0


def test_limit_settings_are_validated_by_name():
    for field, value, phrase in (("max_concurrent_uploads", 0, "between 1 and 4096"),
                                 ("upload_queue_timeout_s", -1.0, ">= 0"),
                                 ("max_rpcs_per_site", 1, "between 2 and 1024"),
                                 ("rpc_rate_per_site", -5.0, ">= 0")):
        text = fast_config().replace("[federation]\n", f"[federation]\n{field} = {value}\n")
        with pytest.raises(ConfigError, match=f"federation.{field}: .*{phrase}"):
            load_toml(text)


# -- secure aggregation: a running sum, not every masked input ------------------------------------

def test_secagg_server_keeps_one_running_sum_whatever_the_number_of_inputs():
    from security.secagg import SecAggProtocolSettings
    from security.secagg.driver import run_round

    rng = np.random.default_rng(5)
    inputs = {f"site-{i}": rng.integers(0, 2**32, 1000, dtype=np.uint32) for i in range(8)}
    trace = run_round(inputs, SecAggProtocolSettings(), dropouts={"site-3": "masked_input", "site-6": "consistency"})
    survivors = trace.result.survivors
    expected = np.zeros(1000, dtype=np.uint64)
    for u in survivors:
        expected += inputs[u]
    np.testing.assert_array_equal(trace.result.total, (expected % 2**32).astype(np.uint32))
    # what the server kept of each masked input: its digest, never the vector
    assert set(trace.server.inputs) == set(survivors)
    assert all(isinstance(v, str) and len(v) == 64 for v in trace.server.inputs.values())
    vectors = [v for v in vars(trace.server).values() if isinstance(v, np.ndarray) and v.size >= 1000]
    assert len(vectors) == 1
