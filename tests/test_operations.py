"""Operating the services: metrics, JSON logs, SIGTERM, certificate rotation (real processes)."""
from __future__ import annotations

import json
import logging
import shutil
import signal
import socket
import ssl
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from cryptography import x509

from grpc_health.v1 import health_pb2, health_pb2_grpc

from kt_core.wire.exposition import Metric, MetricsServer, histogram, parse, render
from kt_core.wire import convert, transport
from kt_core.wire import federation_pb2 as pb
from kt_core.wire.federation_pb2_grpc import ParticipantServiceStub
from ktfed.launcher import free_port, make_pki
from ktfed.logs import JsonFormatter
from ktfed.operator import OperatorClient
from security.pki import issue, revoke
from tests.conftest import SITES, LocalFederation, fast_config


def scrape(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        assert reply.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return parse(reply.read().decode())


def value(samples: dict, name: str, **labels) -> float:
    return samples[(name, frozenset(labels.items()))]


# -- units --------------------------------------------------------------------------------------

def test_exposition_renders_and_serves():
    h = histogram("t_seconds", "durations", [0.2, 0.7, 3.0], (0.5, 1))
    page = render([Metric("t_total", "counter", "a counter").add(3, {"code": 'A"B'}), h])
    assert '# TYPE t_total counter\nt_total{code="A\\"B"} 3\n' in page
    samples = parse(render([h]))
    assert value(samples, "t_seconds_bucket", le="0.5") == 1 and value(samples, "t_seconds_bucket", le="+Inf") == 3
    assert value(samples, "t_seconds_count") == 3 and value(samples, "t_seconds_sum") == pytest.approx(3.9)
    server = MetricsServer(f"127.0.0.1:{free_port()}", lambda: [Metric("up", "gauge", "x").add(1)]).start()
    try:
        assert value(scrape(server.port), "up") == 1
    finally:
        server.stop()
    with pytest.raises(ValueError, match="HOST:PORT"):
        MetricsServer("nonsense", list)


def test_json_formatter_one_object_per_line_with_fields_and_no_secrets():
    record = logging.LogRecord("ktfed.x", logging.WARNING, __file__, 1, "round %d\nsecond line", (3,), None)
    record.site = "site-a"
    record.private_key = "-----BEGIN PRIVATE KEY-----"
    line = JsonFormatter().format(record)
    assert "\n" not in line and "BEGIN PRIVATE" not in line
    entry = json.loads(line)
    assert entry["level"] == "warning" and entry["logger"] == "ktfed.x"
    assert entry["message"] == "round 3\nsecond line" and entry["time"].endswith("+00:00")
    assert entry["fields"] == {"site": "site-a", "private_key": "[redacted]"}


# -- real processes -----------------------------------------------------------------------------

@pytest.mark.slow
def test_metrics_move_with_rounds_and_logs_are_json(federation):
    port, site_port = free_port(), free_port()
    config = federation.write_config(fast_config(rounds=3, min_sites=3, timeout=60))
    json_logs = ["--log-format", "json"]
    federation.start_coordinator(config, args=["--metrics-listen", f"127.0.0.1:{port}", *json_logs])
    federation.wait_serving()
    before = scrape(port)
    run_id = federation.status().header.run_id
    run = {"run_id": run_id}
    assert value(before, "ktfed_coordinator_serving") == 1
    assert value(before, "ktfed_rounds_completed_total", **run) == 0
    assert value(before, "ktfed_sites_connected", **run) == 0
    # a refusal: site-x holds a valid certificate but is not a site of this run
    with transport.open_channel(federation.address, transport.TLSFiles.from_pki(federation.pki, "site-x")) as ch:
        with pytest.raises(grpc.RpcError) as err:
            ParticipantServiceStub(ch).Join(pb.JoinRequest(header=convert.header(site_id="site-x")),
                                            timeout=10)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    federation.start_participant("site-a", args=["--metrics-listen", f"127.0.0.1:{site_port}", *json_logs])
    for site in SITES[1:]:
        federation.start_participant(site, args=json_logs)
    federation.wait_rounds(1, timeout=120)
    during = scrape(port)
    assert value(during, "ktfed_rounds_completed_total", **run) >= 1
    status = federation.wait_rounds(3, timeout=120)
    assert status.state == "finished"
    after = scrape(port)
    assert value(after, "ktfed_rounds_completed_total", **run) == 3
    assert value(after, "ktfed_round_duration_seconds_count") == 3
    assert value(after, "ktfed_round_duration_seconds_sum") == pytest.approx(sum(r.seconds for r in status.rounds))
    assert value(after, "ktfed_bytes_received_total") == sum(r.bytes_received for r in status.rounds) > 0
    assert value(after, "ktfed_bytes_sent_total") > 0 and value(after, "ktfed_state_downloads_total") >= 3 * 3
    assert value(after, "ktfed_bytes_received_total") > value(during, "ktfed_bytes_received_total")
    assert value(after, "ktfed_refusals_total", code="PERMISSION_DENIED", method="ParticipantService.Join") == 1
    assert value(after, "ktfed_aborted_attempts_total", **run) == 0
    for site in SITES:
        assert value(after, "ktfed_site_rounds_contributed_total", site=site) == 3
        assert ("ktfed_site_epsilon_spent", frozenset({"site": site}.items())) in after
    assert federation.participants["site-a"].wait(30) == 0
    # the participant's own endpoint went away with it; its log says what it served
    for name in ["coordinator", *SITES]:
        lines = federation.log(name).splitlines()
        assert lines, name
        entries = [json.loads(line) for line in lines]  # every line is one JSON object
        assert all({"time", "level", "logger", "message"} <= set(e) for e in entries)
    messages = [json.loads(line)["message"] for line in federation.log().splitlines()]
    assert any("round 3 completed" in m for m in messages)
    assert not any("PRIVATE KEY" in line for line in federation.log().splitlines())


@pytest.mark.slow
def test_participant_metrics_endpoint(federation):
    site_port = free_port()
    config = federation.write_config(fast_config(rounds=2, min_sites=2, timeout=60, sites=SITES[:2]))
    federation.start_coordinator(config)
    federation.wait_serving()
    federation.start_participant("site-a", args=["--metrics-listen", f"127.0.0.1:{site_port}"],
                                 env={"KTFED_FAULT_PAUSE_BEFORE_UPLOAD_S": "2"})
    federation.start_participant("site-b")
    federation.wait_for(lambda: "fault injection: pausing" in federation.log("site-a"), 90, "site-a to train")
    site = {"site": "site-a"}
    first = scrape(site_port)
    assert value(first, "ktfed_site_status", status="training", **site) == 1
    assert value(first, "ktfed_site_rounds_contributed_total", **site) == 0
    federation.wait_for(lambda: value(scrape(site_port), "ktfed_site_rounds_contributed_total", **site) >= 1,
                        60, "site-a's first round")
    later = scrape(site_port)
    assert value(later, "ktfed_site_update_bytes_total", **site) > 0
    assert value(later, "ktfed_site_state_bytes_total", **site) > 0
    assert value(later, "ktfed_site_epsilon_spent", **site) == 0  # no DP in this run
    federation.wait_rounds(2, timeout=120)


SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


def _watch_health(address: str, tls: transport.TLSFiles, seen: list) -> threading.Thread:
    """Follow the coordinator's health with the standard Watch stream until it goes away."""
    def follow():
        with transport.open_channel(address, tls) as channel:
            try:
                for reply in health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service="")):
                    seen.append(reply.status)
            except grpc.RpcError:
                pass
    thread = threading.Thread(target=follow, daemon=True)
    thread.start()
    return thread


def _health(federation):
    # A fresh channel per poll: a long-lived one sits in gRPC's reconnect backoff (seconds, growing)
    # while the coordinator restarts, and would miss a short NOT_SERVING window.
    client = OperatorClient(federation.address, federation.operator_tls())
    try:
        return client.health.Check(health_pb2.HealthCheckRequest(service=""), timeout=2).status
    except grpc.RpcError:
        return None
    finally:
        client.close()


@pytest.mark.slow
def test_sigterm_mid_round_exits_cleanly_and_restart_resumes(federation):
    config = federation.write_config(fast_config(rounds=3, min_sites=2, timeout=60))
    federation.start_coordinator(config)
    federation.wait_serving()
    federation.start_participant("site-a")
    federation.start_participant("site-b")
    federation.start_participant("site-c", env={"KTFED_FAULT_PAUSE_BEFORE_UPLOAD_S": "60"})  # holds round 1 open
    federation.wait_for(lambda: "fault injection: pausing" in federation.log("site-c"), 90, "site-c to train")
    assert federation.status().round_in_progress == 1
    seen: list = []
    watcher = _watch_health(federation.address, federation.operator_tls(), seen)
    federation.wait_for(lambda: seen, 10, "the health watch")
    started = time.monotonic()
    federation.coordinator.send_signal(signal.SIGTERM)
    assert federation.coordinator.wait(20) == 0
    assert time.monotonic() - started < 10
    watcher.join(10)
    assert seen[0] == SERVING and NOT_SERVING in seen  # it said so before it went
    state_dir = federation.workdir / "coordinator"
    assert not list(state_dir.rglob("*.tmp"))
    run_dir = next((state_dir / "runs").iterdir())
    assert sorted(p.name for p in run_dir.iterdir()) == ["round-00000.safetensors"]  # round 1 never committed
    (completed,) = federation.db().execute("SELECT MAX(round) FROM rounds").fetchone()
    assert completed == 0
    assert "coordinator stopped" in federation.log()
    federation.participants["site-c"].kill()  # the paused site; the other two reconnect by themselves
    federation.participants["site-c"].wait(10)
    federation.close_client()
    federation.start_coordinator(env={"KTFED_FAULT_PAUSE_IN_RESUME_S": "6"})
    statuses = []
    deadline = time.monotonic() + 60
    while SERVING not in statuses and time.monotonic() < deadline:
        if (status := _health(federation)) is not None and (not statuses or statuses[-1] != status):
            statuses.append(status)
        time.sleep(0.05)
    assert statuses == [NOT_SERVING, SERVING]  # NOT_SERVING while resuming, then SERVING
    federation.start_participant("site-c")
    status = federation.wait_rounds(3, timeout=120)
    assert status.state == "finished" and [r.round for r in status.rounds] == [1, 2, 3]
    assert "resumed run" in federation.log()
    for site in ("site-a", "site-b"):
        assert federation.participants[site].wait(30) == 0


def _peer_serial(address: str, ca: Path, cert: Path, key: Path) -> int:
    """The serial of the certificate the coordinator presents to a brand-new connection."""
    host, port = address.rsplit(":", 1)
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca))
    context.check_hostname = False  # the certificate names the coordinator, not 127.0.0.1's DNS name
    context.load_cert_chain(str(cert), str(key))
    context.set_alpn_protocols(["h2"])
    with socket.create_connection((host, int(port)), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname="coordinator") as tls:
            der = tls.getpeercert(binary_form=True)
    return x509.load_der_x509_certificate(der).serial_number


@pytest.mark.slow
def test_certificate_rotation_during_a_run(tmp_path):
    pki = tmp_path / "pki"
    make_pki(pki, SITES)
    (tmp_path / "fed").mkdir()
    federation = LocalFederation(tmp_path / "fed", pki)
    try:
        config = federation.write_config(fast_config(rounds=4, min_sites=2, timeout=60))
        federation.start_coordinator(config)
        federation.wait_serving()
        for site in SITES:  # site-c takes 2 s per round, so the run is still going when we rotate
            federation.start_participant(site, env={"KTFED_FAULT_PAUSE_BEFORE_UPLOAD_S": "2"} if site == "site-c" else None)
        federation.wait_rounds(1, timeout=120)
        issued = pki / "issued"
        old = tmp_path / "old"
        old.mkdir()
        for name in ("site-a.crt", "site-a.key"):
            shutil.copy(issued / name, old / name)
        op = (pki / "ca.crt", issued / "operator.crt", issued / "operator.key")
        old_coordinator = _peer_serial(federation.address, *op)
        old_site_a = x509.load_pem_x509_certificate((old / "site-a.crt").read_bytes()).serial_number
        new_coordinator = issue(pki, "coordinator", "coordinator").serial
        new_site_a = issue(pki, "site-a", "participant").serial
        assert revoke(pki, "site-a", serial=old_site_a) == [old_site_a]
        assert old_coordinator != new_coordinator and old_site_a != new_site_a
        assert _peer_serial(federation.address, *op) == new_coordinator  # new connections: new certificate
        stale = transport.TLSFiles(pki / "ca.crt", old / "site-a.crt", old / "site-a.key")
        with transport.open_channel(federation.address, stale) as channel:
            with pytest.raises(grpc.RpcError) as err:
                ParticipantServiceStub(channel).Join(pb.JoinRequest(header=convert.header(site_id="site-a")),
                                                     timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED and "revoked" in err.value.details()
        status = federation.wait_rounds(4, timeout=180)
        assert status.state == "finished"
        assert "site-a" in status.rounds[-1].contributors  # site-a carried on with its new certificate
        assert "certificate files changed" in federation.log()
        for site in SITES:
            assert federation.participants[site].wait(30) == 0, site
    finally:
        federation.close()


def test_pki_revoke_one_serial_keeps_the_new_certificate(tmp_path, capsys):
    from ktfed.cli import main
    from security.pki import RevocationList, list_certs

    pki = tmp_path / "pki"
    assert main(["pki", "init", "--dir", str(pki)]) == 0
    old = issue(pki, "site-a", "participant").serial
    new = issue(pki, "site-a", "participant").serial
    assert main(["pki", "revoke", "--dir", str(pki), "--serial", f"{old:x}", "site-a"]) == 0
    assert f"serial(s) {old:x}" in capsys.readouterr().out
    crl = RevocationList.load(pki / "crl.pem", pki / "ca.crt")
    assert crl.is_revoked(old) and not crl.is_revoked(new)
    assert {c.serial: c.live for c in list_certs(pki)} == {old: False, new: True}
    assert main(["pki", "revoke", "--dir", str(pki), "--serial", "abc", "site-a"]) == 2
    assert "no certificate with serial abc" in capsys.readouterr().err
