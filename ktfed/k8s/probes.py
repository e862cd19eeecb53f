"""The health probes the pods and images run (gRPC health over mutual TLS, the agent's heartbeat
file) and the heartbeat writer. grpc loads on use only."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from kt_core.heartbeat import write_heartbeat  # noqa: F401 - the format's one writer, re-exported

from .common import CONNECTED_STATUSES, DEFAULT_TLS_DIR


def probe_grpc(address: str, service: str = "", *, tls_dir: str | None = DEFAULT_TLS_DIR,
               ca: str | None = None, cert: str | None = None, key: str | None = None,
               insecure: bool = False, server_name: str | None = None, timeout: float = 3.0,
               accept_not_serving: bool = False) -> tuple[int, str]:
    """Ask the standard gRPC health service at ADDRESS (mutual TLS with the given files).

    0 when it answers SERVING for SERVICE; with accept_not_serving, any answer at all (the server
    is alive, e.g. NOT_SERVING while it resumes). 1 otherwise. The message says what was seen."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
    if insecure:
        channel = grpc.insecure_channel(address, options=options)
    else:
        ca = ca or os.path.join(tls_dir or DEFAULT_TLS_DIR, "ca.crt")
        cert = cert or os.path.join(tls_dir or DEFAULT_TLS_DIR, "tls.crt")
        key = key or os.path.join(tls_dir or DEFAULT_TLS_DIR, "tls.key")
        try:
            creds = grpc.ssl_channel_credentials(root_certificates=Path(ca).read_bytes(),
                                                 private_key=Path(key).read_bytes(),
                                                 certificate_chain=Path(cert).read_bytes())
        except OSError as err:
            return 1, f"cannot read TLS material: {err}"
        channel = grpc.secure_channel(address, creds, options=options)
    try:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                         timeout=timeout)
    except grpc.RpcError as err:
        if accept_not_serving and err.code() == grpc.StatusCode.NOT_FOUND:
            return 0, f"alive ({service!r} unknown to the health service)"
        return 1, f"health check of {address} failed: {err.code().name}: {err.details()}"
    finally:
        channel.close()
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    if reply.status == health_pb2.HealthCheckResponse.SERVING:
        return 0, f"{service or '(server)'}: SERVING"
    if accept_not_serving:
        return 0, f"alive: {service or '(server)'} is {status}"
    return 1, f"{service or '(server)'}: {status}"


def probe_heartbeat(path: str | Path, max_age: float, *, require_connected: bool = False,
                    now: float | None = None) -> tuple[int, str]:
    """0 when PATH was written at most MAX_AGE seconds ago (and, with require_connected, says the
    agent holds a session with the coordinator); 1 otherwise."""
    path = Path(path)
    try:
        st = path.stat()
    except OSError:
        return 1, f"no heartbeat file at {path} (agent not started, or too old to write one)"
    age = (time.time() if now is None else now) - st.st_mtime
    if age > max_age:
        return 1, f"heartbeat {path} is {age:.0f}s old (> {max_age:g}s): the agent is stuck"
    if not require_connected:
        return 0, f"heartbeat {age:.0f}s old"
    try:
        beat = json.loads(path.read_text())
        status = beat["status"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        return 1, f"heartbeat {path} unreadable: {err}"
    if status not in CONNECTED_STATUSES:
        return 1, f"agent is {status!r}, not connected to the coordinator"
    return 0, f"agent {status} (round {beat.get('round', '?')}), heartbeat {age:.0f}s old"
