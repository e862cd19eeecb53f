"""The coordinator's small parts on their own: admission's field bounds, the refusal record budget,
the stream watchdog, the strategies (FedAvg, DPFedAvg) and the lazy-state protocol."""
from __future__ import annotations

import threading

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from coordinator.admission import MAX_STRING, MAX_WIRE_INT, check_fields
from coordinator.errors import Code, Refusal
from coordinator.limits import RecordBudget, StreamWatchdog
from coordinator.state_file import LazyState, state_layout, write_state_file
from coordinator.store import SCHEMA_VERSION, Store, StoreVersionError
from coordinator.strategy import DPFedAvg, FedAvg, strategy_for
from kt_core.config import load_toml
from kt_core.wire import convert
from kt_core.wire import federation_pb2 as pb
from tests.conftest import fast_config


# -- admission: every integer and string of a message is bounded --------------------------------------

@given(st.integers(min_value=0, max_value=2 ** 64 - 1))
def test_every_integer_above_2_53_is_refused_wherever_it_sits(value):
    messages = [pb.StateRequest(header=convert.header("r", value, "s")),
                pb.UploadHeader(header=convert.header("r", 1, "s"), num_samples=value),
                pb.UploadHeader(header=convert.header("r", 1, "s"),
                                tensors=[pb.TensorSpec(name="w", dtype="float32", shape=[2, value])])]
    for message in messages:
        if value <= MAX_WIRE_INT:
            check_fields(message)
        else:
            with pytest.raises(Refusal) as info:
                check_fields(message)
            assert info.value.code == Code.INVALID_ARGUMENT and "2^53" in str(info.value)
            assert str(value) not in str(info.value)


@given(st.integers(min_value=0, max_value=4 * MAX_STRING))
def test_strings_are_bounded_and_never_echoed(length):
    text = "x" * length
    message = pb.DeclineRequest(header=convert.header("r", 1, text), code="c")
    if length <= MAX_STRING:
        check_fields(message)
    else:
        with pytest.raises(Refusal, match="header.site_id: .* characters") as info:
            check_fields(message)
        assert text not in str(info.value)


def test_map_keys_and_long_named_fields_have_their_own_limits():
    check_fields(pb.LeaveRequest(header=convert.header(), reason="r" * 4096))    # a reason may be long
    with pytest.raises(Refusal, match="reason"):
        check_fields(pb.LeaveRequest(header=convert.header(), reason="r" * 4097))
    head = pb.UploadHeader(header=convert.header())
    head.metrics["k" * (MAX_STRING + 1)] = 1.0
    with pytest.raises(Refusal, match="metrics key"):
        check_fields(head)
    with pytest.raises(Refusal, match="attempt_id"):
        check_fields(pb.DeclineRequest(header=convert.header(), attempt_id=b"\0" * 65))


# -- refusals: a flood costs a bounded number of records -----------------------------------------------

def test_record_budget_counts_what_it_does_not_record():
    now = [0.0]
    budget = RecordBudget(rate=2.0, burst=3.0, clock=lambda: now[0])
    assert [budget.take("p") for _ in range(5)] == [0, 0, 0, None, None]
    assert budget.take("q") == 0                       # one peer's flood leaves another's budget
    now[0] += 1.0
    assert budget.take("p") == 2                       # the next record carries the count held back
    assert budget.take("p") == 0


# -- the watchdog ends streams that stall ---------------------------------------------------------------

class _Context:
    def __init__(self):
        self.cancelled = threading.Event()

    def cancel(self):
        self.cancelled.set()


def test_watchdog_ends_a_call_without_a_first_message_and_an_idle_one_but_not_a_busy_one():
    dog = StreamWatchdog(first_message_s=0.2, idle_s=0.3)
    silent, idle, busy = _Context(), _Context(), _Context()
    w_silent, w_idle, w_busy = dog.watch(silent), dog.watch(idle), dog.watch(busy)
    w_idle.touch()
    for _ in range(8):
        w_busy.touch()
        threading.Event().wait(0.1)
    assert silent.cancelled.is_set() and "first message" in w_silent.reason
    assert idle.cancelled.is_set() and "idle" in w_idle.reason
    assert not busy.cancelled.is_set() and w_busy.reason is None
    w_busy.done()
    threading.Event().wait(0.5)
    assert not busy.cancelled.is_set()               # a finished call is no longer watched


# -- strategies -------------------------------------------------------------------------------------------

def _config(extra=""):
    return load_toml(fast_config(sites=["s1", "s2", "s3"], extra=extra))


def test_fedavg_selects_configures_and_weighs_by_samples():
    strategy = strategy_for(_config())
    assert isinstance(strategy, FedAvg)
    assert strategy.select({"s3": 1, "s1": 1, "s2": 1}, 1) == {"s1", "s2", "s3"}
    plan = strategy.configure(4)
    assert (plan.epochs, plan.batch_size, plan.lr, plan.seed) == (2, 32, 0.05, 3 * 100_003 + 4)
    assert strategy.weight(70) == 70 and strategy.privacy_round(1) is None
    assert strategy.max_weight() == _config().secagg.max_samples_per_site
    # the same bounds a SecAgg site applies, here applied by the coordinator to plain uploads
    assert strategy.weight(10 ** 9) == strategy.max_weight()
    assert strategy.max_update_norm == _config().secagg.clip_norm


def test_fedavg_scales_an_update_longer_than_the_bound_to_it_and_says_so():
    strategy = FedAvg(max_weight=5, max_update_norm=2.0)
    strategy.begin({"a": np.zeros(3, np.float32), "b": np.zeros((2, 2), np.float32)})
    long = {"a": np.array([3.0, 0.0, 0.0], np.float32), "b": np.full((2, 2), 2.0, np.float32)}   # norm 5
    short = {"a": np.array([0.0, 1.0, 0.0], np.float32), "b": np.zeros((2, 2), np.float32)}      # norm 1
    folded = strategy.add(long, strategy.weight(100)), strategy.add(short, strategy.weight(5))
    assert [(f.weight, f.norm, f.factor) for f in folded] == [(5, 5.0, pytest.approx(0.4)), (5, 1.0, 1.0)]
    new = strategy.finish()
    np.testing.assert_allclose(new["a"], [0.6, 0.5, 0.0], rtol=1e-6)
    np.testing.assert_allclose(new["b"], np.full((2, 2), 0.4), rtol=1e-6)


def test_dpfedavg_weighs_equally_adds_central_noise_and_reports_user_level_epsilon():
    config = _config('[privacy]\nenabled = true\nmechanism = "central"\nupdate_clip_norm = 1.0\n'
                     'user_noise_multiplier = 2.0\n')
    strategy = strategy_for(config)
    assert isinstance(strategy, DPFedAvg) and strategy.weight(70) == 1 and strategy.max_weight() == 1
    assert strategy.inner.max_update_norm == 1.0    # the coordinator enforces the sites' clip S
    strategy.begin({"w": np.zeros(20000, np.float32)})
    for _ in range(4):
        strategy.add({"w": np.zeros(20000, np.float32)}, strategy.weight(1000))
    noisy = strategy.finish()["w"]
    assert noisy.std() == pytest.approx(2.0 * 1.0 / 4, rel=0.05)     # z S / n
    first, second = strategy.privacy_round(1), strategy.privacy_round(2)
    assert first.contributors == 4 and first.noise_std == pytest.approx(0.5)
    assert 0 < first.epsilon_prv < second.epsilon_prv
    assert second.epsilon_round_prv == pytest.approx(second.epsilon_prv - first.epsilon_prv)


def test_dpfedavg_distributed_adds_nothing_at_the_coordinator():
    inner = FedAvg(1.0, max_sites=10)
    strategy = DPFedAvg(inner, mechanism="distributed", noise_multiplier=1.0, clip_norm=1.0, delta=1e-5)
    strategy.begin({"w": np.zeros(5, np.float32)})
    strategy.add_aggregate({"w": np.full(5, 3.0)}, 3)
    np.testing.assert_allclose(strategy.finish()["w"], 1.0)
    assert strategy.privacy_round(1).noise_std == 0.0
    with pytest.raises(ValueError):
        DPFedAvg(inner, mechanism="dp_sgd", noise_multiplier=1.0, clip_norm=1.0, delta=1e-5)


# -- the lazy-state protocol -------------------------------------------------------------------------------

def test_state_files_and_fedavg_results_are_lazy_states_and_arrays_are_not(tmp_path):
    state = {"a": np.arange(6, dtype=np.float32).reshape(2, 3)}
    on_disk = write_state_file(tmp_path / "s.safetensors", state, {})
    strategy = FedAvg(1.0)
    strategy.begin(on_disk)
    strategy.add({"a": np.ones((2, 3), np.float32)}, 1)
    result = strategy.finish()
    assert isinstance(on_disk, LazyState) and isinstance(result, LazyState) and not isinstance(state, LazyState)
    assert state_layout(result) == state_layout(state) == {"a": ("float32", (2, 3))}


# -- an engine that fails stops where everyone sees it ---------------------------------------------------

def test_an_engine_error_stops_the_run_visibly_and_a_restart_resumes_it(tmp_path):
    import dataclasses
    import time

    from coordinator.coordinator import Coordinator
    from coordinator.store import Store
    from tests.test_rounds import _next_assignment, _upload

    class FullDisk(Store):
        """A store whose disk fills up when the first round is written."""

        def complete_round(self, *args, **kwargs):
            raise OSError(28, "No space left on device")

    config = load_toml(fast_config(rounds=2, min_sites=2, timeout=30, sites=["s1", "s2"]))
    config = dataclasses.replace(config, federation=dataclasses.replace(config.federation, gather_timeout_s=0.0))
    failed = []
    coord = Coordinator(FullDisk(tmp_path), on_failure=failed.append)
    coord.start_run(config)
    engine = coord.current()
    s1, s2 = engine.sessions.connect("s1"), engine.sessions.connect("s2")
    t1, t2 = _next_assignment(s1), _next_assignment(s2)
    _upload(engine, "s1", t1, 1.0, 10)
    _upload(engine, "s2", t2, 1.0, 10)
    deadline = time.monotonic() + 20
    while not failed and time.monotonic() < deadline:
        time.sleep(0.05)
    assert failed == [engine] and engine.status().state == "failed" and engine.rounds_completed == 0
    assert s1.queue.get(timeout=5) is None          # the sites' streams end, so they notice
    coord.stop("shutdown")
    coord.store.close()
    again = Coordinator(Store(tmp_path))
    try:
        assert again.resume() and again.current().state == "running" and again.current().rounds_completed == 0
    finally:
        again.stop("shutdown")
        again.store.close()


def test_a_run_larger_than_the_server_can_carry_is_refused_naming_the_flag(tmp_path):
    from coordinator.coordinator import Coordinator
    from coordinator.limits import RESERVE_CALLS, RESERVE_THREADS, ServerCapacity
    from coordinator.store import Store

    capacity = ServerCapacity(workers=160, calls=260)
    assert capacity.problem(100) is None
    assert "--max-workers 232" in capacity.problem(200)
    assert "--max-concurrent-rpcs" in ServerCapacity(workers=1000, calls=300).problem(200)
    assert ServerCapacity(200 + RESERVE_THREADS, 400 + RESERVE_CALLS).problem(200) is None
    coord = Coordinator(Store(tmp_path), capacity=capacity)
    sites = ", ".join(f'"s{i}"' for i in range(3))
    config = load_toml(f"[federation]\nsites = [{sites}]\nmax_sites = 200\n[data]\ndataset = \"digits\"\n")
    with pytest.raises(Refusal, match="federation.max_sites = 200.*--max-workers 232"):
        coord.start_run(config)
    assert coord.engine is None


# -- the store's schema version -------------------------------------------------------------------

def test_records_of_another_schema_version_are_refused_naming_both(tmp_path):
    import sqlite3
    Store(tmp_path).close()
    db = sqlite3.connect(tmp_path / "coordinator.sqlite3")
    assert db.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
    db.execute("PRAGMA user_version = 0")   # a store from before the renames carried no version
    db.commit()
    db.close()
    with pytest.raises(StoreVersionError, match=f"schema version 0, this coordinator reads version {SCHEMA_VERSION}"):
        Store(tmp_path)
