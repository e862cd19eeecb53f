"""The participant agent: join, hold the assignment stream, hand each message to its handler.

The agent owns the connection: capped exponential backoff when the coordinator goes away, the
heartbeat file the probes read, the metrics endpoint, the site's audit trail across certificate
rotations. What a round does is participant.round's (download -> train -> update -> guard ->
send) and participant.secagg_update's (each SecAgg step); what the site's model and data are is
its trainer's. It exits when the run finishes or when the coordinator refuses its identity.
"""
from __future__ import annotations

import logging
import random
import threading
from pathlib import Path

import grpc

from kt_core.distill.device import capabilities as device_capabilities
from kt_core.wire.exposition import Metric, MetricsServer
from kt_core.heartbeat import HEARTBEAT_FILE, write_heartbeat
from kt_core.wire import convert, transport
from kt_core.wire import federation_pb2 as pb
from kt_core.wire.federation_pb2_grpc import ParticipantServiceStub
from participant import policy as site_policy
from participant.audit_trail import NoAudit, SiteAudit, certificate_stamp
from participant.round import Round
from participant.secagg_update import SecAggSession
from participant.site_run import AgentSettings, GlobalStates, SiteCounters, SiteRun
from participant.trainer import LocalTrainer
from security.audit import AuditError

log = logging.getLogger(__name__)

__all__ = ["AgentSettings", "ParticipantAgent", "FATAL_CODES", "backoff_delay", "local_capabilities"]

SOFTWARE_VERSION = "ktfed 0.1.0"
# Refusals of who we are: retrying cannot help, an operator must act.
FATAL_CODES = {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED}


class _Unreachable(Exception):
    """The policy's handshake with the coordinator found no one: back off like a lost stream."""


def local_capabilities() -> pb.Capabilities:
    """This machine's compute, as the coordinator shows it (kt_core.distill.device reads it)."""
    caps = device_capabilities()
    accelerators = [f"cuda:{d['index']} {d['name']}, {d['memory_bytes'] / 2**30:.0f} GiB" for d in caps["cuda_devices"]]
    return pb.Capabilities(software_version=SOFTWARE_VERSION, cpu_count=caps["cpu_count"], accelerators=accelerators,
                           memory_bytes=caps["memory_bytes"] or 0,
                           accelerator_memory_bytes=sum(d["memory_bytes"] for d in caps["cuda_devices"]),
                           torch_version=caps["torch"])


def backoff_delay(attempt: int, initial: float, cap: float, rng: random.Random) -> float:
    """Capped exponential backoff with full jitter (so restarting sites do not stampede)."""
    return rng.uniform(0, min(cap, initial * (2 ** attempt)))


class ParticipantAgent:
    STATUSES = ("starting", "connecting", "connected", "training", "finished", "stopped")

    def __init__(self, settings: AgentSettings):
        self.settings = settings
        self.site = settings.site
        self.run_id = ""
        self.trainer: LocalTrainer | None = None
        self.site_run: SiteRun | None = None      # the run this site has joined
        self.secagg: SecAggSession | None = None   # this round's secure aggregation while its steps go on
        self.audit = NoAudit()                     # this site's audit trail (a SiteAudit once opened)
        self.counters = SiteCounters()
        self.states = GlobalStates(settings, self.audit, self.counters)
        self.finished = False
        self._stop = threading.Event()
        self._rng = random.Random()
        self.status = "starting"  # one of STATUSES
        self.round = 0
        self.reconnects = 0
        self.metrics = MetricsServer(settings.metrics_listen, self.collect_metrics) if settings.metrics_listen else None
        self.policy = None   # the site policy, loaded when the agent runs

    def collect_metrics(self) -> list[Metric]:
        site, c = {"site": self.site}, self.counters
        status = Metric("ktfed_site_status", "gauge", "1 for the agent's current status")
        for name in self.STATUSES:
            status.add(1 if name == self.status else 0, {**site, "status": name})
        privacy = self.trainer.privacy_metrics() if self.trainer is not None else {}
        return [
            status,
            Metric("ktfed_site_round", "gauge", "the last round this site saw").add(self.round, site),
            Metric("ktfed_site_rounds_contributed_total", "counter", "rounds trained and uploaded").add(
                c.rounds_contributed, site),
            Metric("ktfed_site_rounds_declined_total", "counter", "rounds declined (privacy budget)").add(
                c.rounds_declined, site),
            Metric("ktfed_site_update_bytes_total", "counter", "update bytes the coordinator accepted").add(
                c.bytes_uploaded, site),
            Metric("ktfed_site_state_bytes_total", "counter", "global-state bytes downloaded").add(
                c.bytes_downloaded, site),
            Metric("ktfed_site_reconnects_total", "counter", "connections lost and retried").add(
                self.reconnects, site),
            Metric("ktfed_site_epsilon_spent", "gauge", "cumulative epsilon in this site's ledger").add(
                float(privacy.get("epsilon", 0.0)), site),
            Metric("ktfed_site_epsilon_budget", "gauge", "this site's epsilon budget (0: none)").add(
                float(privacy.get("epsilon_budget", 0.0)), site),
        ]

    def stop(self) -> None:
        self._stop.set()

    # -- liveness ---------------------------------------------------------------------------------
    def _beat(self) -> None:
        """Refresh <state>/heartbeat.json: the Kubernetes probes read its age (liveness) and
        status (readiness: connected or training)."""
        path = Path(self.settings.state_dir) / HEARTBEAT_FILE
        try:
            write_heartbeat(path, self.site, self.status, self.round)
        except OSError as err:
            log.warning("%s: cannot write the heartbeat file %s: %s", self.site, path, err)

    def _set_status(self, status: str) -> None:
        self.status = status
        self._beat()

    def _heartbeat_loop(self) -> None:
        while not self._stop.wait(self.settings.heartbeat_s):
            self._beat()

    # -- the agent's life -------------------------------------------------------------------------
    def run(self) -> int:
        """Raises participant.ConfigError when the site policy file is wrong."""
        self.policy = self.settings.load_policy()
        log.info("%s: site policy %s (sha256 %s)", self.site, self.policy.source, self.policy.digest()[:16])
        tls = self.settings.tls
        if tls is not None and self.settings.audit:
            try:
                self.audit = SiteAudit(Path(self.settings.state_dir) / "audit", self.site, tls,
                                       self.settings.coordinator_name)
            except AuditError as err:
                log.error("%s: cannot open the audit log: %s", self.site, err)
                return 4
            self.states.audit = self.audit
        try:
            return self._run_audited()
        finally:
            self.audit.close("finished" if self.finished else "shutdown")

    def _run_audited(self) -> int:
        self._set_status("connecting")
        threading.Thread(target=self._heartbeat_loop, name="heartbeat", daemon=True).start()
        if self.metrics is not None:
            self.metrics.start()
        try:
            return self._run()
        finally:
            self._set_status("finished" if self.finished else "stopped")
            if self.metrics is not None:
                self.metrics.stop()

    def _run(self) -> int:
        failures = 0
        while not self._stop.is_set():
            files = certificate_stamp(self.settings.tls)
            self.audit.rotate_if_needed()
            try:
                if not self._coordinator_allowed():
                    return 3
                with transport.open_channel(self.settings.coordinator, self.settings.tls,
                                            insecure=self.settings.insecure) as channel:
                    joined = self._session(ParticipantServiceStub(channel))
                if self.finished or self._stop.is_set():
                    return 0
                failures = 0 if joined else failures + 1
            except _Unreachable as err:
                log.warning("%s: coordinator unreachable (%s)", self.site, err)
                failures += 1
            except grpc.RpcError as err:
                if err.code() in FATAL_CODES and certificate_stamp(self.settings.tls) != files:
                    # Our certificate was rotated (and the old one perhaps revoked) while this
                    # connection was open: the next connection presents the new one.
                    log.warning("%s: refused (%s: %s) and the certificate files changed: reconnecting with "
                                "the new certificate", self.site, err.code().name, err.details())
                elif err.code() in FATAL_CODES:
                    log.error("%s: coordinator refused us: %s %s", self.site, err.code().name, err.details())
                    return 3
                log.warning("%s: coordinator unreachable or stream lost (%s: %s)", self.site,
                            err.code().name, err.details())
                failures += 1
            self.reconnects += 1
            self._set_status("connecting")
            delay = backoff_delay(failures, self.settings.backoff_initial_s, self.settings.backoff_max_s, self._rng)
            log.info("%s: reconnecting in %.2fs", self.site, delay)
            self._stop.wait(delay)
        return 0

    def _coordinator_allowed(self) -> bool:
        """The site policy on the coordinator itself (CA fingerprint, certificate name): False,
        logged and audited, when this is not the coordinator the site agreed to talk to."""
        try:
            refused = site_policy.check_coordinator(self.policy, self.settings.coordinator, self.settings.tls)
        except OSError as err:
            raise _Unreachable(str(err)) from None
        for violation in refused:
            log.error("%s: not joining: %s", self.site, violation)
            self.audit.refusal(self.run_id, 0, "join", violation.reason, violation.detail)
        return not refused

    # -- one connection -------------------------------------------------------------------------
    def _session(self, stub: ParticipantServiceStub) -> bool:
        reply = stub.Join(pb.JoinRequest(header=convert.header(site_id=self.site),
                                         capabilities=local_capabilities()),
                          timeout=self.settings.rpc_timeout_s)
        self._prepare(stub, reply)
        self.round = reply.header.round
        self._set_status("connected")
        log.info("%s: joined run %s at round %d", self.site, self.run_id, reply.header.round)
        stream = stub.Assignments(pb.AssignmentStreamRequest(header=convert.header(self.run_id, site_id=self.site)))
        try:
            for assignment in stream:
                if self._stop.is_set():
                    break
                kind = assignment.WhichOneof("kind")
                if kind == "finished" and self.site_run.refused:
                    # not this site's run: the site stays up for the coordinator's next run, but
                    # countersigns the sealed log all the same, since the site's refusals are in it
                    log.info("%s: run %s ended (%s) without this site (its policy refused the run)", self.site,
                             self.run_id, assignment.finished.reason)
                    self._leave(stub, assignment.finished, "run finished without this site (its policy refused it)")
                    return False
                if kind == "finished":
                    log.info("%s: run %s finished (%s)", self.site, self.run_id, assignment.finished.reason)
                    self.finished = True
                    self._finish(stub, assignment.finished)
                    self._leave(stub, assignment.finished, "run finished")
                    return True
                if kind == "round":
                    self._round(stub, assignment.round)
                elif kind == "secagg":
                    self._secagg_step(assignment.secagg)
        finally:
            stream.cancel()
        if self._stop.is_set():
            return True   # this site was asked to stop: the stream ended on our side, not the coordinator's
        log.warning("%s: assignment stream ended without a verdict; the coordinator is going away", self.site)
        return True

    def _leave(self, stub: ParticipantServiceStub, finished: pb.RunFinished, reason: str) -> None:
        """Countersign the coordinator's sealed audit head and say goodbye to the run."""
        seal = self.audit.countersign_seal(self.run_id, finished)
        stub.Leave(pb.LeaveRequest(header=convert.header(self.run_id, site_id=self.site), reason=reason,
                                   audit_countersignature=seal), timeout=10)

    def _prepare(self, stub: ParticipantServiceStub, reply: pb.JoinReply) -> None:
        """On the first join of a run: build the site's model and check it matches the manifest."""
        if reply.header.run_id == self.run_id and self.site_run is not None:
            return
        self.site_run = SiteRun.join(self.settings, stub, reply, audit=self.audit, states=self.states,
                                     counters=self.counters, stopping=self._stop, policy=self.policy)
        self.run_id, self.trainer = self.site_run.run_id, self.site_run.trainer

    def _round(self, stub: ParticipantServiceStub, assignment: pb.RoundAssignment) -> None:
        self.round = assignment.header.round
        self._set_status("training")
        try:
            self._train_and_upload(stub, assignment)
        finally:
            self._set_status("connected")

    def _train_and_upload(self, stub: ParticipantServiceStub, assignment: pb.RoundAssignment) -> None:
        self.secagg = Round(self.site_run, stub, assignment).run()

    def _secagg_step(self, message: pb.SecAggMessage) -> None:
        if self.secagg is None or not self.secagg.answers(message):
            step = convert.SECAGG_STEP_FROM_PB.get(message.step, f"unknown({message.step})")
            log.warning("%s: ignoring a secure aggregation %s message for a round this site is not in",
                        self.site, step)
            return
        if not self.secagg.step(message):
            self.secagg = None

    # -- the end of the run ----------------------------------------------------------------------
    def _finish(self, stub: ParticipantServiceStub, finished: pb.RunFinished) -> None:
        """The site's model after the run is the final global state (aggregated after the last
        round, so no assignment ever carried it) with this site's private factors, not its last local
        model: fetch that state; the trainer loads it, writes the adapted model and evaluates it."""
        final = None
        try:
            final = self.states.fetch(stub, self.run_id, finished.header.round, "", completed=finished.header.round)
        except (grpc.RpcError, RuntimeError, ValueError) as err:  # codec.WireError is a ValueError
            detail = f"{err.code().name}: {err.details()}" if isinstance(err, grpc.RpcError) else str(err)
            log.error("%s: the run's final global state could not be fetched or was refused (%s): no adapted "
                      "model is written, and the final evaluation measures this site's last local model",
                      self.site, detail)
        self.trainer.conclude(self.settings.state_dir, final, round_no=finished.header.round, reason=finished.reason)
