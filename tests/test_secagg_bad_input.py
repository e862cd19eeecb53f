"""Bad secure-aggregation input over real mTLS gRPC against a real coordinator process.

Two hand-driven participants (site-x and site-a) run round 1 under secure aggregation with the
library's own client; every bad submission on the way is refused with a precise status, logged
and recorded, and the round still completes with exactly the sum of the two valid inputs. Tests
run in file order (each step of the protocol opens only after the previous one closed).
"""
from __future__ import annotations

import grpc
import numpy as np
import pytest

from coordinator.coordinator import initial_state, shared_specs
from kt_core import vector
from kt_core.config import load_toml
from kt_core.wire import convert
from kt_core.wire import federation_pb2 as pb
from kt_core.wire.federation_pb2_grpc import ParticipantServiceStub
from security import secagg
from tests.conftest import LocalFederation, fast_config
from tests.test_bad_input import CHUNK, Site, _connect, _refused, join_sites, leave_sites
from tests.test_secagg_federation import secagg_section

CONFIG = fast_config(rounds=50, min_sites=2, timeout=600, sites=["site-x", "site-a"],
                     max_chunk_bytes=CHUNK) + secagg_section(step_timeout_s=600)
SETTINGS = secagg.SecAggProtocolSettings.from_section(load_toml(CONFIG).secagg)


@pytest.fixture(scope="module")
def fed(tmp_path_factory, pki_dir):
    fed = LocalFederation(tmp_path_factory.mktemp("secagg-bad-input"), pki_dir)
    fed.start_coordinator(fed.write_config(CONFIG))
    fed.wait_serving()
    yield fed
    fed.close()


@pytest.fixture(scope="module")
def sites(fed):
    out = join_sites(fed, ("site-x", "site-a"))
    for site in out.values():
        site.client = secagg.SecAggClient(site.name, site.join.header.run_id, site.task.header.round,
                                          list(site.task.roster), SETTINGS,
                                          bytes.fromhex(site.task.global_state_digest))
    yield out
    leave_sites(out)


def submit(site, step: str, payload: bytes, *, declared: int | None = None, round_no=None, metrics=None):
    parts = list(convert.secagg_submission(site.header(round_no=round_no), site.task.attempt_id, step, payload,
                                           CHUNK, metrics))
    if declared is not None:
        parts[0].payload_bytes = declared
    return site.stub.SubmitSecAgg(iter(parts), timeout=30)


def next_step(site) -> pb.SecAggMessage:
    return next(t.secagg for t in site.stream if t.HasField("secagg"))


def test_the_task_names_the_roster_and_secure_aggregation(sites):
    for site in sites.values():
        assert site.task.secagg
        assert sorted(site.task.roster) == ["site-a", "site-x"]


def test_a_plain_upload_is_refused_under_secure_aggregation(fed, sites):
    site = sites["site-x"]
    delta = {n: np.zeros_like(a) for n, a in site.state.items()}
    _refused(fed, lambda: site.upload(site.upload_header(delta), delta), grpc.StatusCode.FAILED_PRECONDITION,
             "runs under secure aggregation")


def test_a_step_that_is_not_open_is_refused(fed, sites):
    site = sites["site-x"]
    _refused(fed, lambda: submit(site, "share_keys", b"KSA1-not-yet"), grpc.StatusCode.FAILED_PRECONDITION,
             "share_keys is not open", "at step advertise")


def test_a_message_claiming_another_sender_is_refused(fed, sites):
    site, other = sites["site-x"], sites["site-a"]
    forged = secagg.SecAggClient("site-a", site.join.header.run_id, 1, list(site.task.roster), SETTINGS,
                                 bytes.fromhex(site.task.global_state_digest)).advertise().to_bytes()
    _refused(fed, lambda: submit(site, "advertise", forged), grpc.StatusCode.INVALID_ARGUMENT,
             "claims sender 'site-a'", "the caller is site-x")
    assert other  # site-a's own advertisement is still to come


def test_a_key_advertisement_from_a_participant_not_in_the_round_is_refused(fed, sites):
    outsider = Site("site-b", _connect(fed, "site-b"), None)
    outsider.stub = ParticipantServiceStub(outsider.channel)
    outsider.join, outsider.task = sites["site-x"].join, sites["site-x"].task
    roster = ["site-a", "site-b", "site-x"]
    ad = secagg.SecAggClient("site-b", outsider.join.header.run_id, 1, roster, SETTINGS,
                             bytes.fromhex(outsider.task.global_state_digest)).advertise().to_bytes()
    try:
        # refused at admission: a certificate that is not one of the run's sites never reaches the round
        _refused(fed, lambda: submit(outsider, "advertise", ad), grpc.StatusCode.PERMISSION_DENIED,
                 "site-b is not a site of run")
    finally:
        outsider.channel.close()


def test_a_message_replayed_from_another_round_is_refused(fed, sites):
    site = sites["site-x"]
    old = secagg.SecAggClient("site-x", site.join.header.run_id, 0, list(site.task.roster), SETTINGS,
                              bytes.fromhex(site.task.global_state_digest)).advertise().to_bytes()
    _refused(fed, lambda: submit(site, "advertise", old), grpc.StatusCode.INVALID_ARGUMENT,
             "round 0", "replayed or misrouted")


def test_a_payload_larger_than_the_step_allows_is_refused_before_it_is_read(fed, sites):
    site = sites["site-x"]
    _refused(fed, lambda: submit(site, "advertise", b"x", declared=1 << 30), grpc.StatusCode.RESOURCE_EXHAUSTED,
             "declared payload of 1073741824 bytes")


def test_a_payload_longer_than_declared_is_refused(fed, sites):
    site = sites["site-x"]
    payload = site.client.advertise().to_bytes()   # not accepted: the stream lies about its size
    _refused(fed, lambda: submit(site, "advertise", payload, declared=len(payload) - 10),
             grpc.StatusCode.RESOURCE_EXHAUSTED, "exceeds its declared")
    site.client = secagg.SecAggClient(site.name, site.join.header.run_id, 1, list(site.task.roster), SETTINGS,
                                      bytes.fromhex(site.task.global_state_digest))


def test_a_duplicate_submission_is_refused(fed, sites):
    site = sites["site-x"]
    ad = site.client.advertise().to_bytes()
    assert submit(site, "advertise", ad).bytes_received == len(ad)
    _refused(fed, lambda: submit(site, "advertise", ad), grpc.StatusCode.ALREADY_EXISTS,
             "already sent its advertise", "replay")


def test_keys_are_shared_once_both_advertised(sites):
    sites["site-a"].ad = submit(sites["site-a"], "advertise", sites["site-a"].client.advertise().to_bytes())
    for site in sites.values():
        message = next_step(site)
        assert convert.SECAGG_STEP_FROM_PB[message.step] == "share_keys"
        submit(site, "share_keys", site.client.share_keys(message.payload).to_bytes())
    for site in sites.values():
        site.delivery = next_step(site)
        assert convert.SECAGG_STEP_FROM_PB[site.delivery.step] == "masked_input"


def test_a_masked_vector_of_the_wrong_length_is_refused(fed, sites):
    site = sites["site-x"]
    short = secagg.MaskedInput(site.join.header.run_id, 1, "site-x", np.zeros(5, dtype=np.uint32)).to_bytes()
    _refused(fed, lambda: submit(site, "masked_input", short), grpc.StatusCode.INVALID_ARGUMENT,
             "has 5 entries, expected")


def test_the_round_completes_with_exactly_the_sum_of_the_valid_inputs(fed, sites):
    config = load_toml(CONFIG).resolved()
    specs = shared_specs(initial_state(config)[0])
    scale = config.max_weight()
    encoded = {}
    for value, (name, site) in zip((0.001, -0.003), sorted(sites.items())):
        update = vector.flatten({n: np.full(a.shape, value, dtype=np.float32) for n, a in site.state.items()}, specs)
        weight = 7 if name == "site-a" else 3
        encoded[name] = secagg.encode_input(update * weight / scale, weight, SETTINGS.clip_norm, SETTINGS.bits, 2,
                                            np.random.default_rng(0))
        payload = site.client.masked_input(site.delivery.payload, encoded[name]).to_bytes()
        submit(site, "masked_input", payload, metrics={"accuracy": 0.5})
    for step in ("consistency", "unmask"):
        for site in sites.values():
            message = next_step(site)
            assert convert.SECAGG_STEP_FROM_PB[message.step] == step
            reply = site.client.acknowledge(message.payload) if step == "consistency" \
                else site.client.unmask(message.payload)
            submit(site, step, reply.to_bytes())
    status = fed.wait_rounds(1, timeout=60)
    assert status.rounds[0].secagg
    assert sorted(status.rounds[0].contributors) == ["site-a", "site-x"]
    total = (encoded["site-a"].astype(np.uint64) + encoded["site-x"]).astype(np.uint32)
    weighted, weight = secagg.decode_sum(total, SETTINGS.bits)
    assert weight == 10
    step = vector.unflatten(weighted * scale / weight, specs)
    new = fed.wait_for(lambda: _new_state(fed, sites["site-x"]), 30, "round 2's task")
    for n, a in sites["site-x"].state.items():
        np.testing.assert_allclose(new[n], (a + step[n]).astype(a.dtype), atol=1e-7)


def _new_state(fed, site):
    site.task = next(t.round for t in site.stream if t.HasField("round"))
    return site.download(site.task)


def test_an_input_that_was_not_clipped_aborts_the_attempt_naming_why(fed, sites):
    # round 2: site-x encodes its update clipped to 40 x secagg.clip_norm instead of clip_norm (the
    # encoding itself is well-formed, so nothing before the unmasking can tell); the unmasked sum
    # is then longer than two inputs by the rule can reach, and the attempt aborts, recorded
    site_a = sites["site-a"]
    site_a.task = next(t.round for t in site_a.stream if t.HasField("round"))
    assert site_a.task.header.round == sites["site-x"].task.header.round == 2
    for site in sites.values():
        site.client = secagg.SecAggClient(site.name, site.join.header.run_id, 2, list(site.task.roster), SETTINGS,
                                          bytes.fromhex(site.task.global_state_digest))
        submit(site, "advertise", site.client.advertise().to_bytes())
    for site in sites.values():
        submit(site, "share_keys", site.client.share_keys(next_step(site).payload).to_bytes())
    length = vector.vector_length(shared_specs(initial_state(load_toml(CONFIG).resolved())[0]))
    for name, site in sorted(sites.items()):
        delivery = next_step(site).payload
        big = 40 * SETTINGS.clip_norm if name == "site-x" else SETTINGS.clip_norm
        update = np.full(length, big / np.sqrt(length))
        encoded = secagg.encode_input(update, 1, big, SETTINGS.bits, 2, np.random.default_rng(1))
        submit(site, "masked_input", site.client.masked_input(delivery, encoded).to_bytes())
    for step in ("consistency", "unmask"):
        for site in sites.values():
            message = next_step(site)
            reply = site.client.acknowledge(message.payload) if step == "consistency" \
                else site.client.unmask(message.payload)
            submit(site, step, reply.to_bytes())
    row = fed.wait_for(lambda: fed.db().execute("SELECT round, reason FROM aborted_attempts").fetchone(), 60,
                       "the aborted attempt")
    assert row[0] == 2 and "an input was not clipped" in row[1], row
    assert fed.status().rounds_completed == 1
