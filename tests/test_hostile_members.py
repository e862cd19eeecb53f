"""Hostile certificate holders against a real coordinator (in this process, mTLS on 127.0.0.1).

A valid certificate of the federation's CA that is not a site of the run, a member that is
revoked mid-run, a member that stalls its uploads, a member that sends integers and strings no
honest site sends: each is refused at admission, before anything is parsed further or recorded,
and the run goes on. Tests run in file order against one coordinator; the last one completes
round 1 with the two honest sites.
"""
from __future__ import annotations

import dataclasses
import logging
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from coordinator.server import CoordinatorServer, ServerSettings
from kt_core import codec
from kt_core.config import load_toml
from kt_core.wire import convert, transport
from kt_core.wire import federation_pb2 as pb
from kt_core.wire.federation_pb2_grpc import OperatorServiceStub, ParticipantServiceStub
from ktfed.launcher import free_port, make_pki
from security.pki import revoke
from tests.conftest import fast_config

MEMBERS = ["site-x", "site-a", "site-m"]
TIMEOUT_S = 1.5     # the coordinator's first-message and idle timeouts in this file


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    path = tmp_path_factory.mktemp("hostile") / "pki"
    make_pki(path, MEMBERS + ["site-b", "site-r"])
    return path


@pytest.fixture(scope="module")
def server(pki, tmp_path_factory):
    state = tmp_path_factory.mktemp("hostile-state")
    settings = ServerSettings(f"127.0.0.1:{free_port()}", state, transport.TLSFiles.from_pki(pki, "coordinator"),
                              crl=pki / "crl.pem", stream_first_message_timeout_s=TIMEOUT_S,
                              stream_idle_timeout_s=TIMEOUT_S)
    config = load_toml(fast_config(rounds=3, min_sites=2, timeout=600, sites=MEMBERS))
    # the first round starts once all three members hold their stream (every one is selected)
    config = dataclasses.replace(config, federation=dataclasses.replace(config.federation, gather_timeout_s=60.0))
    srv = CoordinatorServer(settings)
    srv.start(config)
    yield srv
    srv.stop(grace=1.0)


def _stub(server, pki, name):
    channel = transport.open_channel(server.settings.listen, transport.TLSFiles.from_pki(pki, name))
    return channel, ParticipantServiceStub(channel)


def _refusals(server) -> list[tuple[str, str, str, str]]:
    return server.store.db.execute("SELECT peer, method, code, reason FROM refusals ORDER BY at").fetchall()


def _refused(call, code, *phrases) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    assert info.value.code() == code, (info.value.code(), info.value.details())
    for phrase in phrases:
        assert phrase in info.value.details(), info.value.details()
    return info.value


class Member:
    """A member site driven by hand: it joined, holds its assignment stream, and has round 1's task."""

    def __init__(self, server, pki, name):
        self.name = name
        self.channel, self.stub = _stub(server, pki, name)
        self.join = self.stub.Join(pb.JoinRequest(header=convert.header(site_id=name)), timeout=10)
        self.run_id = self.join.header.run_id
        self.stream = self.stub.Assignments(pb.AssignmentStreamRequest(header=convert.header(self.run_id, site_id=name)))
        self.task = None

    def next_round(self) -> pb.RoundAssignment:
        self.task = next(t.round for t in self.stream if t.HasField("round"))
        return self.task

    def header(self, round_no=None):
        return convert.header(self.run_id, self.task.header.round if round_no is None else round_no, self.name)

    def download(self) -> dict:
        chunks = list(self.stub.DownloadState(pb.StateRequest(header=self.header(),
                                                              global_state_digest=self.task.global_state_digest),
                                              timeout=30))
        assembler = codec.TensorAssembler([convert.spec_from_pb(s) for s in chunks[0].header.tensors])
        for message in chunks[1:]:
            assembler.add(message.chunk.name, message.chunk.offset, message.chunk.data)
        return assembler.finish()

    def upload_messages(self, update, num_samples=10):
        head = pb.UploadHeader(header=self.header(), attempt_id=self.task.attempt_id,
                               base_state_digest=self.task.global_state_digest, num_samples=num_samples)
        head.tensors.extend(convert.spec_to_pb(codec.spec_of(n, a)) for n, a in sorted(update.items()))
        encoded = [(codec.spec_of(n, a), codec.to_bytes(a)) for n, a in sorted(update.items())]
        return [pb.UploadChunk(header=head)] + [pb.UploadChunk(chunk=c) for c in convert.tensor_chunks(encoded, 1 << 16)]


@pytest.fixture(scope="module")
def members(server, pki):
    out = {name: Member(server, pki, name) for name in MEMBERS}
    for m in out.values():
        m.next_round()
    yield out
    for m in out.values():
        m.stream.cancel()
        m.channel.close()


def _zero_update(member):
    return {n: np.zeros(a.shape, a.dtype) for n, a in member.download().items()}


# -- a valid certificate that is not one of the run's sites ------------------------------------------

def test_non_member_is_refused_on_every_call_and_never_told_the_run_id(server, pki, members):
    run_id = members["site-x"].run_id
    channel, stub = _stub(server, pki, "site-b")
    head = convert.header(run_id, 1, "site-b")
    task = members["site-x"].task
    calls = {
        "Join": lambda: stub.Join(pb.JoinRequest(header=convert.header(site_id="site-b")), timeout=10),
        "Assignments": lambda: next(stub.Assignments(pb.AssignmentStreamRequest(header=head), timeout=10)),
        "DownloadState": lambda: next(stub.DownloadState(
            pb.StateRequest(header=head, global_state_digest=task.global_state_digest), timeout=10)),
        "Upload": lambda: stub.Upload(iter([pb.UploadChunk(header=pb.UploadHeader(
            header=head, attempt_id=task.attempt_id, base_state_digest=task.global_state_digest, num_samples=1))]),
            timeout=10),
        "Decline": lambda: stub.Decline(pb.DeclineRequest(header=head, attempt_id=task.attempt_id, code="x"), timeout=10),
        "SubmitSecAgg": lambda: stub.SubmitSecAgg(iter([pb.SecAggSubmission(header=head, attempt_id=task.attempt_id,
                                                                            payload_bytes=1)]), timeout=10),
        "DownloadBackbone": lambda: next(stub.DownloadBackbone(pb.BackboneRequest(header=head), timeout=10)),
        "Leave": lambda: stub.Leave(pb.LeaveRequest(header=head, reason="bye"), timeout=10),
    }
    for method, call in calls.items():
        err = _refused(call, grpc.StatusCode.PERMISSION_DENIED, "site-b is not a site of run")
        assert run_id not in err.details(), (method, err.details())
    # nothing of site-b was kept: it was never selected, never counted
    assert "site-b" not in {p.site_id for p in server.coordinator.current().status().sites}
    recorded = [r for r in _refusals(server) if r[0] == "site-b"]
    assert {r[1].split(".")[-1] for r in recorded} == set(calls)
    channel.close()


def test_revoked_certificate_is_refused_before_its_bytes_are_parsed(server, pki, members):
    revoke(pki, "site-r")
    channel, _ = _stub(server, pki, "site-r")
    raw = channel.unary_unary("/ktfed.v1.ParticipantService/Join")
    # not protobuf at all: the certificate is checked first, so the answer is about the certificate
    _refused(lambda: raw(b"\xff\xff\xff\xff\x0f", timeout=10), grpc.StatusCode.UNAUTHENTICATED, "is revoked")
    channel.close()


# -- integers and strings no honest site sends --------------------------------------------------------

def test_round_above_2_53_is_refused_not_a_traceback(server, members):
    m = members["site-x"]
    for huge in (2 ** 53, 2 ** 60, 2 ** 64 - 1):
        request = pb.StateRequest(header=m.header(round_no=huge), global_state_digest=m.task.global_state_digest)
        _refused(lambda: list(m.stub.DownloadState(request, timeout=10)), grpc.StatusCode.INVALID_ARGUMENT,
                 "header.round")


def test_num_samples_of_2_63_is_refused_and_the_engine_lives(server, members):
    m = members["site-x"]
    update = _zero_update(m)
    for huge in (2 ** 63, 2 ** 64 - 1):
        _refused(lambda: m.stub.Upload(iter(m.upload_messages(update, num_samples=huge)), timeout=30),
                 grpc.StatusCode.INVALID_ARGUMENT, "num_samples")
    assert server.coordinator._thread.is_alive()


def test_a_huge_site_id_is_not_echoed_into_the_records(server, members):
    m = members["site-x"]
    before = _refusals(server)
    huge = "A" * (3 << 20)
    request = pb.StateRequest(header=convert.header(m.run_id, 1, huge), global_state_digest=m.task.global_state_digest)
    _refused(lambda: list(m.stub.DownloadState(request, timeout=30)), grpc.StatusCode.INVALID_ARGUMENT,
             "site_id")
    new = _refusals(server)[len(before):]
    assert len(new) == 1 and all(len(field) <= 1024 for field in new[0]), [len(f) for f in new[0]]
    status = server.coordinator.current().status()
    assert status.ByteSize() < 64 << 10


def test_refusals_of_one_peer_are_rate_limited_before_they_are_recorded(server, members):
    m = members["site-x"]
    raw = m.channel.unary_unary("/ktfed.v1.ParticipantService/Leave")
    before = len(_refusals(server))
    codes = []
    for _ in range(400):
        try:
            raw(b"\xff\xff\xff\xff\x0f", timeout=10)
        except grpc.RpcError as err:
            codes.append(err.code())
    assert set(codes) <= {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes            # the rate limit answered first
    assert len(_refusals(server)) - before < 150                    # and not every refusal cost a record
    time.sleep(2.5)                                                 # the allowance refills


def test_newlines_a_peer_chose_do_not_forge_log_lines(server, members, caplog):
    caplog.set_level(logging.INFO, logger="coordinator.service")
    m = members["site-x"]
    forged = "bye\n2026-01-01 00:00:00 INFO coordinator.rounds round 9 completed"
    m.stub.Leave(pb.LeaveRequest(header=m.header(), reason=forged), timeout=10)
    lines = [r.getMessage() for r in caplog.records if "left:" in r.getMessage()]
    assert lines and all("\n" not in line and "\\x0a" in line for line in lines), lines


# -- members that stall ---------------------------------------------------------------------------------

def test_an_upload_that_never_sends_its_first_message_is_ended(server, members):
    m = members["site-x"]
    hold = threading.Event()

    def nothing():
        hold.wait(30)
        return
        yield  # noqa: unreachable - a generator that sends nothing until released

    started = time.monotonic()
    _refused(lambda: m.stub.Upload(nothing(), timeout=30), grpc.StatusCode.DEADLINE_EXCEEDED, "first message")
    assert time.monotonic() - started < TIMEOUT_S + 5
    hold.set()


def test_an_upload_that_stalls_after_its_header_is_ended(server, members):
    m = members["site-x"]
    update = _zero_update(m)
    first = m.upload_messages(update)[0]
    hold = threading.Event()

    def header_then_nothing():
        yield first
        hold.wait(30)

    started = time.monotonic()
    _refused(lambda: m.stub.Upload(header_then_nothing(), timeout=30), grpc.StatusCode.DEADLINE_EXCEEDED, "idle")
    assert time.monotonic() - started < TIMEOUT_S + 5
    hold.set()


def test_health_and_status_answer_while_a_member_holds_all_it_may_hold(server, pki, members):
    m = members["site-a"]
    hold = threading.Event()

    def nothing():
        hold.wait(30)
        return
        yield  # noqa: unreachable

    futures = [m.stub.Upload.future(nothing(), timeout=30) for _ in range(20)]
    channel = transport.open_channel(server.settings.listen, transport.TLSFiles.from_pki(pki, "operator"))
    started = time.monotonic()
    reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    status = OperatorServiceStub(channel).GetRunStatus(pb.RunStatusRequest(header=convert.header()), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING and status.state == "running"
    assert time.monotonic() - started < 2
    codes = []
    for f in futures:
        try:
            f.result()
        except grpc.RpcError as err:
            codes.append(err.code())
    hold.set()
    # at most max_rpcs_per_site of them were let in (its assignment stream holds one)
    assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) >= 20 - 7
    channel.close()
    time.sleep(2.5)


# -- a flood of idle calls from several certificates ----------------------------------------------------

# few threads, as few as a run of the suite's sites may have (coordinator.limits.ServerCapacity:
# a stream per site and 32 more)
FLOOD_WORKERS = 40


@pytest.fixture(scope="module")
def small_server(pki, tmp_path_factory):
    """A second coordinator with few worker threads and a long first-message timeout: what keeps
    its threads free below is the per-certificate allowance, not the watchdog."""
    from security.pki import issue

    issue(pki, "operator-2", "operator")
    settings = ServerSettings(f"127.0.0.1:{free_port()}", tmp_path_factory.mktemp("flood-state"),
                              transport.TLSFiles.from_pki(pki, "coordinator"), crl=pki / "crl.pem",
                              max_workers=FLOOD_WORKERS, max_concurrent_rpcs=2 * FLOOD_WORKERS,
                              stream_first_message_timeout_s=120.0)
    text = fast_config(rounds=3, min_sites=2, timeout=600, sites=MEMBERS).replace(
        "[federation]\n", "[federation]\nmax_sites = 3\nmax_rpcs_per_site = 3\n"
                           "rpc_rate_per_site = 0.0\n")
    srv = CoordinatorServer(settings)
    srv.start(load_toml(text))
    yield srv
    srv.stop(grace=1.0)


def test_server_settings_bound_the_calls_in_progress():
    base = ServerSettings("127.0.0.1:0", Path("."), None, insecure=True)
    assert base.concurrent_rpcs == base.max_workers + 100       # one waiting call per site of a full run
    for bad in (dict(max_workers=2), dict(max_concurrent_rpcs=10), dict(stream_idle_timeout_s=float("inf"))):
        with pytest.raises(ValueError):
            dataclasses.replace(base, **bad).validate()


def test_a_flood_of_idle_calls_does_not_make_health_or_status_time_out(small_server, pki):
    hold = threading.Event()

    def nothing():
        hold.wait(60)
        return
        yield  # noqa: unreachable - a request stream that sends nothing until released

    channels, calls = [], []
    paths = {"site-a": ["/ktfed.v1.ParticipantService/Join", "/ktfed.v1.ParticipantService/Upload"],
             "site-b": ["/ktfed.v1.ParticipantService/Join", "/grpc.health.v1.Health/Check"],
             "operator-2": ["/ktfed.v1.OperatorService/GetRunStatus", "/grpc.health.v1.Health/Check"]}
    for name, methods in paths.items():    # a member, a certificate of no site, a second operator
        channel = transport.open_channel(small_server.settings.listen, transport.TLSFiles.from_pki(pki, name))
        channels.append(channel)
        for method in methods:
            rpc = channel.stream_unary(method)
            calls += [rpc.future(nothing(), timeout=60) for _ in range(2 * FLOOD_WORKERS)]
    time.sleep(2.0)        # the flood is in: what could be refused has been
    channel = transport.open_channel(small_server.settings.listen, transport.TLSFiles.from_pki(pki, "operator"))
    try:
        started = time.monotonic()
        for _ in range(3):
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            status = OperatorServiceStub(channel).GetRunStatus(pb.RunStatusRequest(header=convert.header()), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING and status.state == "running"
        assert time.monotonic() - started < 5
        held = [c for c in calls if not c.done()]
        # each certificate holds at most max_rpcs_per_site calls open; a non-member none
        assert len(held) <= 3 * 3, len(held)
        codes = {c.exception().code() for c in calls if c.done()}
        assert codes <= {grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.PERMISSION_DENIED}, codes
        reasons = [r for (r,) in small_server.store.db.execute("SELECT reason FROM refusals")]
        assert any(r.startswith("federation.max_rpcs_per_site: operator-2 already has 3 calls open, the "
                                "most one certificate may hold at once") for r in reasons)
        assert any("site-b is not a site of run" in r for r in reasons)
    finally:
        hold.set()
        for c in [channel, *channels]:
            c.close()


# -- a member revoked mid-run -----------------------------------------------------------------------------

def test_a_revoked_member_loses_its_stream_and_the_round_goes_on_without_it(server, pki, members):
    m = members["site-m"]
    revoke(pki, "site-m")
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as info:
        for task in m.stream:
            assert not task.HasField("round"), "a revoked site was pushed a task"
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED and "revoked" in info.value.details()
    assert time.monotonic() - started < 10
    engine = server.coordinator.current()
    deadline = time.monotonic() + 5   # the stream's end reaches the engine when gRPC finalizes the call
    while "site-m" in engine.sessions and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "site-m" not in engine.sessions
    assert "site-m" in engine.attempt.dropped


def test_the_round_completes_with_a_hostile_update_bounded_to_the_runs_limits(server, members):
    # site-x claims 2^53 - 1 samples (the most the wire admits) and sends 1e30 in every element
    # (finite: it passes the wire's checks); site-a sends a zero update for its 10 samples. The mean may move no further than
    # secagg.clip_norm times site-x's share of the capped weight (README "One site's pull on the mean").
    config = server.coordinator.current().config
    cap, clip = config.secagg.max_samples_per_site, config.secagg.clip_norm
    before = members["site-a"].download()
    hostile = {n: np.full(a.shape, 1e30, a.dtype) for n, a in before.items()}
    sent = {"site-x": (hostile, 2 ** 53 - 1), "site-a": (_zero_update(members["site-a"]), 10)}
    for name, (update, samples) in sent.items():
        m = members[name]
        receipt = m.stub.Upload(iter(m.upload_messages(update, num_samples=samples)), timeout=30)
        assert receipt.bytes_received > 0
    deadline = time.monotonic() + 30
    while server.coordinator.current().rounds_completed < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    engine = server.coordinator.current()
    assert engine.rounds_completed == 1
    uploads = server.store.uploads(engine.run_id)
    assert sorted(u["site_id"] for u in uploads) == ["site-a", "site-x"]
    after = {n: np.asarray(a, np.float64) for n, a in engine.global_state.items()}
    moved = np.sqrt(sum(float(((after[n] - before[n].astype(np.float64)) ** 2).sum()) for n in before))
    share = cap / (cap + 10)
    assert 0.99 * clip * share < moved <= clip * share * (1 + 1e-4), moved
    metrics = server.store.rounds(engine.run_id)[0].metrics
    assert metrics["site-x/aggregation.weight"] == cap and metrics["site-a/aggregation.weight"] == 10
    assert metrics["site-x/aggregation.clip_factor"] < 1e-20 and metrics["site-a/aggregation.clip_factor"] == 1.0
