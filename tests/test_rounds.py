"""The round engine and store without a network: the logic the servicers hand off to."""
from __future__ import annotations

import dataclasses
import random
import threading

import grpc
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from coordinator.coordinator import Coordinator
from coordinator.errors import Refusal
from coordinator.store import CorruptStateError, Store, UploadRecord
from coordinator.strategy import FedAvg
from kt_core import codec
from kt_core.config import load_toml
from kt_core.wire import convert
from kt_core.wire import federation_pb2 as pb
from participant.agent import backoff_delay
from tests.conftest import WIDE_BOUND, fast_config


def running_coordinator(tmp_path, sites=("s1", "s2"), extra: str = WIDE_BOUND):
    """An in-process coordinator with a started two-round run over `sites` (two required); the
    caller stops it with `stop_coordinator`."""
    config = load_toml(fast_config(rounds=2, min_sites=2, timeout=30, sites=list(sites), extra=extra))
    config = dataclasses.replace(config, federation=dataclasses.replace(config.federation, gather_timeout_s=0.0))
    coord = Coordinator(Store(tmp_path))
    coord.start_run(config)
    return coord


def stop_coordinator(coord) -> None:
    coord.stop("shutdown")
    coord.store.close()


@pytest.fixture
def coordinator(tmp_path):
    coord = running_coordinator(tmp_path)
    yield coord
    stop_coordinator(coord)


def _next_assignment(session, timeout=10):
    task = session.queue.get(timeout=timeout)
    assert task.HasField("round")
    return task.round


def _upload(engine, site_id, task, value, samples):
    update = {n: np.full(a.shape, value, a.dtype) for n, a in engine.global_state.items()}
    head = pb.UploadHeader(header=convert.header(engine.run_id, task.header.round, site_id), attempt_id=task.attempt_id,
                           base_state_digest=task.global_state_digest, num_samples=samples)
    specs = [s for s, _ in codec.encode(update)]
    head.tensors.extend(convert.spec_to_pb(s) for s in specs)
    attempt = engine.answers.check_upload(site_id, head)
    record = UploadRecord(site_id, task.attempt_id.hex(), samples, tuple(specs), sum(s.nbytes for s in specs),
                          codec.state_digest(specs))
    engine.answers.submit(attempt, record, update, {"accuracy": 0.5})
    return head


def test_round_completes_with_the_weighted_mean_and_persists(coordinator):
    engine = coordinator.current()
    before = {n: a.copy() for n, a in engine.global_state.items()}
    s1, s2 = engine.sessions.connect("s1"), engine.sessions.connect("s2")
    t1, t2 = _next_assignment(s1), _next_assignment(s2)
    assert t1.attempt_id == t2.attempt_id and t1.header.round == 1
    head = _upload(engine, "s1", t1, 1.0, 1)
    with pytest.raises(Refusal) as info:  # the same update again
        engine.answers.check_upload("s1", head)
    assert info.value.code == grpc.StatusCode.ALREADY_EXISTS
    _upload(engine, "s2", t2, 5.0, 3)
    t = _next_assignment(s1)
    assert t.header.round == 2
    for name, old in before.items():
        np.testing.assert_allclose(engine.global_state[name], old + 4.0, atol=1e-6)
    round_no, state, digest = coordinator.store.last_round(engine.run_id)
    assert round_no == 1 and digest == engine.global_digest == t.global_state_digest


def test_a_site_that_claims_too_many_samples_or_skips_its_clip_moves_the_mean_no_further(tmp_path):
    # the run's bounds (RunConfig.max_weight, max_update_norm): weight min(N, 100), norm <= 2
    coord = running_coordinator(tmp_path, extra="[secagg]\nclip_norm = 2.0\nmax_samples_per_site = 100\n")
    try:
        engine = coord.current()
        before = {n: a.astype(np.float64) for n, a in engine.global_state.items()}
        elements = sum(a.size for a in before.values())
        s1, s2 = engine.sessions.connect("s1"), engine.sessions.connect("s2")
        t1, t2 = _next_assignment(s1), _next_assignment(s2)
        honest = 1.0 / np.sqrt(elements)                 # norm 1: within the bound, folded whole
        _upload(engine, "s1", t1, honest, 100)
        _upload(engine, "s2", t2, 1e6, 2 ** 53 - 1)     # norm ~1e8 and a sample count no site has
        _next_assignment(s1)
        hostile = 2.0 / np.sqrt(elements)                # scaled to the bound, weighed as 100
        for name, old in before.items():
            np.testing.assert_allclose(engine.global_state[name], old + (honest + hostile) / 2, rtol=1e-5, atol=1e-9)
        record = coord.store.rounds(engine.run_id)[0]
        assert record.metrics["s2/aggregation.weight"] == 100
        assert record.metrics["s2/aggregation.clip_factor"] == pytest.approx(2.0 / (1e6 * np.sqrt(elements)), rel=1e-5)
        assert record.metrics["s1/aggregation.clip_factor"] == 1.0
        assert record.metrics["s1/aggregation.update_norm"] == pytest.approx(1.0, rel=1e-5)
    finally:
        stop_coordinator(coord)


def test_too_few_updates_abort_and_retry_with_a_new_attempt_id(coordinator):
    engine = coordinator.current()
    engine.fed = dataclasses.replace(engine.fed, round_timeout_s=0.5)
    s1, s2 = engine.sessions.connect("s1"), engine.sessions.connect("s2")
    first = _next_assignment(s1)
    _next_assignment(s2)
    _upload(engine, "s1", first, 1.0, 1)
    retry = _next_assignment(s1, timeout=10)  # s2 never answered: aborted at the deadline, retried
    assert retry.header.round == 1 and retry.attempt_id != first.attempt_id
    assert coordinator.store.aborted_count(engine.run_id) == 1
    with pytest.raises(Refusal) as info:  # the aborted attempt's attempt id is no longer accepted
        _upload(engine, "s1", first, 1.0, 1)
    assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION


def test_disconnect_drops_and_reconnect_resends_the_task(coordinator):
    engine = coordinator.current()
    s1, s2 = engine.sessions.connect("s1"), engine.sessions.connect("s2")
    task = _next_assignment(s1)
    _next_assignment(s2)
    engine.sessions.disconnect(s2)
    assert engine.attempt.dropped == {"s2"}
    again = engine.sessions.connect("s2")
    assert _next_assignment(again).attempt_id == task.attempt_id
    assert engine.attempt.dropped == set()


def test_newer_stream_replaces_the_old_one(coordinator):
    engine = coordinator.current()
    old = engine.sessions.connect("s1")
    engine.sessions.connect("s1")
    assert old.queue.get(timeout=1) is None and not old.open


def test_state_for_refuses_other_digests(coordinator):
    engine = coordinator.current()
    with pytest.raises(Refusal):
        engine.state_for("0" * 64)
    assert engine.state_for(engine.global_digest)


def test_fedavg_weighted_mean_and_errors():
    strategy = FedAvg(server_lr=1.0)
    strategy.begin({"w": np.zeros(3, np.float32)})
    strategy.add({"w": np.ones(3, np.float32)}, 1)
    strategy.add({"w": np.full(3, 3.0, np.float32)}, 3)
    np.testing.assert_allclose(strategy.finish()["w"], 2.5)
    with pytest.raises(ValueError):
        strategy.add({"v": np.ones(3)}, 1)
    with pytest.raises(ValueError):
        strategy.add({"w": np.ones(3)}, 0)
    strategy.begin({"w": np.zeros(3, np.float32)})
    with pytest.raises(ValueError):
        strategy.finish()


def test_store_sweeps_uncommitted_files_and_detects_corruption(tmp_path):
    store = Store(tmp_path)
    state = {"w": np.arange(4, dtype=np.float32)}
    store.create_run("r1", "{}", "{}", state)
    run_dir = tmp_path / "runs" / "r1"
    (run_dir / "round-00001.safetensors").write_bytes(b"left over by a crash")
    (run_dir / "round-00002.safetensors.tmp").write_bytes(b"half")
    removed = store.sweep("r1")
    assert sorted(p.name for p in removed) == ["round-00001.safetensors", "round-00002.safetensors.tmp"]
    assert store.last_round("r1")[0] == 0
    path = run_dir / "round-00000.safetensors"
    path.write_bytes(path.read_bytes()[:-4] + b"\0\0\0\1")
    with pytest.raises(CorruptStateError, match="round-00000.safetensors"):
        store.last_round("r1")


@given(st.integers(0, 40), st.floats(0.01, 2), st.floats(0.1, 60))
def test_backoff_is_capped_and_non_negative(attempt, initial, cap):
    delay = backoff_delay(attempt, initial, cap, random.Random(attempt))
    assert 0 <= delay <= min(cap, initial * 2 ** attempt)


def test_engine_stop_ends_the_loop(coordinator):
    engine = coordinator.current()
    done = threading.Event()
    threading.Thread(target=lambda: (coordinator._thread.join(), done.set()), daemon=True).start()
    engine.stop("shutdown")
    assert done.wait(5)
