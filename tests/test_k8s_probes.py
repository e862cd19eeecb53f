"""The health probes the pods run (ktfed.k8s probe): they answer correctly against a real mTLS
health server on loopback, and the probe module loads no heavy dependency."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from ktfed import k8s
from kt_core.wire import transport

REPO = Path(__file__).resolve().parent.parent


# -- probes -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def health_server(pki_dir):
    """A real mTLS gRPC server on loopback with the standard health service, using the
    coordinator's certificate, as the coordinator serves it."""
    servicer = health.HealthServicer()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_secure_port("127.0.0.1:0", transport.server_credentials(
        transport.TLSFiles.from_pki(pki_dir, "coordinator")))
    server.start()
    yield servicer, f"127.0.0.1:{port}"
    server.stop(0)


def _tls_dir(pki_dir: Path, tmp_path: Path, name: str = "coordinator") -> Path:
    """The layout of the mounted Secret: ca.crt, tls.crt, tls.key."""
    folder = tmp_path / f"tls-{name}"
    folder.mkdir()
    shutil.copy(pki_dir / "ca.crt", folder / "ca.crt")
    shutil.copy(pki_dir / "issued" / f"{name}.crt", folder / "tls.crt")
    shutil.copy(pki_dir / "issued" / f"{name}.key", folder / "tls.key")
    return folder


def test_grpc_probe_follows_the_health_status(health_server, pki_dir, tmp_path):
    servicer, address = health_server
    tls = str(_tls_dir(pki_dir, tmp_path))
    service = "ktfed.v1.ParticipantService"
    servicer.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
    code, message = k8s.probe_grpc(address, service, tls_dir=tls)
    assert code == 1 and "NOT_SERVING" in message  # resuming: not ready ...
    assert k8s.probe_grpc(address, service, tls_dir=tls, accept_not_serving=True)[0] == 0  # ... but alive
    servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    assert k8s.probe_grpc(address, service, tls_dir=tls) == (0, f"{service}: SERVING")
    assert k8s.probe_grpc(address, "no.such.Service", tls_dir=tls)[0] == 1
    assert k8s.probe_grpc(address, "no.such.Service", tls_dir=tls, accept_not_serving=True)[0] == 0


def test_grpc_probe_with_a_participant_certificate_and_failures(health_server, pki_dir, tmp_path):
    servicer, address = health_server
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    site = _tls_dir(pki_dir, tmp_path, "site-a")
    assert k8s.probe_grpc(address, "", ca=str(site / "ca.crt"), cert=str(site / "tls.crt"),
                          key=str(site / "tls.key"), tls_dir=None)[0] == 0
    code, message = k8s.probe_grpc(address, "", tls_dir=str(tmp_path / "missing"))
    assert code == 1 and "cannot read TLS material" in message
    with socket_closed_port() as dead:
        code, message = k8s.probe_grpc(dead, "", tls_dir=str(site), timeout=1.0, accept_not_serving=True)
    assert code == 1 and ("UNAVAILABLE" in message or "DEADLINE_EXCEEDED" in message), message


class socket_closed_port:
    def __enter__(self) -> str:
        import socket

        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        self.port = s.getsockname()[1]
        s.close()
        return f"127.0.0.1:{self.port}"

    def __exit__(self, *exc):
        return False


def test_grpc_probe_runs_as_the_pods_run_it(health_server, pki_dir, tmp_path):
    """`python -m ktfed.k8s probe grpc ...`, the exact form of the exec probes, in a subprocess."""
    servicer, address = health_server
    servicer.set("ktfed.v1.OperatorService", health_pb2.HealthCheckResponse.SERVING)
    tls = _tls_dir(pki_dir, tmp_path)
    done = subprocess.run([sys.executable, "-m", "ktfed.k8s", "probe", "grpc", f"--address={address}",
                           f"--tls-dir={tls}", "--service=ktfed.v1.OperatorService"],
                          capture_output=True, text=True, timeout=30, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert "SERVING" in done.stdout


def test_heartbeat_probe(tmp_path):
    beat = tmp_path / "heartbeat.json"
    assert k8s.probe_heartbeat(beat, 60)[0] == 1  # no file yet
    k8s.write_heartbeat(beat, "site-a", "connecting")
    assert k8s.probe_heartbeat(beat, 60)[0] == 0  # alive
    code, message = k8s.probe_heartbeat(beat, 60, require_connected=True)
    assert code == 1 and "connecting" in message  # not ready
    k8s.write_heartbeat(beat, "site-a", "training", 3)
    assert k8s.probe_heartbeat(beat, 60, require_connected=True)[0] == 0
    old = time.time() - 120
    os.utime(beat, (old, old))
    code, message = k8s.probe_heartbeat(beat, 60)
    assert code == 1 and "stuck" in message
    beat.write_text("{not json")
    assert k8s.probe_heartbeat(beat, 60, require_connected=True)[0] == 1
    assert not list(tmp_path.glob("*.tmp"))


def test_the_probe_module_loads_no_heavy_dependency():
    """The exec probes start a fresh interpreter every few seconds: importing ktfed.k8s must stay
    standard library only (grpc loads only for the gRPC probe, never torch)."""
    code = ("import sys, ktfed.k8s; heavy = [m for m in ('grpc', 'torch', 'yaml', 'kubernetes_validate', "
            "'numpy') if m in sys.modules]; print(heavy)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30, cwd=REPO)
    assert done.stdout.strip() == "[]", done.stdout + done.stderr
