"""The participant agent: join, hold the task stream, train on each task, upload the update.

If the coordinator goes away the agent reconnects by itself with capped exponential backoff; it
exits when the run finishes or when the coordinator refuses its identity.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np

from kt_core import codec
from kt_core.config import RunConfig
from kt_core.distill.device import capabilities as device_capabilities
from kt_core.exposition import Metric, MetricsServer
from kt_core.heartbeat import HEARTBEAT_FILE, write_heartbeat
from kt_core.wire import convert, transport
from kt_core.wire import federation_pb2 as pb
from kt_core.wire.federation_pb2_grpc import ParticipantServiceStub
from participant.secure_update import SecureUpdate, peer_verify_keys
from participant import backbone_cache
from participant.trainer import BudgetExceeded, LocalTrainer
from participant.vln_trainer import VLNTrainer
from security.audit import AuditLog, AuditError
from security.egress import EgressGuard, EgressRefused
from security.pki.primitives import load_private_key
from security.secagg import SecAggError

log = logging.getLogger(__name__)

SOFTWARE_VERSION = "ktfed 0.1.0"
# Refusals of who we are: retrying cannot help, an operator must act.
FATAL_CODES = {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED}
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
    def __init__(self, settings: AgentSettings):
        self.settings = settings
        self.site = settings.site
        self.run_id = ""
        self.trainer: LocalTrainer | None = None
        self.guard: EgressGuard | None = None
        self.chunk_bytes = codec.MAX_CHUNK_BYTES
        self.cached: tuple[str, dict[str, np.ndarray]] | None = None  # (digest, global shared state)
        self.secure: SecureUpdate | None = None   # this round's update while SecAgg steps go on
        self.audit: AuditLog | None = None          # this site's audit log (none with --insecure)
        self.finished = False
        self._stop = threading.Event()
        self._rng = random.Random()
        self.status = "starting"  # connecting | connected | training | finished | stopped
        self.round = 0
        self.rounds_trained = 0
        self.rounds_declined = 0
        self.bytes_sent = 0
        self.bytes_downloaded = 0
        self.reconnects = 0
        self.metrics = MetricsServer(settings.metrics_listen, self.collect_metrics) if settings.metrics_listen else None

    STATUSES = ("starting", "connecting", "connected", "training", "finished", "stopped")

    def collect_metrics(self) -> list[Metric]:
        site = {"site": self.site}
        status = Metric("ktfed_participant_status", "gauge", "1 for the agent's current status")
        for name in self.STATUSES:
            status.add(1 if name == self.status else 0, {**site, "status": name})
        privacy = self.trainer.privacy_metrics() if self.trainer is not None else {}
        return [
            status,
            Metric("ktfed_participant_round", "gauge", "the last round this site saw").add(self.round, site),
            Metric("ktfed_participant_rounds_trained_total", "counter", "rounds trained and uploaded").add(
                self.rounds_trained, site),
            Metric("ktfed_participant_rounds_declined_total", "counter", "rounds declined (privacy budget)").add(
                self.rounds_declined, site),
            Metric("ktfed_participant_bytes_sent_total", "counter", "update bytes accepted by the coordinator").add(
                self.bytes_sent, site),
            Metric("ktfed_participant_bytes_received_total", "counter", "global-state bytes downloaded").add(
                self.bytes_downloaded, site),
            Metric("ktfed_participant_reconnects_total", "counter", "connections lost and retried").add(
                self.reconnects, site),
            Metric("ktfed_participant_epsilon_spent", "gauge", "cumulative epsilon in this site's ledger").add(
                float(privacy.get("epsilon", 0.0)), site),
            Metric("ktfed_participant_epsilon_budget", "gauge", "this site's epsilon budget (0: none)").add(
                float(privacy.get("epsilon_budget", 0.0)), site),
        ]

    def stop(self) -> None:
        self._stop.set()

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

    def run(self) -> int:
        tls = self.settings.tls
        if tls is not None and self.settings.audit:
            try:
                self._open_audit()
            except AuditError as err:
                log.error("%s: cannot open the audit log: %s", self.site, err)
                return 4
        try:
            return self._run_audited()
        finally:
            if self.audit is not None:
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

    def _open_audit(self) -> None:
        tls = self.settings.tls
        self._audit_files = self._tls_stamp()
        self.audit = AuditLog.open(Path(self.settings.state_dir) / "audit", self.site, tls.key, tls.cert,
                                   sync="on_head")

    def _run(self) -> int:
        failures = 0
        while not self._stop.is_set():
            files = self._tls_stamp()
            if self.audit is not None and files != self._audit_files:
                # a rotated certificate: sign from now on with the key the coordinator sees us use
                self.audit.close("certificate rotated")
                self._open_audit()
            try:
                with transport.open_channel(self.settings.coordinator, self.settings.tls,
                                            insecure=self.settings.insecure) as channel:
                    joined = self._session(ParticipantServiceStub(channel))
                if self.finished:
                    return 0
                failures = 0 if joined else failures + 1
            except grpc.RpcError as err:
                if err.code() in FATAL_CODES and self._tls_stamp() != files:
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

    def _tls_stamp(self):
        """(inode, mtime) of the certificate files: a rotation replaces them by rename."""
        tls = self.settings.tls
        if tls is None:
            return None
        out = []
        for path in (tls.ca_cert, tls.cert, tls.key):
            try:
                st = Path(path).stat()
                out.append((st.st_ino, st.st_mtime_ns))
            except OSError:
                out.append(None)
        return tuple(out)

    # -- one connection -------------------------------------------------------------------------
    def _session(self, stub: ParticipantServiceStub) -> bool:
        reply = stub.Join(pb.JoinRequest(
            header=convert.header(participant_id=self.site),
            capabilities=local_capabilities()),
            timeout=self.settings.rpc_timeout_s)
        self._prepare(stub, reply)
        self.round = reply.header.round
        self._set_status("connected")
        log.info("%s: joined run %s at round %d", self.site, self.run_id, reply.header.round)
        stream = stub.Tasks(pb.TaskStreamRequest(header=convert.header(self.run_id, participant_id=self.site)))
        try:
            for task in stream:
                if self._stop.is_set():
                    break
                kind = task.WhichOneof("kind")
                if kind == "finished":
                    log.info("%s: run %s finished (%s)", self.site, self.run_id, task.finished.reason)
                    self.finished = True
                    self._finish(stub, task.finished)
                    stub.Leave(pb.LeaveRequest(header=convert.header(self.run_id, participant_id=self.site),
                                               reason="run finished"), timeout=10)
                    return True
                if kind == "round":
                    self._round(stub, task.round)
                elif kind == "secagg":
                    self._secagg_step(stub, task.secagg)
        finally:
            stream.cancel()
        log.warning("%s: task stream ended without a verdict; the coordinator is going away", self.site)
        return True

    def _prepare(self, stub: ParticipantServiceStub, reply: pb.JoinReply) -> None:
        """On the first join of a run: build the site's model and check it matches the manifest."""
        if reply.header.run_id == self.run_id and self.trainer is not None:
            return
        config = RunConfig.from_json(reply.run_config_json)
        self.run_id = reply.header.run_id
        self.chunk_bytes = reply.max_chunk_bytes or codec.MAX_CHUNK_BYTES
        if config.task.kind == "vln":
            backbone = self._fetch_backbone(stub, reply)
            self.trainer = VLNTrainer(self.site, self.run_id, config, self.settings.state_dir, backbone,
                                      epsilon_budget=self.settings.epsilon_budget)
        else:
            self.trainer = LocalTrainer(self.site, self.run_id, config, self.settings.state_dir,
                                        self.settings.data_root, epsilon_budget=self.settings.epsilon_budget)
        if self.trainer.manifest.digest() != reply.manifest_digest:
            raise RuntimeError("the coordinator's factor manifest differs from the model this site builds "
                               "(incompatible software versions)")
        if self.audit is not None:
            self.audit.log_config(run=self.run_id, config=json.loads(reply.run_config_json))
        roles = {e.name: convert.ROLE_FROM_PB[e.role] for e in reply.manifest}
        self.guard = EgressGuard(roles, self.site)
        self.cached = None

    def _fetch_backbone(self, stub: ParticipantServiceStub, reply: pb.JoinReply) -> Path:
        """The run's frozen backbone: from this site's cache when a file with its digest is there,
        else streamed from the coordinator once and checked against the digest the run names."""
        config_digest = RunConfig.from_json(reply.run_config_json).vln.backbone_sha256
        if not reply.backbone_sha256 or reply.backbone_sha256 != config_digest:
            raise RuntimeError("the coordinator announces a backbone other than the one its run config names")

        downloaded = []

        def download(offset: int):
            downloaded.append(offset)
            for chunk in stub.DownloadBackbone(pb.BackboneRequest(
                    header=convert.header(reply.header.run_id, reply.header.round, self.site),
                    sha256=reply.backbone_sha256, offset=offset), timeout=self.settings.rpc_timeout_s):
                self.bytes_downloaded += len(chunk.data)
                yield chunk.offset, chunk.data

        path = backbone_cache.fetch(Path(self.settings.state_dir) / "backbones", reply.backbone_sha256,
                                    reply.backbone_bytes, download)
        if self.audit is not None and downloaded:
            self.audit.log_boundary(run=reply.header.run_id, round=reply.header.round, direction="receive",
                                    sender=self.settings.coordinator_name, receiver=self.site, message="backbone",
                                    sha256=reply.backbone_sha256, nbytes=reply.backbone_bytes)
        return path

    def _download(self, stub: ParticipantServiceStub, task: pb.RoundTask) -> dict[str, np.ndarray]:
        return self._fetch_state(stub, task.header.round, task.global_state_digest)[1]

    def _fetch_state(self, stub: ParticipantServiceStub, round_no: int,
                     digest: str) -> tuple[str, dict[str, np.ndarray]]:
        """(digest, tensors) of a global state. An empty digest asks for the coordinator's current
        one (after RunFinished, which names none: the run's final state); the reply's header names
        it, and the tensors are checked against that name as against a task's."""
        if digest and self.cached and self.cached[0] == digest:
            return self.cached
        responses = stub.DownloadState(pb.StateRequest(header=convert.header(self.run_id, round_no, self.site),
                                                       global_state_digest=digest),
                                       timeout=self.settings.rpc_timeout_s)
        first = next(responses)
        digest = digest or first.header.global_state_digest
        specs = [convert.spec_from_pb(s) for s in first.header.tensors]
        if codec.state_digest(specs) != digest:
            raise RuntimeError("the global state's header does not match the digest the task named")
        assembler = codec.TensorAssembler(specs, max_chunk_bytes=self.chunk_bytes)
        for message in responses:
            assembler.add(message.chunk.name, message.chunk.offset, message.chunk.data)
        state = assembler.finish()
        self.bytes_downloaded += assembler.bytes_received
        self._boundary("receive", round_no, "state", digest, specs)
        self.cached = (digest, state)
        return self.cached

    def _decline(self, stub: ParticipantServiceStub, task: pb.RoundTask, err: BudgetExceeded) -> None:
        """Refuse the round (the hard stop): record it in the ledger, tell the coordinator why."""
        round_no = task.header.round
        accountant = self.trainer.privacy.accountant
        self.trainer.ledger.record_decline(run_id=self.run_id, round_no=round_no, task_id=task.task_id.hex(),
                                           reason=str(err), spent=err.spent, would_be=err.would_be,
                                           budget=err.budget, accountant=accountant)
        self.rounds_declined += 1
        log.warning("%s: round %d declined: %s", self.site, round_no, err)
        token, token_seq = self._countersign(task)
        sent = self._boundary("send", round_no, "decline", hashlib.sha256(task.task_id).hexdigest())
        try:
            stub.Decline(pb.DeclineRequest(header=convert.header(self.run_id, round_no, self.site),
                                           task_id=task.task_id, code="budget_exhausted", reason=str(err),
                                           epsilon_spent=err.spent, epsilon_budget=err.budget,
                                           epsilon_would_be=err.would_be, audit_countersignature=token),
                         timeout=self.settings.rpc_timeout_s)
        except grpc.RpcError as rpc_err:
            self._undelivered((token_seq, sent), f"{rpc_err.code().name}: {rpc_err.details()}")
            if rpc_err.code() in ROUND_CODES:
                log.warning("%s: round %d: decline refused: %s %s", self.site, round_no, rpc_err.code().name,
                            rpc_err.details())
                return
            raise

    def _round(self, stub: ParticipantServiceStub, task: pb.RoundTask) -> None:
        round_no = task.header.round
        self.round = round_no
        self._set_status("training")
        try:
            self._train_and_upload(stub, task, round_no)
        finally:
            self._set_status("connected")

    def _train_and_upload(self, stub: ParticipantServiceStub, task: pb.RoundTask, round_no: int) -> None:
        self._boundary("receive", round_no, "task", task.global_state_digest)
        state = self._download(stub, task)
        started = time.perf_counter()  # local compute from here: the framework's overhead is the rest
        trainer = self.trainer
        trainer.load_global(state)
        before = trainer.evaluate()
        t = task.train
        try:
            result = trainer.train(t.local_epochs, t.batch_size, t.learning_rate, t.max_steps, t.seed,
                                   round_no=round_no, task_id=task.task_id.hex())
        except BudgetExceeded as err:
            self._decline(stub, task, err)
            return
        after = trainer.evaluate()
        if self.audit is not None and getattr(trainer, "last_entry", None) is not None:
            self.audit.log_dp_ledger(trainer.last_entry)
        trainer.save_private()
        update = trainer.update(state)
        if os.environ.get("KTFED_FAULT_LEAK_PRIVATE") == "1":  # fault injection: the guard must stop this
            update.update(trainer.private_tensors())
        try:
            self.guard.check(update, destination=f"coordinator {self.settings.coordinator}")
        except EgressRefused as err:
            log.error("%s: round %d: update not sent (egress guard)", self.site, round_no)
            if self.audit is not None:
                self.audit.log_refusal(run=self.run_id, round=round_no, peer=self.settings.coordinator_name,
                                       message="update", reason="egress guard", detail=str(err))
            return
        metrics = {"accuracy_before": before["accuracy"], "accuracy": after["accuracy"],
                   "loss": result.loss, "train_seconds": result.seconds,
                   "compute_seconds": time.perf_counter() - started, **trainer.privacy_metrics()}
        if task.secure_aggregation:
            self._begin_secure(stub, task, update, metrics)
            return
        header = pb.UploadHeader(header=convert.header(self.run_id, round_no, self.site), task_id=task.task_id,
                                 base_state_digest=task.global_state_digest, num_samples=trainer.num_samples,
                                 metrics=metrics)
        token, token_seq = self._countersign(task)
        header.audit_countersignature = token
        specs, messages = convert.upload_messages(header, update, self.chunk_bytes)
        sent = self._boundary("send", round_no, "update", codec.state_digest(specs), specs)
        pause = float(os.environ.get("KTFED_FAULT_PAUSE_BEFORE_UPLOAD_S", "0") or 0)
        if pause:  # fault-injection point for the tests that kill a site mid-round
            log.warning("%s: fault injection: pausing %.1fs before uploading round %d", self.site, pause, round_no)
            self._stop.wait(pause)
        try:
            receipt = stub.Upload(messages, timeout=self.settings.rpc_timeout_s)
        except grpc.RpcError as err:
            self._undelivered((token_seq, sent), f"{err.code().name}: {err.details()}")
            if err.code() in ROUND_CODES:
                log.warning("%s: round %d: update refused: %s %s", self.site, round_no, err.code().name, err.details())
                return
            raise
        self.rounds_trained += 1
        self.bytes_sent += receipt.bytes_received
        log.info("%s: round %d: accuracy %.3f -> %.3f, loss %.3f, sent %d bytes in %d shared tensors (%.2fs)",
                 self.site, round_no, before["accuracy"], after["accuracy"], result.loss,
                 receipt.bytes_received, len(specs), time.perf_counter() - started)

    # -- secure aggregation -----------------------------------------------------------------------
    def _begin_secure(self, stub: ParticipantServiceStub, task: pb.RoundTask, update: dict[str, np.ndarray],
                      metrics: dict[str, float]) -> None:
        """Encode the update and advertise keys; the coordinator opens each later step on the stream."""
        tls = self.settings.tls
        config = self.trainer.config
        try:
            signer = verify_keys = None
            if config.secagg.active:
                if tls is None:
                    raise SecAggError("the active option needs this site's certificate key (no --insecure)")
                signer = load_private_key(Path(tls.key).read_bytes(), "site key")
                verify_keys = peer_verify_keys(task.peer_certificates, task.roster, Path(tls.ca_cert).read_bytes())
            secure = SecureUpdate(self.site, self.run_id, task.header.round, task.task_id, task.roster,
                                  task.global_state_digest, config, update, self.trainer.num_samples,
                                  self.trainer.shared_specs(), metrics=metrics, signer=signer,
                                  verify_keys=verify_keys)
        except SecAggError as err:
            log.error("%s: round %d: not taking part in secure aggregation: %s", self.site, task.header.round, err)
            return
        self._export_secure_input(secure)
        self.secure = secure
        secure.task = task
        self._submit_secure(stub, secure, "advertise", secure.advertise())

    def _secagg_step(self, stub: ParticipantServiceStub, message: pb.SecAggMessage) -> None:
        secure = self.secure
        step = convert.SECAGG_STEP_FROM_PB.get(message.step, f"unknown({message.step})")
        if secure is None or message.task_id != secure.task_id or message.header.round != secure.round:
            log.warning("%s: ignoring a secure aggregation %s message for a round this site is not in",
                        self.site, step)
            return
        self._boundary("receive", secure.round, f"secagg/{step}", hashlib.sha256(message.payload).hexdigest(),
                       nbytes=len(message.payload))
        try:
            payload = secure.answer(step, message.payload)
        except SecAggError as err:
            if self.audit is not None:
                self.audit.log_refusal(run=self.run_id, round=secure.round, peer=self.settings.coordinator_name,
                                       message=f"secagg/{step}", reason="secure aggregation rule", detail=str(err))
            # The client refuses whatever would break the protocol's guarantees (e.g. a request for
            # both secrets of one peer): this site leaves the round rather than comply.
            log.error("%s: round %d: refusing the coordinator's secure aggregation %s: %s", self.site,
                      secure.round, step, err)
            self.secure = None
            return
        self._submit_secure(stub, secure, step, payload)
        if secure.done:
            self.secure = None
            self.rounds_trained += 1
            log.info("%s: round %d: secure aggregation complete (update masked, %d entries)", self.site,
                     secure.round, secure.encoded.shape[0])

    def _submit_secure(self, stub: ParticipantServiceStub, secure: SecureUpdate, step: str, payload: bytes) -> None:
        metrics = secure.metrics if step == "masked_input" else None
        token, token_seq = self._countersign(secure.task) if step == "advertise" else (b"", None)
        parts = list(convert.secagg_submission(convert.header(self.run_id, secure.round, self.site), secure.task_id,
                                               step, payload, self.chunk_bytes, metrics))
        parts[0].audit_countersignature = token
        sent = self._boundary("send", secure.round, f"secagg/{step}", hashlib.sha256(payload).hexdigest(),
                              nbytes=len(payload))
        try:
            receipt = stub.SubmitSecAgg(iter(parts), timeout=self.settings.rpc_timeout_s)
        except grpc.RpcError as err:
            self._undelivered((token_seq, sent), f"{err.code().name}: {err.details()}")
            if err.code() in ROUND_CODES or err.code() == grpc.StatusCode.INVALID_ARGUMENT:
                log.warning("%s: round %d: secure aggregation %s refused: %s %s", self.site, secure.round, step,
                            err.code().name, err.details())
                self.secure = None
                return
            raise
        self.bytes_sent += receipt.bytes_received
        if os.environ.get("KTFED_FAULT_EXIT_AFTER_SECAGG_STEP") == step:
            # fault injection: the tests kill a site at a chosen protocol step
            log.warning("%s: fault injection: exiting after secure aggregation step %s", self.site, step)
            os._exit(17)

    def _export_secure_input(self, secure: SecureUpdate) -> None:
        """Test hook: KTFED_TEST_EXPORT_SECAGG_INPUT=DIR writes this site's plain update and encoded
        input to DIR (on the site), so a test can check the coordinator's sum and that nothing of
        the individual update reached the coordinator. Never set in production."""
        folder = os.environ.get("KTFED_TEST_EXPORT_SECAGG_INPUT")
        if not folder:
            return
        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        np.save(out / f"{self.site}-round{secure.round}-update.npy", secure.flat, allow_pickle=False)
        np.save(out / f"{self.site}-round{secure.round}-encoded.npy", secure.encoded, allow_pickle=False)

    # -- the audit log ----------------------------------------------------------------------------
    def _boundary(self, direction: str, round_no: int, message: str, sha256: str, specs=(),
                  nbytes: int | None = None):
        """One message crossing the boundary to or from the coordinator; the coordinator logs the
        other end with the same name and digest. Returns the entry's seq (None without a log)."""
        if self.audit is None:
            return None
        me, peer = self.site, self.settings.coordinator_name
        sender, receiver = (me, peer) if direction == "send" else (peer, me)
        return self.audit.log_boundary(run=self.run_id, round=round_no, direction=direction, sender=sender,
                                       receiver=receiver, message=message, sha256=sha256, tensors=specs,
                                       nbytes=nbytes).seq

    def _countersign(self, task: pb.RoundTask) -> tuple[bytes, int | None]:
        """Countersign the coordinator's audit head named in the task, right before the message
        that carries the token is sent: (token, its entry's seq)."""
        if self.audit is None or not task.audit_head_hash:
            return b"", None
        token = self.audit.countersign((task.audit_head_seq, task.audit_head_hash),
                                       subject=self.settings.coordinator_name, run=self.run_id,
                                       round=task.header.round)
        return token, self.audit.head().seq

    def _undelivered(self, seqs, reason: str) -> None:
        """Entries of messages that did not reach the coordinator: no receipt is to be expected."""
        if self.audit is None:
            return
        for seq in seqs:
            if seq is not None:
                self.audit.log_undelivered(ref_seq=seq, reason=reason[:300])

    # -- the end of the run ----------------------------------------------------------------------
    def _finish(self, stub: ParticipantServiceStub, finished: pb.RunFinished) -> None:
        """The site's model after the run is the final global state (aggregated after the last
        round, so no task ever carried it) with this site's private factors, not its last local
        model: fetch that state; the trainer loads it, writes the adapted model and evaluates it."""
        final = None
        try:
            final = self._fetch_state(stub, finished.header.round, "")
        except (grpc.RpcError, RuntimeError, ValueError) as err:  # codec.WireError is a ValueError
            detail = f"{err.code().name}: {err.details()}" if isinstance(err, grpc.RpcError) else str(err)
            log.error("%s: the run's final global state could not be fetched (%s): no adapted model is written, "
                      "and the final evaluation measures this site's last local model", self.site, detail)
        self.trainer.conclude(self.settings.state_dir, final, round_no=finished.header.round, reason=finished.reason)
