"""Bad input over real mTLS gRPC against a real coordinator process.

Two hand-driven participants (site-x and site-a) join a run and get round 1's task; every bad
message is then refused with a precise status, logged and recorded, while the round stays open.
The last test completes round 1 with known updates and checks the aggregate is exactly what the
two valid updates give, so none of the refused ones touched it. Tests run in file order.
"""
from __future__ import annotations

import hashlib
import subprocess
import sys
from dataclasses import dataclass, field

import grpc
import numpy as np
import pytest

from kt_core import codec
from kt_core.wire import convert, transport
from kt_core.wire import federation_pb2 as pb
from kt_core.wire.federation_pb2_grpc import OperatorServiceStub, ParticipantServiceStub
from ktfed.launcher import make_pki
from tests.conftest import WIDE_BOUND, LocalFederation, fast_config

CHUNK = 1024


@dataclass
class Site:
    """A participant driven by hand: the test decides every byte it sends."""

    name: str
    channel: grpc.Channel
    stub: ParticipantServiceStub
    join: pb.JoinReply | None = None
    task: pb.RoundAssignment | None = None
    stream: object = None
    state: dict = field(default_factory=dict)

    def header(self, round_no=None, run_id=None, site_id=None):
        return convert.header(self.join.header.run_id if run_id is None else run_id,
                              self.task.header.round if round_no is None else round_no,
                              self.name if site_id is None else site_id)

    def upload_header(self, tensors, **overrides) -> pb.UploadHeader:
        fields = dict(header=self.header(), attempt_id=self.task.attempt_id,
                      base_state_digest=self.task.global_state_digest, num_samples=1)
        fields.update(overrides)
        head = pb.UploadHeader(**fields)
        head.tensors.extend(convert.spec_to_pb(codec.spec_of(n, a)) for n, a in sorted(tensors.items()))
        return head

    def download(self, task: pb.RoundAssignment) -> dict:
        chunks = list(self.stub.DownloadState(pb.StateRequest(header=self.header(round_no=task.header.round),
                                                              global_state_digest=task.global_state_digest)))
        assembler = codec.TensorAssembler([convert.spec_from_pb(s) for s in chunks[0].header.tensors])
        for message in chunks[1:]:
            assembler.add(message.chunk.name, message.chunk.offset, message.chunk.data)
        return assembler.finish()

    def upload(self, head: pb.UploadHeader, tensors, chunk=CHUNK):
        encoded = [(codec.spec_of(n, a), codec.to_bytes(a)) for n, a in sorted(tensors.items())]
        messages = [pb.UploadChunk(header=head)] + [pb.UploadChunk(chunk=c)
                                                     for c in convert.tensor_chunks(encoded, chunk)]
        return self.stub.Upload(iter(messages), timeout=30)


def _connect(fed, cert_name, pki=None) -> grpc.Channel:
    return transport.open_channel(fed.address, transport.TLSFiles.from_pki(pki or fed.pki, cert_name))


@pytest.fixture(scope="module")
def fed(tmp_path_factory, pki_dir):
    fed = LocalFederation(tmp_path_factory.mktemp("bad-input"), pki_dir)
    # constant deltas below: WIDE_BOUND leaves them whole
    config = fed.write_config(fast_config(rounds=50, min_sites=2, timeout=600, sites=["site-x", "site-a"],
                                          max_chunk_bytes=CHUNK, extra=WIDE_BOUND))
    fed.start_coordinator(config)
    fed.wait_serving()
    yield fed
    fed.close()


def join_sites(fed, names) -> dict[str, Site]:
    """Hand-driven sites that joined, hold their assignment stream and got round 1's task and state."""
    out = {}
    for name in names:
        channel = _connect(fed, name)
        site = Site(name, channel, ParticipantServiceStub(channel))
        site.join = site.stub.Join(pb.JoinRequest(header=convert.header(site_id=name)), timeout=30)
        site.stream = site.stub.Assignments(pb.AssignmentStreamRequest(header=convert.header(site.join.header.run_id,
                                                                                 site_id=name)))
        out[name] = site
    for site in out.values():
        site.task = next(t.round for t in site.stream if t.HasField("round"))
        site.state = site.download(site.task)
    return out


def leave_sites(sites: dict[str, Site]) -> None:
    for site in sites.values():
        site.stream.cancel()
        site.channel.close()


@pytest.fixture(scope="module")
def sites(fed):
    out = join_sites(fed, ("site-x", "site-a"))
    yield out
    leave_sites(out)


def _delta(site, value):
    return {n: np.full(a.shape, value, dtype=a.dtype) for n, a in site.state.items()}


def _refused(fed, call, code, *phrases):
    refusals_before = _refusal_count(fed)
    with pytest.raises(grpc.RpcError) as info:
        call()
    assert info.value.code() == code, info.value.details()
    for phrase in phrases:
        assert phrase in info.value.details(), info.value.details()
    # Logged and recorded by the coordinator, and the round is still waiting: nothing was aggregated.
    assert _refusal_count(fed) == refusals_before + 1
    assert info.value.details() in fed.log()
    status = fed.status()
    assert status.rounds_completed == 0 and status.round_in_progress == 1
    return info.value


def _refusal_count(fed) -> int:
    return fed.db().execute("SELECT COUNT(*) FROM refusals").fetchone()[0]


def test_bytes_that_are_not_protobuf(fed, sites):
    raw = sites["site-x"].channel.unary_unary("/ktfed.v1.ParticipantService/Join")
    _refused(fed, lambda: raw(b"\xff\xff\xff\xff\x0f", timeout=10), grpc.StatusCode.INVALID_ARGUMENT,
             "not a valid ktfed.v1.JoinRequest")


def test_unknown_run_id(fed, sites):
    site = sites["site-x"]
    head = site.upload_header(_delta(site, 0.0), header=site.header(run_id="run-doesnotexist"))
    _refused(fed, lambda: site.upload(head, _delta(site, 0.0)), grpc.StatusCode.NOT_FOUND, "unknown run id")


def test_unsupported_protocol_version(fed, sites):
    site = sites["site-x"]
    header = site.header()
    header.protocol_version = 99
    _refused(fed, lambda: site.stub.Join(pb.JoinRequest(header=header), timeout=10),
             grpc.StatusCode.FAILED_PRECONDITION, "protocol version 99")


def test_stale_round(fed, sites):
    site = sites["site-x"]
    head = site.upload_header(_delta(site, 0.0), header=site.header(round_no=0))
    _refused(fed, lambda: site.upload(head, _delta(site, 0.0)), grpc.StatusCode.FAILED_PRECONDITION,
             "stale round 0")


def test_attempt_id_of_another_attempt(fed, sites):
    site = sites["site-x"]
    head = site.upload_header(_delta(site, 0.0), attempt_id=b"\x00" * 16)
    _refused(fed, lambda: site.upload(head, _delta(site, 0.0)), grpc.StatusCode.FAILED_PRECONDITION,
             "replayed or superseded")


def test_wrong_shape(fed, sites):
    site = sites["site-x"]
    tensors = _delta(site, 0.0)
    name = sorted(tensors)[0]
    tensors[name] = np.zeros(tensors[name].size + 1, dtype=np.float32)
    _refused(fed, lambda: site.upload(site.upload_header(tensors), tensors), grpc.StatusCode.INVALID_ARGUMENT,
             f"tensor {name!r}: shape")


def test_wrong_dtype(fed, sites):
    site = sites["site-x"]
    tensors = _delta(site, 0.0)
    name = sorted(tensors)[0]
    tensors[name] = tensors[name].astype(np.float64)
    _refused(fed, lambda: site.upload(site.upload_header(tensors), tensors), grpc.StatusCode.INVALID_ARGUMENT,
             f"tensor {name!r}: dtype float64")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_and_inf(fed, sites, bad):
    site = sites["site-x"]
    tensors = _delta(site, 0.0)
    name = sorted(tensors)[-1]
    tensors[name].flat[0] = bad
    _refused(fed, lambda: site.upload(site.upload_header(tensors), tensors), grpc.StatusCode.INVALID_ARGUMENT,
             "NaN or Inf")


def test_chunk_over_the_size_limit(fed, sites):
    site = sites["site-x"]
    tensors = _delta(site, 0.0)
    assert max(a.nbytes for a in tensors.values()) > CHUNK
    _refused(fed, lambda: site.upload(site.upload_header(tensors), tensors, chunk=4 * CHUNK),
             grpc.StatusCode.RESOURCE_EXHAUSTED, "exceeds the chunk limit of 1024")


def test_a_message_over_grpcs_own_limit_mid_upload_is_recorded(fed, sites):
    """gRPC refuses the chunk inside its core (RESOURCE_EXHAUSTED) before the coordinator sees a
    byte of it; the coordinator sees the upload end early and records that, under the caller."""
    site = sites["site-x"]
    tensors = _delta(site, 0.0)
    ca, cert, key = transport.TLSFiles.from_pki(fed.pki, site.name).read()
    options = [o for o in transport.CHANNEL_OPTIONS if o[0] != "grpc.max_send_message_length"]
    channel = grpc.secure_channel(fed.address, grpc.ssl_channel_credentials(ca, key, cert), options=options + [
        ("grpc.max_send_message_length", 2 * transport.MAX_MESSAGE_BYTES)])
    upload = channel.stream_unary("/ktfed.v1.ParticipantService/Upload")
    before = _refusal_count(fed)
    messages = [pb.UploadChunk(header=site.upload_header(tensors)).SerializeToString(),
                bytes(transport.MAX_MESSAGE_BYTES + 1)]
    with pytest.raises(grpc.RpcError) as info:
        upload(iter(messages), timeout=30)
    channel.close()
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, info.value.details()
    fed.wait_for(lambda: _refusal_count(fed) == before + 1, 10, "the refusal's record")
    (peer, method), = fed.db().execute("SELECT peer, method FROM refusals ORDER BY rowid DESC LIMIT 1").fetchall()
    assert (peer, method) == ("site-x", "ParticipantService.Upload")
    status = fed.status()
    assert status.rounds_completed == 0 and status.round_in_progress == 1


def test_digest_mismatch(fed, sites):
    site = sites["site-x"]
    tensors = _delta(site, 0.0)
    head = site.upload_header(tensors)
    head.tensors[0].sha256 = hashlib.sha256(b"something else").digest()
    _refused(fed, lambda: site.upload(head, tensors), grpc.StatusCode.DATA_LOSS, "does not match the declared digest")


def test_undeclared_tensor_name(fed, sites):
    site = sites["site-x"]
    manifest = {e.name: e for e in site.join.manifest}
    private = next(n for n, e in manifest.items() if e.role == pb.ManifestEntry.PRIVATE)
    tensors = _delta(site, 0.0)
    tensors[private] = np.zeros(tuple(manifest[private].shape), dtype=np.float32)
    _refused(fed, lambda: site.upload(site.upload_header(tensors), tensors), grpc.StatusCode.INVALID_ARGUMENT,
             f"tensor {private!r} is not declared shared")


def test_metrics_that_are_not_finite(fed, sites):
    site = sites["site-x"]
    tensors = _delta(site, 0.0)
    head = site.upload_header(tensors, metrics={"accuracy": float("nan")})
    _refused(fed, lambda: site.upload(head, tensors), grpc.StatusCode.INVALID_ARGUMENT, "not finite")


def test_id_that_differs_from_the_certificate_subject(fed, sites):
    channel = _connect(fed, "site-a")
    stub = ParticipantServiceStub(channel)
    _refused(fed, lambda: stub.Join(pb.JoinRequest(header=convert.header(site_id="site-x")), timeout=10),
             grpc.StatusCode.PERMISSION_DENIED, "differs from the certificate subject 'site-a'")
    channel.close()


def test_site_that_is_not_part_of_the_run(fed, sites):
    channel = _connect(fed, "site-b")
    stub = ParticipantServiceStub(channel)
    _refused(fed, lambda: stub.Join(pb.JoinRequest(header=convert.header(site_id="site-b")), timeout=10),
             grpc.StatusCode.PERMISSION_DENIED, "site-b is not a site of run")
    channel.close()


def test_participant_calling_an_operator_method(fed, sites):
    stub = OperatorServiceStub(sites["site-x"].channel)
    _refused(fed, lambda: stub.GetRunStatus(pb.RunStatusRequest(header=convert.header()), timeout=10),
             grpc.StatusCode.PERMISSION_DENIED, "site-x is a participant; this call needs an operator")


def test_operator_start_run_with_invalid_config(fed, sites):
    stub = OperatorServiceStub(fed.client.channel)
    bad = fast_config().replace("lr = 0.05", "lr = -1.0")
    _refused(fed, lambda: stub.StartRun(pb.StartRunRequest(header=convert.header(), run_config_toml=bad), timeout=10),
             grpc.StatusCode.INVALID_ARGUMENT, "train.lr")


def _handshake_fails(fed, channel) -> grpc.RpcError:
    stub = ParticipantServiceStub(channel)
    with pytest.raises(grpc.RpcError) as info:
        stub.Join(pb.JoinRequest(header=convert.header(site_id="site-x")), timeout=10)
    channel.close()
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert fed.status().round_in_progress == 1
    return info.value


def test_no_client_certificate(fed, sites):
    ca = (fed.pki / "ca.crt").read_bytes()
    channel = grpc.secure_channel(fed.address, grpc.ssl_channel_credentials(root_certificates=ca))
    _handshake_fails(fed, channel)
    assert "PEER_DID_NOT_RETURN_A_CERTIFICATE" in (fed.workdir / "logs" / "coordinator.out").read_text()


def test_certificate_from_another_ca(fed, sites, tmp_path):
    other = tmp_path / "other-pki"
    make_pki(other, ["site-x"])
    # The client trusts our CA (so it would accept the server) but presents a foreign certificate.
    tls = transport.TLSFiles(fed.pki / "ca.crt", other / "issued" / "site-x.crt", other / "issued" / "site-x.key")
    _handshake_fails(fed, transport.open_channel(fed.address, tls))
    assert "CERTIFICATE_VERIFY_FAILED" in (fed.workdir / "logs" / "coordinator.out").read_text()


def test_revoked_certificate_is_refused_without_a_restart(fed, sites):
    from security.pki import issue

    issue(fed.pki, "site-r", "participant")
    channel = _connect(fed, "site-r")
    stub = ParticipantServiceStub(channel)
    join = lambda: stub.Join(pb.JoinRequest(header=convert.header(site_id="site-r")), timeout=10)  # noqa: E731
    _refused(fed, join, grpc.StatusCode.PERMISSION_DENIED, "not a site of run")  # valid, just not invited
    out = subprocess.run([sys.executable, "-m", "ktfed", "pki", "revoke", "--dir", str(fed.pki), "site-r"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    _refused(fed, join, grpc.StatusCode.UNAUTHENTICATED, "site-r", "is revoked")
    channel.close()


def test_valid_updates_give_exactly_the_expected_aggregate(fed, sites):
    x, a = sites["site-x"], sites["site-a"]
    receipt = x.upload(x.upload_header(_delta(x, 1.0), num_samples=1), _delta(x, 1.0))
    assert receipt.bytes_received == sum(v.nbytes for v in x.state.values())
    # Replaying the accepted update is refused and does not count twice.
    _refused(fed, lambda: x.upload(x.upload_header(_delta(x, 1.0), num_samples=1), _delta(x, 1.0)),
             grpc.StatusCode.ALREADY_EXISTS, "already uploaded", "(replay)")
    a.upload(a.upload_header(_delta(a, 4.0), num_samples=3), _delta(a, 4.0))
    status = fed.wait_rounds(1, timeout=30)
    assert list(status.rounds[0].contributors) == ["site-a", "site-x"]
    # Sample-weighted mean of the deltas: (1*1 + 3*4) / 4 = 3.25, added to the old global state.
    new_state = x.download(next(t.round for t in x.stream if t.HasField("round")))
    for name, old in x.state.items():
        np.testing.assert_allclose(new_state[name], old + np.float32(3.25), rtol=0, atol=1e-6)
    # A replay of round 1's upload during round 2 is stale.
    with pytest.raises(grpc.RpcError) as info:
        x.upload(x.upload_header(_delta(x, 1.0)), _delta(x, 1.0))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "stale round 1" in info.value.details()
