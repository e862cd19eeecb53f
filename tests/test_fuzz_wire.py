"""The fast subset of the fuzz campaign (bench/fuzz.py): a few dozen hostile messages and raw byte
strings per RPC against a real mTLS coordinator process. Every one must be refused with a
precise status (never UNKNOWN or INTERNAL), answered in time, recorded in the coordinator's
refusals table, and the coordinator must survive. `python -m bench fuzz` sends 10,000 per RPC."""
from __future__ import annotations

import pytest

from bench.fuzz import RPCS, SITES, Target, format_table, fuzz_rpc, oversize, row_of

PER_RPC = 12


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    from ktfed.launcher import make_pki

    root = tmp_path_factory.mktemp("fuzz")
    make_pki(root / "pki", SITES)
    target = Target(root / "fed", root / "pki")
    yield target
    target.close()


@pytest.mark.parametrize("raw", [False, True], ids=["messages", "raw-bytes"])
@pytest.mark.parametrize("rpc", RPCS, ids=[r[1] for r in RPCS])
def test_hostile_calls_are_refused_precisely_and_recorded(target, rpc, raw):
    tally = fuzz_rpc(target, rpc, PER_RPC, raw)
    summary = format_table([row_of(rpc[1], tally, 0)]) + f"\n{dict(tally.codes)}\n" + "\n".join(tally.samples)
    assert tally.sent >= PER_RPC and target.alive(), summary
    assert (tally.crashes, tally.hangs, tally.unknown, tally.unlogged) == (0, 0, 0, 0), summary


PARTICIPANT_RPCS = [r for r in RPCS if r[0] == "ParticipantService"]


@pytest.mark.parametrize("rpc", PARTICIPANT_RPCS, ids=[r[1] for r in PARTICIPANT_RPCS])
def test_a_message_over_the_size_limit_is_a_recorded_refusal(target, rpc):
    """gRPC refuses it inside its core; the coordinator reads every request as a stream, so it sees
    the call end before the message arrived, and logs and records that under the caller's name."""
    tally = oversize(target, rpc)
    assert tally.codes["RESOURCE_EXHAUSTED"] == 1, dict(tally.codes)
    assert tally.unlogged == 0, "refused, but neither logged nor recorded"
    assert f"refused ParticipantService.{rpc[1]} from site-a: CANCELLED the call ended inside gRPC before its " \
           "request reached the coordinator: a message over" in target.fed.log()
