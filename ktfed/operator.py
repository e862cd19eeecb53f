"""The federation operator's client: start, watch and stop runs on a coordinator."""
from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kt_core.wire import convert, transport
from kt_core.wire import federation_pb2 as pb
from kt_core.wire.federation_pb2_grpc import OperatorServiceStub


class OperatorClient:
    def __init__(self, address: str, tls: transport.TLSFiles | None, *, insecure: bool = False, timeout: float = 30):
        self.channel = transport.open_channel(address, tls, insecure=insecure)
        self.stub = OperatorServiceStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)
        self.timeout = timeout

    def close(self) -> None:
        self.channel.close()

    def start(self, config_toml: str) -> pb.RunStatus:
        return self.stub.StartRun(pb.StartRunRequest(header=convert.header(), run_config_toml=config_toml),
                                  timeout=self.timeout)

    def status(self, run_id: str = "") -> pb.RunStatus:
        return self.stub.GetRunStatus(pb.RunStatusRequest(header=convert.header(run_id)), timeout=self.timeout)

    def stop(self, run_id: str, reason: str) -> pb.RunStatus:
        return self.stub.StopRun(pb.StopRunRequest(header=convert.header(run_id), reason=reason),
                                 timeout=self.timeout)

    def serving(self) -> bool:
        try:
            reply = self.health.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
        except grpc.RpcError:
            return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING


def format_status(status: pb.RunStatus, text: bool = False):
    data = {
        "run_id": status.header.run_id, "state": status.state,
        "rounds_completed": status.rounds_completed, "rounds_total": status.rounds_total,
        "round_in_progress": status.round_in_progress, "aborted_attempts": status.aborted_attempts,
        "global_state_digest": status.global_state_digest,
        "sites": [{"id": p.site_id, "connected": p.connected,
                          "rounds_contributed": p.rounds_contributed, "bytes_uploaded": p.bytes_uploaded,
                          "last_metrics": dict(p.last_metrics), "privacy_status": p.privacy_status,
                          "epsilon_spent": p.epsilon_spent, "epsilon_budget": p.epsilon_budget,
                          "decline_reason": p.decline_reason,
                          "capabilities": {"cpu_count": p.capabilities.cpu_count,
                                           "accelerators": list(p.capabilities.accelerators),
                                           "memory_bytes": p.capabilities.memory_bytes,
                                           "software_version": p.capabilities.software_version}}
                         for p in status.sites],
        "rounds": [{"round": r.round, "contributors": list(r.contributors), "dropped": list(r.dropped),
                    "bytes_received": r.bytes_received, "seconds": round(r.seconds, 3),
                    "declined": list(r.declined), "secagg": r.secagg}
                   for r in status.rounds],
    }
    if not text:
        return data
    lines = [f"run {data['run_id']}: {data['state']}, {data['rounds_completed']}/{data['rounds_total']} rounds"
             + (f", round {data['round_in_progress']} in progress" if data["round_in_progress"] else "")
             + (f", {data['aborted_attempts']} aborted attempt(s)" if data["aborted_attempts"] else "")]
    for p in data["sites"]:
        acc = p["last_metrics"].get("accuracy")
        lines.append(f"  {p['id']:<16} {'connected' if p['connected'] else 'away':<10} "
                     f"{p['rounds_contributed']:>3} rounds {p['bytes_uploaded']:>12,} bytes"
                     + (f"  accuracy {acc:.3f}" if acc is not None else "")
                     + (f"  epsilon {p['epsilon_spent']:.3f}/{p['epsilon_budget']:.3g} {p['privacy_status']}"
                        if p["privacy_status"] else "")
                     + (f"  [{p['capabilities']['cpu_count']} cpus"
                        + "".join(f", {a}" for a in p["capabilities"]["accelerators"]) + "]"
                        if p["capabilities"]["cpu_count"] else ""))
    return "\n".join(lines)
