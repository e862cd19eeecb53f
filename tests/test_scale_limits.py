"""Limits and back-pressure over real mTLS gRPC against a real coordinator process.

The run allows two participants, three calls open per participant and two uploads at once
(an upload waits 1 s for a slot). Hand-driven sites hit each limit; every refusal names the
[federation] setting, is logged and recorded, and none touches the aggregate: the last test
completes round 1 and checks it is exactly the two valid updates. Tests run in file order.
"""
from __future__ import annotations

import threading
import time

import grpc
import numpy as np
import pytest

from kt_core import codec
from kt_core.wire import convert
from kt_core.wire import federation_pb2 as pb
from kt_core.wire.federation_pb2_grpc import ParticipantServiceStub
from tests.conftest import WIDE_BOUND, LocalFederation, fast_config
from tests.test_bad_input import CHUNK, _connect, join_sites, leave_sites

LIMITS = """gather_timeout_s = 0
max_sites = 2
max_rpcs_per_site = 3
max_concurrent_uploads = 2
upload_queue_timeout_s = 1.0
"""


@pytest.fixture(scope="module")
def fed(tmp_path_factory, pki_dir):
    fed = LocalFederation(tmp_path_factory.mktemp("limits"), pki_dir)
    # constant deltas below: WIDE_BOUND leaves them whole
    text = fast_config(rounds=20, min_sites=2, timeout=600, sites=["site-a", "site-b", "site-c"],
                       max_chunk_bytes=CHUNK, extra=WIDE_BOUND
                       ).replace("[federation]\n", "[federation]\n" + LIMITS)
    fed.start_coordinator(fed.write_config(text))
    fed.wait_serving()
    yield fed
    fed.close()


@pytest.fixture(scope="module")
def sites(fed):
    out = join_sites(fed, ("site-a", "site-b"))
    yield out
    leave_sites(out)


def _delta(site, value):
    return {n: np.full(a.shape, value, dtype=a.dtype) for n, a in site.state.items()}


def _refusals(fed, phrase: str) -> int:
    return fed.db().execute("SELECT COUNT(*) FROM refusals WHERE reason LIKE ?", (f"%{phrase}%",)).fetchone()[0]


def _in_round_one(fed) -> None:
    status = fed.status()
    assert status.rounds_completed == 0 and status.round_in_progress == 1


def test_more_participants_than_the_run_allows(fed, sites):
    channel = _connect(fed, "site-c")
    stub = ParticipantServiceStub(channel)
    join = stub.Join(pb.JoinRequest(header=convert.header(site_id="site-c")), timeout=30)
    stream = stub.Assignments(pb.AssignmentStreamRequest(header=convert.header(join.header.run_id, site_id="site-c")))
    with pytest.raises(grpc.RpcError) as info:
        next(stream)
    channel.close()
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert info.value.details().startswith("federation.max_sites: run ")
    assert "already has 2 sites connected, the most it allows; site-c is refused" in info.value.details()
    assert _refusals(fed, "federation.max_sites") == 1
    assert info.value.details() in fed.log()
    _in_round_one(fed)


def test_upload_exceeding_its_declared_size(fed, sites):
    site = sites["site-a"]
    tensors = _delta(site, 0.0)
    head = site.upload_header(tensors)
    encoded = [(codec.spec_of(n, a), codec.to_bytes(a)) for n, a in sorted(tensors.items())]
    name, raw = encoded[0][0].name, encoded[0][1]
    messages = [pb.UploadChunk(header=head)] + [pb.UploadChunk(chunk=c) for c in convert.tensor_chunks(encoded, CHUNK)]
    messages.append(pb.UploadChunk(chunk=pb.TensorChunk(name=name, offset=len(raw), data=b"\0" * 16)))
    with pytest.raises(grpc.RpcError) as info:
        site.stub.Upload(iter(messages), timeout=30)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert f"upload exceeds its declared size: tensor {name!r} receives more than its declared" \
        in info.value.details()
    assert _refusals(fed, "exceeds its declared size") == 1
    assert list((fed.workdir / "coordinator" / "spool").iterdir()) == []   # its spool file is gone
    _in_round_one(fed)


def test_many_streams_at_once_and_too_many_concurrent_uploads(fed, sites):
    a, b = sites["site-a"], sites["site-b"]
    gate = threading.Event()

    def stalled(head):
        yield pb.UploadChunk(header=head)
        gate.wait(60)        # the upload stays open, holding its call and its upload slot

    # site-a holds its assignment stream and opens six uploads at once: two more calls fit its limit of three
    head = a.upload_header(_delta(a, 0.0))
    calls = [a.stub.Upload.future(stalled(head), timeout=60) for _ in range(6)]
    deadline = time.monotonic() + 30
    while sum(c.done() for c in calls) < 4 and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    refused = [c for c in calls if c.done()]
    assert len(refused) == 4, [c.exception() for c in refused]
    for call in refused:
        err = call.exception()
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert err.details() == ("federation.max_rpcs_per_site: site-a already has 3 calls open, "
                                 "the most one participant may hold at once")
    assert _refusals(fed, "federation.max_rpcs_per_site: site-a") == 4

    # the two open uploads hold both upload slots: site-b's waits a second for one, then is refused
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as info:
        b.upload(b.upload_header(_delta(b, 4.0), num_samples=3), _delta(b, 4.0))
    assert time.monotonic() - started >= 0.9
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert info.value.details().startswith("federation.max_concurrent_uploads: 2 uploads are being received")
    assert info.value.details() in fed.log()

    gate.set()               # the stalled uploads end without their data: refused as incomplete
    for call in calls:
        if call not in refused:
            assert call.exception().code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "got 0 of" in call.exception().details()
    _in_round_one(fed)


def test_refused_uploads_never_touched_the_aggregate(fed, sites):
    a, b = sites["site-a"], sites["site-b"]
    b.upload(b.upload_header(_delta(b, 4.0), num_samples=3), _delta(b, 4.0))
    a.upload(a.upload_header(_delta(a, 1.0), num_samples=1), _delta(a, 1.0))
    status = fed.wait_rounds(1, timeout=60)
    assert list(status.rounds[0].contributors) == ["site-a", "site-b"]
    new_state = a.download(next(t.round for t in a.stream if t.HasField("round")))
    for name, old in a.state.items():
        np.testing.assert_allclose(new_state[name], old + np.float32(3.25), rtol=0, atol=1e-6)
    assert fed.db().execute("SELECT COUNT(*) FROM uploads").fetchone()[0] == 2
    assert list((fed.workdir / "coordinator" / "spool").iterdir()) == []
