"""The soak of bench/soak.py at a reduced size: real processes, real mTLS, real SIGKILLs.

30 lightweight participants in 3 client processes x 8 rounds; two client processes and the
coordinator are SIGKILLed while the run goes on (seeded, so the same kills every time). The
assertions are the soak's own checks (bench.soak.verify and bench.soak.memory): no update lost
or counted twice, every committed state replays exactly from its recorded contributors, every
restart resumed the run, and the coordinator's memory did not grow. Well under a minute here.
"""
from __future__ import annotations

import pytest

from bench.common import PKI
from bench.soak import Plan, run_soak

pytestmark = pytest.mark.slow

PLAN = Plan(sites=30, processes=3, rounds=8, site_kills=2, coordinator_kills=1, seed=18,
            round_timeout_s=10.0, warmup=1, window=3, timeout_s=150.0)


@pytest.fixture(scope="module")
def soak(tmp_path_factory):
    pki = PKI(PLAN.sites)
    try:
        yield run_soak(PLAN, pki, workdir=tmp_path_factory.mktemp("soak"))
    finally:
        pki.close()


def test_the_run_finishes_through_the_kills(soak):
    assert soak["run_state"] == "finished" and soak["rounds_committed"] == PLAN.rounds
    assert soak["coordinator_kills"] == 1 and soak["site_kills"] == 2
    assert soak["checks"]["every coordinator restart resumed the run"], soak["resumes"]


def test_no_update_lost_or_counted_twice(soak):
    assert soak["lost"] == 0, soak["examples"]["lost"]
    assert soak["double_counted"] == 0
    assert soak["phantom"] == 0, soak["examples"]["phantom"]
    assert soak["wrong_num_samples"] == 0, soak["examples"]["wrong_num_samples"]
    # with sites killed, some rounds have fewer contributors, but every round has at least the minimum
    assert soak["updates_accepted"] >= PLAN.rounds * PLAN.min_sites


def test_every_committed_state_replays_exactly(soak):
    assert soak["replay_failed_rounds"] == []


def test_every_record_check_holds(soak):
    failed = [name for name, ok in soak["checks"].items() if not ok]
    assert not failed, failed


def test_coordinator_memory_is_flat(soak):
    m = soak["memory"]
    assert m["checked"] and m["flat"], m
