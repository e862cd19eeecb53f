"""What every round of one run works with at this site, and the downloads it makes.

`AgentSettings` is how the site operator configured the agent; `SiteRun` is one run's state at
this site (its trainer, egress guard, audit trail, the global states it downloaded, its counters),
made once when the site joins the run (`SiteRun.join`) and handed to every round.
"""
from __future__ import annotations

import hashlib
import json
import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np

from kt_core import codec
from kt_core.config import ConfigError, RunConfig
from kt_core.config_file import RunUnworkable
from kt_core.models import shared_state
from kt_core.tasks import task_for
from kt_core.wire import convert, transport
from kt_core.wire import federation_pb2 as pb
from participant import backbone_cache
from participant import policy as site_policy
from participant.audit_trail import NoAudit
from participant.policy import SitePolicy, Violation
from participant.state_check import StateStepRefused, StateSteps
from participant.trainer import LocalTrainer
from security.egress import EgressGuard

log = logging.getLogger(__name__)

# Refusals of one upload: the round goes on without us, the stream stays open.
ROUND_CODES = {grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.DEADLINE_EXCEEDED,
               grpc.StatusCode.ALREADY_EXISTS}


@dataclass(frozen=True)
class AgentSettings:
    site: str
    coordinator: str
    tls: transport.TLSFiles | None
    state_dir: Path
    data_root: Path | None = None
    insecure: bool = False
    backoff_initial_s: float = 0.2
    backoff_max_s: float = 5.0
    rpc_timeout_s: float = 120.0
    # this site's own privacy budget; the stricter of it and the run's wins
    epsilon_budget: float | None = None
    heartbeat_s: float = 10.0          # <state>/heartbeat.json, read by the Kubernetes probes
    metrics_listen: str | None = None  # HOST:PORT of the Prometheus endpoint; None = off
    coordinator_name: str = "coordinator"   # the coordinator's certificate name (its audit log's producer)
    audit: bool = True                      # keep the audit log (STATE/audit); off only to measure it
    policy_path: Path | None = None         # the site policy (TOML); None = participant.policy's default
    site_data: Path | None = None           # the site's own data file (TOML), for a run of a python task

    def load_policy(self) -> SitePolicy:
        """Raises ConfigError naming the file and the field."""
        return site_policy.load(self.policy_path) if self.policy_path else SitePolicy()


@dataclass
class SiteCounters:
    """What the site's metrics endpoint counts."""
    rounds_contributed: int = 0
    rounds_declined: int = 0
    bytes_uploaded: int = 0
    bytes_downloaded: int = 0


class GlobalStates:
    """The global states this site downloads, checked against the digest they are named by; the
    last one is kept, since consecutive tasks often name the same state."""

    def __init__(self, settings: AgentSettings, audit, counters: SiteCounters):
        self.settings, self.audit, self.counters = settings, audit, counters
        self.chunk_bytes = codec.MAX_CHUNK_BYTES
        self.cached: tuple[str, dict[str, np.ndarray]] | None = None
        # the run's step check (participant.state_check); kept across re-joins of the same run, so a
        # coordinator cannot reset it by dropping the site's connection
        self.steps: StateSteps | None = None

    def begin_run(self, run_id: str) -> None:
        self.cached = None
        if self.steps is not None and self.steps.run_id != run_id:
            self.steps = None

    def measure_from(self, run_id: str, config: RunConfig, initial: dict[str, np.ndarray]) -> None:
        """Check this run's states from `initial`, the round-0 shared state this site built (on a
        re-join of the same run the check goes on from the last state it took)."""
        if self.steps is None:
            self.steps = StateSteps(run_id, config, initial)

    def fetch(self, stub, run_id: str, round_no: int, digest: str, completed: int
              ) -> tuple[str, dict[str, np.ndarray]]:
        """(digest, tensors) of a global state, named as the state after `completed` rounds. An
        empty digest asks for the coordinator's current one (after RunFinished, which names none:
        the run's final state); the reply's header names it, and the tensors are checked against
        that name as against an assignment's, and against the last state taken for how far they
        moved (StateStepRefused)."""
        if digest and self.cached and self.cached[0] == digest:
            return self.cached
        site = self.settings.site
        responses = stub.DownloadState(pb.StateRequest(header=convert.header(run_id, round_no, site),
                                                       global_state_digest=digest),
                                       timeout=self.settings.rpc_timeout_s)
        first = next(responses)
        digest = digest or first.header.global_state_digest
        specs = [convert.spec_from_pb(s) for s in first.header.tensors]
        try:
            if codec.state_digest(specs) != digest:
                raise StateStepRefused("the global state's header does not match the digest the assignment named")
            if self.steps is not None and self.steps.run_id == run_id:
                self.steps.check_layout(specs)   # before anything is allocated for them
            assembler = codec.TensorAssembler(specs, max_chunk_bytes=self.chunk_bytes)
            for message in responses:
                assembler.add(message.chunk.name, message.chunk.offset, message.chunk.data)
            state = assembler.finish()
        except (StateStepRefused, codec.WireError) as err:
            # a state this site will not take is a refused round, not the end of the site
            responses.cancel()
            log.error("%s: run %s: global state %s refused: %s", site, run_id, digest[:12], err)
            self.audit.refusal(run_id, round_no, "state", "global state layout", str(err)[:1000])
            raise StateStepRefused(str(err)) from None
        self.counters.bytes_downloaded += assembler.bytes_received
        self.audit.boundary(run_id, "receive", round_no, "state", digest, specs)
        if self.steps is not None and self.steps.run_id == run_id:
            try:
                self.steps.accept(completed, state)
            except StateStepRefused as err:
                log.error("%s: run %s: global state %s refused: %s", self.settings.site, run_id, digest[:12], err)
                self.audit.refusal(run_id, round_no, "state", "global state step", str(err)[:1000])
                raise
        self.cached = (digest, state)
        return self.cached


@dataclass
class SiteRun:
    """One run at this site: made at join, handed to every round."""
    settings: AgentSettings
    run_id: str
    config: RunConfig
    trainer: LocalTrainer | None   # None when the run breaks the site policy
    guard: EgressGuard | None
    audit: NoAudit         # a SiteAudit when the site keeps its log
    states: GlobalStates
    counters: SiteCounters
    stopping: threading.Event
    policy: SitePolicy = SitePolicy()
    refused: tuple[Violation, ...] = ()   # why this site takes no part in the run: every assignment is declined

    @property
    def site(self) -> str:
        return self.settings.site

    @property
    def chunk_bytes(self) -> int:
        """The largest chunk the coordinator accepts (its JoinReply says)."""
        return self.states.chunk_bytes

    def header(self, round_no: int) -> pb.Header:
        return convert.header(self.run_id, round_no, self.site)

    def refuse(self, stub, assignment: pb.RoundAssignment, message: str, violations,
               code: str = convert.DECLINE_SITE_POLICY) -> None:
        """Refuse a round (at its assignment or at a SecAgg step) that breaks the site policy: each rule
        logged and audited, then one Decline naming them (`code` DECLINE_RUN_REFUSED where the policy
        refuses the whole run, participant.round)."""
        round_no = assignment.header.round
        for v in violations:
            log.error("%s: round %d declined (%s): %s", self.site, round_no, message, v)
            self.audit.refusal(self.run_id, round_no, message, v.reason, v.detail)
        self.decline(stub, assignment, code, "; ".join(str(v) for v in violations)[:500])

    def decline(self, stub, assignment: pb.RoundAssignment, code: str, reason: str, spent: float = 0.0, budget: float = 0.0,
                would_be: float = 0.0) -> None:
        """The Decline RPC, audited and countersigned like every message that leaves the site."""
        round_no = assignment.header.round
        self.counters.rounds_declined += 1
        token, token_seq = self.audit.countersign(self.run_id, assignment)
        sent = self.audit.boundary(self.run_id, "send", round_no, "decline", hashlib.sha256(assignment.attempt_id).hexdigest())
        try:
            stub.Decline(pb.DeclineRequest(header=self.header(round_no), attempt_id=assignment.attempt_id, code=code,
                                           reason=reason, epsilon_spent=spent, epsilon_budget=budget,
                                           epsilon_would_be=would_be, audit_countersignature=token),
                         timeout=self.settings.rpc_timeout_s)
        except grpc.RpcError as err:
            self.audit.undelivered((token_seq, sent), f"{err.code().name}: {err.details()}")
            if err.code() in ROUND_CODES or err.code() == grpc.StatusCode.INVALID_ARGUMENT:
                log.warning("%s: round %d: decline refused: %s %s", self.site, round_no, err.code().name,
                            err.details())
                return
            raise

    @classmethod
    def join(cls, settings: AgentSettings, stub, reply: pb.JoinReply, *, audit=None, states: GlobalStates,
             counters: SiteCounters, stopping: threading.Event, policy: SitePolicy | None = None) -> "SiteRun":
        """On the first join of a run: check the run against the site policy, then build the site's
        model (downloading the run's backbone when its task hosts one) and check it matches the
        coordinator's factor manifest. A run the policy refuses builds nothing and downloads nothing."""
        audit = audit if audit is not None else NoAudit()
        policy = policy if policy is not None else SitePolicy()
        run_id = reply.header.run_id
        states.chunk_bytes = reply.max_chunk_bytes or codec.MAX_CHUNK_BYTES
        states.begin_run(run_id)

        def declining(config: RunConfig, violations) -> "SiteRun":
            # a SiteRun without a trainer: it declines every assignment, naming `violations`
            return cls(settings, run_id, config, None, None, audit, states, counters, stopping, policy,
                       tuple(violations))

        def refused_run(config: RunConfig, violations) -> "SiteRun":
            for violation in violations:
                log.error("%s: run %s: %s", settings.site, run_id, violation)
                audit.refusal(run_id, reply.header.round, "join", violation.reason, violation.detail)
            return declining(config, violations)

        def unworkable(config: RunConfig, detail: str, public: str) -> "SiteRun":
            # the whole reason in the site's log and audit; the coordinator is told `public`
            log.error("%s: run %s: cannot take part: %s", settings.site, run_id, detail)
            audit.refusal(run_id, reply.header.round, "join", "run unworkable", detail[:1000])
            return declining(config, [Violation("unworkable", public[:400], source="run")])

        try:
            config = RunConfig.from_json(reply.run_config_json)
        except ConfigError as err:
            # a coordinator that sends a run config this release cannot read (or a hostile one):
            # the site refuses the run and stays up for the next one
            return unworkable(RunConfig(), f"run config: {err}", f"run config: {err}")
        audit.config(run_id, json.loads(reply.run_config_json), policy)
        refused = tuple(join_violations(settings, policy, config, reply))
        if refused:
            return refused_run(config, refused)
        try:
            # a python task is imported from what this site installed, at the version the run
            # announces, before anything is downloaded or built (TaskMismatch otherwise)
            backbone = None
            if task_for(config, settings.site_data).hosts_backbone:
                backbone = fetch_backbone(settings, stub, reply, config, audit, counters)
            trainer = LocalTrainer(settings.site, run_id, config, settings.state_dir, settings.data_root,
                                   epsilon_budget=settings.epsilon_budget, backbone=backbone, audit=audit,
                                   site_data=settings.site_data)
        except RunUnworkable as err:
            # the run's own settings cannot work here (its privacy target at this site's N, a
            # partition that leaves the site out): the site refuses this run and stays up for the
            # next; the coordinator is told which setting, not this site's numbers
            return unworkable(config, str(err), err.public)
        except ConfigError as err:
            # the run's task, its options or this site's data do not fit: nothing is sent, the
            # refusal is in the site's own log, and the agent stops with the error
            audit.refusal(run_id, reply.header.round, "join", "task", str(err)[:1000])
            raise
        if trainer.manifest.digest() != reply.manifest_digest:
            raise RuntimeError("the coordinator's factor manifest differs from the model this site builds "
                               "(incompatible software versions)")
        if noisy := site_policy.check_noise(policy, trainer.privacy.noise_multiplier):
            return refused_run(config, noisy)   # nothing trained or sent: the trainer is dropped
        # before any global state is loaded, the shared tensors are the round-0 model
        initial = {n: t.detach().numpy().copy() for n, t in shared_state(trainer.model).items()}
        states.measure_from(run_id, config, initial)
        run_history(settings).record(run_id, config.privacy.budget_for(settings.site, settings.epsilon_budget)
                                     if site_policy.privacy_level(config) == site_policy.RECORD else None)
        roles = {e.name: convert.ROLE_FROM_PB[e.role] for e in reply.manifest}
        guard = EgressGuard(roles, settings.site, patterns=policy.egress.tensor_patterns,
                            max_bytes=policy.egress.max_upload_bytes)
        return cls(settings, run_id, config, trainer, guard, audit, states, counters, stopping, policy)


def run_history(settings: AgentSettings) -> site_policy.RunHistory:
    return site_policy.RunHistory(Path(settings.state_dir) / "policy-runs.json")


def join_violations(settings: AgentSettings, policy: SitePolicy, config: RunConfig,
                    reply: pb.JoinReply) -> list[Violation]:
    """What the site policy says of a run, from the JoinReply alone (nothing downloaded yet)."""
    shared = {e.name: int(np.prod(e.shape, dtype=np.int64)) * np.dtype(e.dtype).itemsize
              for e in reply.manifest if convert.ROLE_FROM_PB[e.role] == "shared"}
    return site_policy.check_join(policy, config, site=settings.site, shared=shared,
                                  backbone_sha256=reply.backbone_sha256, history=run_history(settings),
                                  run_id=reply.header.run_id, epsilon_budget=settings.epsilon_budget,
                                  backbone_bytes=reply.backbone_bytes)


def fetch_backbone(settings: AgentSettings, stub, reply: pb.JoinReply, config: RunConfig, audit,
                   counters: SiteCounters) -> Path:
    """The run's frozen backbone: from this site's cache when a file with its digest is there,
    else streamed from the coordinator once and checked against the digest the run names."""
    if not reply.backbone_sha256 or reply.backbone_sha256 != task_for(config).backbone_sha256():
        raise RunUnworkable("vln.backbone_sha256: the coordinator announces a backbone other than the one its run "
                            "config names")
    downloaded = []

    def download(offset: int):
        downloaded.append(offset)
        for chunk in stub.DownloadBackbone(pb.BackboneRequest(
                header=convert.header(reply.header.run_id, reply.header.round, settings.site),
                sha256=reply.backbone_sha256, offset=offset), timeout=settings.rpc_timeout_s):
            counters.bytes_downloaded += len(chunk.data)
            yield chunk.offset, chunk.data

    try:
        path = backbone_cache.fetch(Path(settings.state_dir) / "backbones", reply.backbone_sha256,
                                    reply.backbone_bytes, download)
    except backbone_cache.BackboneCacheError as err:
        # the hosted file is not what the run names, or does not fit here: this run cannot go on at
        # this site, and the site stays up for the next (where it is free on this disk stays local)
        raise RunUnworkable(f"vln.backbone: {err}", public=f"vln.backbone: the hosted backbone "
                            f"{reply.backbone_sha256[:16]}… could not be downloaded and checked here "
                            "(this site's log says why)") from None
    if downloaded:
        audit.boundary(reply.header.run_id, "receive", reply.header.round, "backbone", reply.backbone_sha256,
                       nbytes=reply.backbone_bytes)
    return path
