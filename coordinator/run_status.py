"""What the coordinator knows of a run's sites, and the run status the operator reads.

The round engine notes what happens (a connect, an upload, a decline, the epsilon a site reported);
`Sites` keeps it, rebuilt from the store after a restart, and `run_status` turns it with the
store's round records into the operator's `RunStatus` message.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

from coordinator.store import Store
from kt_core.wire import convert
from kt_core.wire import federation_pb2 as pb


@dataclass
class SiteInfo:
    connected: bool = False
    rounds_contributed: int = 0
    bytes_uploaded: int = 0
    last_metrics: dict[str, float] = field(default_factory=dict)
    privacy_status: str = ""
    epsilon_spent: float = 0.0
    epsilon_budget: float = 0.0
    decline_reason: str = ""
    capabilities: pb.Capabilities | None = None

    def note_privacy(self, metrics: Mapping[str, float]) -> None:
        if "epsilon" in metrics:
            self.epsilon_spent = float(metrics["epsilon"])
            self.epsilon_budget = float(metrics.get("epsilon_budget", self.epsilon_budget))
            self.privacy_status = "ok"

    def note_decline(self, code: str, reason: str, spent: float, budget: float) -> None:
        self.privacy_status = code if code == convert.DECLINE_BUDGET else f"declined:{code}"
        self.decline_reason = reason
        if spent or budget:
            self.epsilon_spent, self.epsilon_budget = spent, budget


def site_metrics(metrics: Mapping[str, float], site_id: str) -> dict[str, float]:
    """A site's own entries of a round's metrics (stored as "<site>/<name>")."""
    return {k.split("/", 1)[1]: v for k, v in metrics.items() if k.startswith(site_id + "/")}


class Sites(dict):
    """participant id -> SiteInfo, with an entry for every site of the run."""

    def __missing__(self, site_id: str) -> SiteInfo:
        info = self[site_id] = SiteInfo()
        return info

    @classmethod
    def restored(cls, store: Store, run_id: str, sites) -> "Sites":
        """The run's sites as the store remembers them: contributions, last epsilon, declines."""
        known = cls({s: SiteInfo() for s in sites})
        for upload in store.uploads(run_id):
            info = known[upload["site_id"]]
            info.rounds_contributed += 1
            info.bytes_uploaded += upload["bytes"]
        for rec in store.rounds(run_id):
            for site_id in rec.contributors:
                known[site_id].note_privacy(site_metrics(rec.metrics, site_id))
        for d in store.declines(run_id):
            known[d["site_id"]].note_decline(d["code"], d["reason"], d["epsilon_spent"], d["epsilon_budget"])
        return known

    def note_capabilities(self, site_id: str, caps: pb.Capabilities) -> None:
        kept = pb.Capabilities()
        kept.CopyFrom(caps)
        self[site_id].capabilities = kept


def run_status(engine) -> pb.RunStatus:
    """The operator's view of a round engine's run (takes the engine's lock for the live part)."""
    with engine.cond:
        attempt = engine.attempt
        status = pb.RunStatus(
            header=convert.header(engine.run_id, engine.rounds_completed), state=engine.state,
            rounds_completed=engine.rounds_completed, rounds_total=engine.fed.rounds,
            round_in_progress=attempt.round if attempt and not attempt.closed else 0,
            global_state_digest=engine.global_digest, manifest_digest=engine.manifest_digest,
            aborted_attempts=engine.store.aborted_count(engine.run_id))
        for site_id in sorted(engine.sites):
            info = engine.sites[site_id]
            status.sites.add(site_id=site_id, connected=site_id in engine.sessions,
                                    rounds_contributed=info.rounds_contributed,
                                    bytes_uploaded=info.bytes_uploaded, last_metrics=info.last_metrics,
                                    privacy_status=info.privacy_status, epsilon_spent=info.epsilon_spent,
                                    epsilon_budget=info.epsilon_budget, decline_reason=info.decline_reason,
                                    capabilities=info.capabilities)
    declined: dict[int, set[str]] = {}
    for d in engine.store.declines(engine.run_id):
        declined.setdefault(d["round"], set()).add(d["site_id"])
    for rec in engine.store.rounds(engine.run_id):
        status.rounds.add(round=rec.round, contributors=rec.contributors, dropped=rec.dropped,
                          bytes_received=rec.bytes_received, seconds=rec.seconds,
                          global_state_digest=rec.state_digest, metrics=rec.metrics,
                          bytes_by_site=rec.bytes_by_site,
                          declined=sorted(declined.get(rec.round, ())),
                          secagg=rec.secagg is not None)
    return status
