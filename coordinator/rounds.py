"""The round state machine: select, push task, collect, aggregate, persist, next.

Plain threads and a condition variable; no gRPC objects. The servicers call `connect`,
`disconnect`, `check_upload`, `submit` and `state_for`; the engine's own thread drives rounds.
Refusals are raised as `Refusal(code, message)` and turned into gRPC statuses by the servicer.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping

import grpc
import numpy as np
from cryptography import x509

from coordinator import secagg_round
from coordinator.audit_trail import AuditTrail, CountersignatureError
from coordinator.secagg_round import DuplicateSubmission, OutOfPhase, SecAggRound
from coordinator.store import StateFile, Store, UploadRecord
from coordinator.strategy import Strategy
from security.dp import accounting as dp_accounting
from security.dp import user_level
from security.secagg import SecAggError
from kt_core import codec
from kt_core.config import RunConfig
from kt_core.wire import convert
from kt_core.wire import federation_pb2 as pb

log = logging.getLogger(__name__)

MAX_METRICS = 32
MAX_ACCELERATORS = 16


class Refusal(Exception):
    """A request the coordinator will not act on; `code` becomes the gRPC status."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


@dataclass
class Session:
    """One participant's open task stream. `None` on the queue ends the stream."""

    participant_id: str
    queue: "queue.Queue[pb.Task | None]" = field(default_factory=queue.Queue)
    open: bool = True


@dataclass
class Attempt:
    """One try at a round. An aborted round is retried as a new attempt with a new task id."""

    round: int
    task_id: bytes
    selected: frozenset[str]
    deadline: float            # time.monotonic()
    deadline_unix_ms: int
    started: float
    uploads: dict[str, UploadRecord] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    dropped: set[str] = field(default_factory=set)
    declined: dict[str, str] = field(default_factory=dict)   # participant -> reason
    closed: bool = False
    secagg: SecAggRound | None = None   # set when the round runs under secure aggregation
    secagg_summary: dict | None = None  # what secure aggregation did, for the record
    audit_head: tuple[int, str] = (0, "")   # the coordinator's audit head the task names

    def awaiting(self) -> set[str]:
        return set(self.selected) - set(self.uploads) - self.dropped - set(self.declined)


@dataclass
class ParticipantInfo:
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


class RoundEngine:
    def __init__(self, store: Store, run_id: str, config: RunConfig, shared_specs: Mapping[str, tuple[str, tuple[int, ...]]],
                 strategy: Strategy, *, on_round: Callable[[int], None] | None = None,
                 trail: AuditTrail | None = None):
        self.store = store
        self.run_id = run_id
        self.config = config
        self.fed = config.federation
        self.shared_specs = dict(shared_specs)   # name -> (dtype, shape), the SHARED part of the manifest
        self.strategy = strategy
        self.on_round = on_round
        self.trail = trail or AuditTrail(None, "coordinator")
        self.rounds_completed, state, self.global_digest = store.last_round(run_id)
        self._set_global(state, self.global_digest)
        self.state = "running"
        self.sessions: dict[str, Session] = {}
        self.participants: dict[str, ParticipantInfo] = {s: ParticipantInfo() for s in self.fed.sites}
        for upload in store.uploads(run_id):
            info = self.participants.setdefault(upload["participant_id"], ParticipantInfo())
            info.rounds_contributed += 1
            info.bytes_uploaded += upload["bytes"]
        # restart: each site's last reported epsilon and its declines come back from the store
        for rec in store.rounds(run_id):
            for pid in rec.contributors:
                self.participants.setdefault(pid, ParticipantInfo()).note_privacy(
                    {k.split("/", 1)[1]: v for k, v in rec.metrics.items() if k.startswith(pid + "/")})
        for d in store.declines(run_id):
            self._note_decline(d["participant_id"], d["code"], d["reason"], d["epsilon_spent"], d["epsilon_budget"])
        self.privacy = config.privacy
        if self.privacy.enabled:
            store.record_privacy_params(run_id, json.dumps(dataclasses.asdict(self.privacy), sort_keys=True),
                                        self.privacy.accountant, dp_accounting.accountant_version())
        self.attempt: Attempt | None = None
        self.certificates: dict[str, bytes] = {}   # participant -> PEM it connected with
        self._cond = threading.Condition()
        self._stop = threading.Event()

    # -- the global state ----------------------------------------------------------------------
    def _set_global(self, state: Mapping[str, np.ndarray], digest: str) -> None:
        # The global state lives in its file only: downloads stream it from there and the next
        # aggregate reads it block by block, so no copy of the model stays in memory between rounds.
        self._global_file = state if isinstance(state, StateFile) and state.digest == digest \
            else self.store.state_file(self.run_id, digest)
        self.global_digest = digest

    @property
    def global_state(self) -> StateFile:
        """The current global state (a mapping that reads its tensors from disk on demand)."""
        return self._global_file

    def state_for(self, digest: str) -> StateFile:
        with self._cond:
            if digest != self.global_digest:
                raise Refusal(grpc.StatusCode.FAILED_PRECONDITION,
                              f"state {digest[:16]}… is not the current global state {self.global_digest[:16]}…")
            return self._global_file

    # -- sessions ------------------------------------------------------------------------------
    def connect(self, participant_id: str) -> Session:
        with self._cond:
            if self.state != "running":
                raise Refusal(grpc.StatusCode.FAILED_PRECONDITION, f"run {self.run_id} is {self.state}")
            old = self.sessions.get(participant_id)
            if old is None and len(self.sessions) >= self.fed.max_participants:
                raise Refusal(grpc.StatusCode.RESOURCE_EXHAUSTED,
                              f"federation.max_participants: run {self.run_id} already has {len(self.sessions)} "
                              f"participants connected, the most it allows; {participant_id} is refused")
            if old is not None:  # a reconnect replaces the stale stream
                old.open = False
                old.queue.put(None)
            session = Session(participant_id)
            self.sessions[participant_id] = session
            self.participants.setdefault(participant_id, ParticipantInfo()).connected = True
            attempt = self.attempt
            if attempt and not attempt.closed and participant_id in attempt.selected \
                    and participant_id not in attempt.uploads and self._can_still_answer(attempt, participant_id):
                attempt.dropped.discard(participant_id)  # back in time: it may still contribute
                self.trail.sent(self.run_id, attempt.round, participant_id, "task", self.global_digest)
                session.queue.put(self._task(attempt))
            self._cond.notify_all()
            log.info("participant %s connected (%d connected)", participant_id, len(self.sessions))
            return session

    @staticmethod
    def _can_still_answer(attempt: Attempt, participant_id: str) -> bool:
        """A secure round can take a site back only before it advertised keys: its protocol
        state did not survive the lost connection."""
        sa = attempt.secagg
        return sa is None or (sa.step == "advertise" and participant_id not in sa.received)

    def disconnect(self, session: Session) -> None:
        with self._cond:
            session.open = False
            if self.sessions.get(session.participant_id) is not session:
                return  # already replaced by a newer stream
            del self.sessions[session.participant_id]
            self.participants[session.participant_id].connected = False
            attempt = self.attempt
            if attempt and not attempt.closed and session.participant_id in attempt.awaiting():
                attempt.dropped.add(session.participant_id)
                log.warning("participant %s dropped out of round %d", session.participant_id, attempt.round)
            self._cond.notify_all()
            log.info("participant %s disconnected (%d connected)", session.participant_id, len(self.sessions))

    # -- uploads -------------------------------------------------------------------------------
    def check_upload(self, participant_id: str, header: pb.UploadHeader) -> Attempt:
        """Everything that can be refused before a byte of tensor data is accepted."""
        with self._cond:
            attempt = self._attempt_answered_by(participant_id, header.header.round, header.task_id, "upload")
            if attempt.secagg is not None:
                raise Refusal(grpc.StatusCode.FAILED_PRECONDITION,
                              f"round {attempt.round} runs under secure aggregation: the update travels as "
                              "masked SecAgg steps (SubmitSecAgg), never as a plain upload")
            if time.monotonic() > attempt.deadline:
                raise Refusal(grpc.StatusCode.DEADLINE_EXCEEDED, f"round {attempt.round} is past its deadline")
        if header.base_state_digest != self.global_digest:
            raise Refusal(grpc.StatusCode.FAILED_PRECONDITION,
                          "update computed from a global state other than the current one")
        if header.num_samples <= 0:
            raise Refusal(grpc.StatusCode.INVALID_ARGUMENT, "num_samples must be positive")
        self._check_metrics(header.metrics)
        self._check_specs([convert.spec_from_pb(s) for s in header.tensors])
        return attempt

    def _attempt_answered_by(self, participant_id: str, round_no: int, task_id: bytes, what: str) -> Attempt:
        """The open attempt that an upload or decline answers, or a refusal saying why not.
        Call with the lock held."""
        attempt = self.attempt
        if attempt is None or attempt.closed:
            raise Refusal(grpc.StatusCode.FAILED_PRECONDITION, "no round is collecting updates")
        if round_no < attempt.round:
            raise Refusal(grpc.StatusCode.FAILED_PRECONDITION,
                          f"stale round {round_no}: round {attempt.round} is in progress")
        if round_no > attempt.round:
            raise Refusal(grpc.StatusCode.FAILED_PRECONDITION,
                          f"round {round_no} has not started: round {attempt.round} is in progress")
        if participant_id not in attempt.selected:
            raise Refusal(grpc.StatusCode.PERMISSION_DENIED,
                          f"{participant_id} was not selected for round {attempt.round}")
        if task_id != attempt.task_id:
            raise Refusal(grpc.StatusCode.FAILED_PRECONDITION,
                          f"task id does not belong to the current attempt of round {attempt.round} "
                          f"(a replayed or superseded {what})")
        if participant_id in attempt.uploads:
            raise Refusal(grpc.StatusCode.ALREADY_EXISTS,
                          f"{participant_id} already uploaded its update for round {attempt.round} (replay)")
        if participant_id in attempt.declined:
            raise Refusal(grpc.StatusCode.ALREADY_EXISTS,
                          f"{participant_id} already declined round {attempt.round}")
        return attempt

    # -- secure aggregation ---------------------------------------------------------------------
    def check_secagg(self, participant_id: str, round_no: int, task_id: bytes, step: str, size: int) -> Attempt:
        """Everything that can be refused before a SecAgg payload is read; returns the attempt."""
        with self._cond:
            attempt = self._attempt_answered_by(participant_id, round_no, task_id, f"secure aggregation {step}")
            sa = attempt.secagg
            if sa is None:
                raise Refusal(grpc.StatusCode.FAILED_PRECONDITION,
                              f"round {attempt.round} does not run under secure aggregation")
            try:
                sa.check_open(participant_id, step)
            except SecAggError as err:
                raise _secagg_refusal(err) from None
            limit = sa.max_payload(step)
            if not 0 < size <= limit:
                raise Refusal(grpc.StatusCode.RESOURCE_EXHAUSTED if size > limit else grpc.StatusCode.INVALID_ARGUMENT,
                              f"{step}: declared payload of {size} bytes is outside 1..{limit}")
            return attempt

    def secagg_submit(self, attempt: Attempt, participant_id: str, step: str, payload: bytes,
                      metrics: Mapping[str, float], countersignature: bytes = b"") -> None:
        """Hand one participant's answer to the open SecAgg step."""
        if step == "masked_input":
            self._check_metrics(metrics)
        with self._cond:
            if attempt is not self.attempt or attempt.closed:
                raise Refusal(grpc.StatusCode.FAILED_PRECONDITION,
                              f"round {attempt.round} closed while the {step} was in flight")
            try:
                attempt.secagg.receive(participant_id, step, payload, metrics)
            except SecAggError as err:
                raise _secagg_refusal(err) from None
            self._audit_received(attempt, participant_id, f"secagg/{step}", hashlib.sha256(payload).hexdigest(),
                                 countersignature=countersignature, nbytes=len(payload))
            self._cond.notify_all()
        log.info("round %d: secure aggregation %s from %s (%d bytes)", attempt.round, step, participant_id,
                 len(payload))

    def _audit_received(self, attempt: Attempt, pid: str, message: str, sha256: str, specs=(),
                        countersignature: bytes = b"", nbytes: int | None = None) -> None:
        try:
            self.trail.received(self.run_id, attempt.round, pid, message, sha256, specs, nbytes=nbytes,
                                countersignature=countersignature, certificate=self.certificates.get(pid))
        except CountersignatureError as err:
            raise Refusal(grpc.StatusCode.INVALID_ARGUMENT, f"audit countersignature refused: {err}") from None

    def note_state_sent(self, participant_id: str, round_no: int, digest: str, specs) -> None:
        """A global state streamed to a site (DownloadState), for the audit log."""
        self.trail.sent(self.run_id, round_no, participant_id, "state", digest, specs)

    # -- declines -----------------------------------------------------------------------------
    def decline(self, participant_id: str, request: pb.DeclineRequest) -> Attempt:
        """A selected site will not train this round (e.g. its privacy budget): it is out of this
        round at once, the coordinator records why and goes on with the others."""
        with self._cond:
            attempt = self._attempt_answered_by(participant_id, request.header.round, request.task_id, "decline")
            code = request.code[:64] or "declined"
            reason = request.reason[:500]
            for value in (request.epsilon_spent, request.epsilon_budget, request.epsilon_would_be):
                if not math.isfinite(value):
                    raise Refusal(grpc.StatusCode.INVALID_ARGUMENT, "decline: epsilon figures must be finite")
            self._audit_received(attempt, participant_id, "decline", hashlib.sha256(request.task_id).hexdigest(),
                                 countersignature=request.audit_countersignature)
            attempt.declined[participant_id] = f"{code}: {reason}"
            attempt.dropped.discard(participant_id)
            self._note_decline(participant_id, code, reason, request.epsilon_spent, request.epsilon_budget)
            self._cond.notify_all()
        self.store.record_decline(self.run_id, attempt.round, participant_id, attempt.task_id.hex(), code, reason,
                                  request.epsilon_spent, request.epsilon_budget, request.epsilon_would_be)
        log.warning("round %d: %s declined (%s): %s", attempt.round, participant_id, code, reason)
        return attempt

    def _note_decline(self, pid: str, code: str, reason: str, spent: float, budget: float) -> None:
        info = self.participants.setdefault(pid, ParticipantInfo())
        info.privacy_status = code if code == "budget_exhausted" else f"declined:{code}"
        info.decline_reason = reason
        if spent or budget:
            info.epsilon_spent, info.epsilon_budget = spent, budget

    def _check_specs(self, specs: list[codec.TensorSpec]) -> None:
        names = [s.name for s in specs]
        for spec in specs:
            if spec.name not in self.shared_specs:
                raise Refusal(grpc.StatusCode.INVALID_ARGUMENT,
                              f"tensor {spec.name!r} is not declared shared in the factor manifest")
            dtype, shape = self.shared_specs[spec.name]
            if spec.dtype != dtype:
                raise Refusal(grpc.StatusCode.INVALID_ARGUMENT,
                              f"tensor {spec.name!r}: dtype {spec.dtype} but the manifest declares {dtype}")
            if tuple(spec.shape) != tuple(shape):
                raise Refusal(grpc.StatusCode.INVALID_ARGUMENT,
                              f"tensor {spec.name!r}: shape {list(spec.shape)} but the manifest declares {list(shape)}")
        if len(set(names)) != len(names):
            raise Refusal(grpc.StatusCode.INVALID_ARGUMENT, "a tensor is declared twice")
        missing = sorted(set(self.shared_specs) - set(names))
        if missing:
            raise Refusal(grpc.StatusCode.INVALID_ARGUMENT, f"update lacks shared tensor {missing[0]!r}")

    @staticmethod
    def _check_metrics(metrics: Mapping[str, float]) -> None:
        if len(metrics) > MAX_METRICS:
            raise Refusal(grpc.StatusCode.INVALID_ARGUMENT, f"more than {MAX_METRICS} metrics")
        for key, value in metrics.items():
            if not key or len(key) > 64 or not math.isfinite(value):
                raise Refusal(grpc.StatusCode.INVALID_ARGUMENT, f"metric {key[:64]!r} is invalid or not finite")

    def submit(self, attempt: Attempt, record: UploadRecord, update: Mapping[str, np.ndarray],
               metrics: Mapping[str, float], countersignature: bytes = b"") -> None:
        """Fold a fully received and validated update into the round's aggregate. The update may
        be a spooled upload on disk: the strategy reads it block by block. The fold runs under the
        engine's lock so that an update is counted in the aggregate exactly when it is recorded."""
        with self._cond:
            if attempt is not self.attempt or attempt.closed:
                raise Refusal(grpc.StatusCode.FAILED_PRECONDITION,
                              f"round {attempt.round} closed while the update was in flight")
            if record.participant_id in attempt.uploads:
                raise Refusal(grpc.StatusCode.ALREADY_EXISTS,
                              f"{record.participant_id} already uploaded for round {attempt.round} (replay)")
            self._audit_received(attempt, record.participant_id, "update", record.update_digest, record.specs,
                                 countersignature)
            user_level_dp = self.privacy.enabled and self.privacy.mode in ("central", "distributed")
            # user-level DP-FedAvg: equal weights, so one site's clipped update moves the mean by <= S/n
            self.strategy.add(update, 1 if user_level_dp else record.num_samples)
            attempt.uploads[record.participant_id] = record
            self.participants.setdefault(record.participant_id, ParticipantInfo()).note_privacy(metrics)
            attempt.dropped.discard(record.participant_id)
            for key, value in metrics.items():
                attempt.metrics[f"{record.participant_id}/{key}"] = float(value)
            self._cond.notify_all()
            log.info("round %d: update from %s (%d samples, %d bytes)", attempt.round,
                     record.participant_id, record.num_samples, record.bytes)

    # -- the engine's own loop ------------------------------------------------------------------
    def stop(self, reason: str = "stopped") -> None:
        with self._cond:
            if self.state == "running":
                self.state = reason
            self._stop.set()
            self._cond.notify_all()

    def run(self) -> None:
        """Drive rounds until the run's round count is reached or `stop()` is called."""
        while not self._stop.is_set() and self.rounds_completed < self.fed.rounds:
            attempt = self._start_attempt()
            if attempt is None:
                break
            if attempt.secagg is not None:
                problem = self._collect_secure(attempt)
            else:
                self._collect(attempt)
                problem = None
            if self._stop.is_set():
                break
            if problem is None and len(attempt.uploads) < self.fed.min_participants:
                problem = f"only {len(attempt.uploads)} update(s), {self.fed.min_participants} required"
            if problem is None:
                self._complete(attempt)
            else:
                self._abort(attempt, problem)
        with self._cond:
            if self.rounds_completed >= self.fed.rounds:
                self.state = "finished"
                self.store.set_run_state(self.run_id, "finished")
                log.info("run %s finished after %d rounds", self.run_id, self.rounds_completed)
            if self.state in ("finished", "stopped"):
                self._broadcast_finished(self.state)
            else:  # shutting down: end the streams without a verdict, so participants reconnect
                for session in self.sessions.values():
                    session.queue.put(None)

    def _start_attempt(self) -> Attempt | None:
        with self._cond:
            while True:
                while len(self.sessions) < self.fed.min_participants and not self._stop.is_set():
                    self._cond.wait(timeout=0.5)
                # Enough sites to run, but give the others a short window to connect: starting
                # without a site that is seconds away would leave it out of a whole round.
                gather_until = time.monotonic() + self.fed.gather_timeout_s
                while (len(self.sessions) < len(self.fed.sites) and not self._stop.is_set()
                       and (left := gather_until - time.monotonic()) > 0):
                    self._cond.wait(timeout=min(left, 0.5))
                if self._stop.is_set():
                    return None
                if len(self.sessions) >= self.fed.min_participants:
                    break
            selected = frozenset(sorted(self.sessions)[: self.fed.max_participants])
            now = time.monotonic()
            attempt = Attempt(round=self.rounds_completed + 1, task_id=os.urandom(16), selected=selected,
                              deadline=now + self.fed.round_timeout_s,
                              deadline_unix_ms=int((time.time() + self.fed.round_timeout_s) * 1000), started=now)
            if self.config.secagg.enabled:
                attempt.secagg = SecAggRound(self.run_id, attempt.round, tuple(sorted(selected)),
                                             secagg_round.protocol_settings(self.config), self.shared_specs,
                                             self.config.secagg_weight_scale(),
                                             verify_keys=self._verify_keys(selected))
            self.strategy.begin(self.global_state)
            self.attempt = attempt
            attempt.audit_head = self.trail.head()
            task = self._task(attempt)
            for pid in selected:
                self.trail.sent(self.run_id, attempt.round, pid, "task", self.global_digest)
                self.sessions[pid].queue.put(task)
            log.info("round %d started with %s", attempt.round, ", ".join(sorted(selected)))
            return attempt

    def _task(self, attempt: Attempt) -> pb.Task:
        train = self.config.train
        task = pb.RoundTask(
            header=convert.header(self.run_id, attempt.round),
            task_id=attempt.task_id, global_state_digest=self.global_digest,
            train=pb.TrainSettings(local_epochs=train.epochs, batch_size=train.batch_size,
                                   learning_rate=train.lr, max_steps=train.max_steps or 0,
                                   seed=self.fed.seed * 100_003 + attempt.round),
            deadline_unix_ms=attempt.deadline_unix_ms,
            audit_head_seq=attempt.audit_head[0], audit_head_hash=attempt.audit_head[1])
        if attempt.secagg is not None:
            task.secure_aggregation = True
            task.roster.extend(attempt.secagg.roster)
            if self.config.secagg.active:
                for pid in attempt.secagg.roster:
                    task.peer_certificates[pid] = self.certificates[pid]
        return pb.Task(round=task)

    def note_capabilities(self, participant_id: str, caps: pb.Capabilities) -> None:
        """What a site reported at join, bounded before it is kept and shown."""
        if len(caps.accelerators) > MAX_ACCELERATORS or any(len(a) > 200 for a in caps.accelerators) \
                or len(caps.software_version) > 100 or len(caps.torch_version) > 100:
            raise Refusal(grpc.StatusCode.INVALID_ARGUMENT,
                          f"capabilities: at most {MAX_ACCELERATORS} accelerators and short version strings")
        with self._cond:
            info = self.participants.setdefault(participant_id, ParticipantInfo())
            info.capabilities = pb.Capabilities()
            info.capabilities.CopyFrom(caps)

    # -- secure aggregation rounds ---------------------------------------------------------------
    def note_certificate(self, participant_id: str, pem: bytes) -> None:
        """The certificate a participant connected with: SecAgg's active option relays it to the
        other sites and verifies that site's signatures with it."""
        with self._cond:
            self.certificates[participant_id] = pem

    def _verify_keys(self, selected) -> dict | None:
        if not self.config.secagg.active:
            return None
        return {pid: x509.load_pem_x509_certificate(self.certificates[pid]).public_key() for pid in selected}

    def _secagg_task(self, attempt: Attempt, step: str, payload: bytes) -> pb.Task:
        return pb.Task(secagg=pb.SecAggMessage(header=convert.header(self.run_id, attempt.round),
                                               task_id=attempt.task_id, step=convert.SECAGG_STEP_TO_PB[step],
                                               payload=payload))

    def _collect_secure(self, attempt: Attempt) -> str | None:
        """Drive the SecAgg steps; None when the sum is folded in, else why the attempt aborts.

        The advertise step waits as long as the round (sites advertise once their update is
        ready); every later step waits `secagg.step_timeout_s`. A site whose stream drops, or that
        does not answer in time, is a dropout: the protocol recovers its masks if t others remain."""
        sa = attempt.secagg
        deadline = attempt.deadline
        while True:
            with self._cond:
                while not self._stop.is_set():
                    alive = (set(self.sessions) & attempt.selected) - set(attempt.declined)
                    if not sa.waiting_for(alive) or time.monotonic() >= deadline:
                        break
                    self._cond.wait(timeout=min(deadline - time.monotonic(), 0.5))
                if self._stop.is_set():
                    attempt.closed = True
                    return "stopped"
                if sa.step == "unmask":
                    attempt.closed = True
                    break
                try:
                    out = sa.close()
                except SecAggError as err:
                    attempt.closed = True
                    return f"secure aggregation: {err}"
                for pid, (step, payload) in out.items():
                    if pid in self.sessions:
                        self.trail.sent_bytes(self.run_id, attempt.round, pid, f"secagg/{step}", payload)
                        self.sessions[pid].queue.put(self._secagg_task(attempt, step, payload))
                deadline = time.monotonic() + self.config.secagg.step_timeout_s
                log.info("round %d: secure aggregation step %s opened for %d participant(s)",
                         attempt.round, sa.step, len(out))
        try:
            result = sa.finish()
        except SecAggError as err:
            return f"secure aggregation: {err}"
        if result.weight <= 0:
            return "secure aggregation: the survivors' weights sum to zero"
        self.strategy.add_aggregate(result.weighted_sum, result.weight)
        with self._cond:
            for pid in result.survivors:
                # what the record holds of a site: the size and digest of its masked vector
                attempt.uploads[pid] = UploadRecord(pid, attempt.task_id.hex(), 0, (), sa.bytes_in.get(pid, 0),
                                                    sa.payload_digests[pid])
                metrics = sa.metrics.get(pid, {})
                self.participants.setdefault(pid, ParticipantInfo()).note_privacy(metrics)
                for key, value in metrics.items():
                    attempt.metrics[f"{pid}/{key}"] = float(value)
            attempt.dropped = set(attempt.selected) - set(result.survivors) - set(attempt.declined)
        attempt.secagg_summary = {
            "roster": list(sa.roster), "threshold": sa.threshold, "neighbours": sa.settings.neighbours,
            "active": sa.settings.active, "survivors": list(result.survivors),
            "dropped_after_sharing_keys": list(result.dropped), "responders": list(result.responders),
            # whose secrets the coordinator reconstructed: the self-mask seeds of the survivors,
            # the mask keys of those who dropped after sharing keys (never both for one site)
            "reconstructed_self_mask_of": list(result.survivors),
            "reconstructed_mask_key_of": list(result.dropped),
            "steps": [{"step": step, "answered": list(a), "missing": list(m)} for step, a, m in sa.history],
            "vector_length": sa.length, "bits": sa.settings.bits, "clip_norm": sa.settings.clip_norm,
            "weight_scale": sa.weight_scale}
        log.info("round %d: secure aggregation unmasked the sum of %d input(s) (t=%d); masks of %s recovered",
                 attempt.round, len(result.survivors), sa.threshold, ", ".join(result.dropped) or "nobody")
        return None

    def _collect(self, attempt: Attempt) -> None:
        with self._cond:
            while attempt.awaiting() and not self._stop.is_set():
                left = attempt.deadline - time.monotonic()
                if left <= 0:
                    late = sorted(attempt.awaiting())
                    log.warning("round %d deadline: leaving out %s", attempt.round, ", ".join(late))
                    attempt.dropped.update(late)
                    break
                self._cond.wait(timeout=min(left, 0.5))
            attempt.closed = True

    def _complete(self, attempt: Attempt) -> None:
        new_state = self.strategy.finish()
        if self.privacy.enabled and self.privacy.mode in ("central", "distributed"):
            new_state = self._user_level_noise(attempt, new_state)
        seconds = time.monotonic() - attempt.started
        self._audit_attempt_end(attempt, "unmasked", "completed")
        digest = self.store.complete_round(self.run_id, attempt.round, new_state, attempt.uploads.values(),
                                           attempt.dropped, seconds, attempt.metrics,
                                           secagg=attempt.secagg_summary)
        with self._cond:
            self._set_global(new_state, digest)
            self.rounds_completed = attempt.round
            for pid, record in attempt.uploads.items():
                info = self.participants.setdefault(pid, ParticipantInfo())
                info.rounds_contributed += 1
                info.bytes_uploaded += record.bytes
                info.last_metrics = {k.split("/", 1)[1]: v for k, v in attempt.metrics.items()
                                     if k.startswith(pid + "/")}
            self.attempt = None
        log.info("round %d completed in %.3fs: %d update(s), dropped %s", attempt.round, seconds,
                 len(attempt.uploads), sorted(attempt.dropped) or "none")
        if self.on_round:
            self.on_round(attempt.round)

    def _user_level_noise(self, attempt: Attempt, new_state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """DP-FedAvg: central mode adds N(0, (z S / n)^2) to the mean (times the server lr, as the
        mean is); distributed mode adds nothing here, the sites added their shares. The user-level
        epsilon of the rounds so far is recorded for the auditor."""
        p = self.privacy
        n = len(attempt.uploads)
        std = 0.0
        if p.mode == "central":
            std = user_level.central_noise_std(p.user_noise_multiplier, p.update_clip_norm, n) * self.fed.server_lr
            new_state = user_level.add_gaussian_noise(new_state, std)
        eps = dp_accounting.epsilons([user_level.user_level_spend(p.user_noise_multiplier, attempt.round)], p.delta)
        self.store.record_privacy_round(self.run_id, attempt.round, p.mode, p.user_noise_multiplier,
                                        p.update_clip_norm, n, std, p.delta, eps["prv"], eps["rdp"],
                                        dp_accounting.accountant_version())
        if self.trail.enabled:
            previous = dp_accounting.epsilons([user_level.user_level_spend(p.user_noise_multiplier,
                                                                           attempt.round - 1)], p.delta) \
                if attempt.round > 1 else {"prv": 0.0}
            self.trail.audit.log_dp(run=self.run_id, round=attempt.round, level="user", sample_rate=1.0,
                                    noise_multiplier=p.user_noise_multiplier, steps=1,
                                    max_grad_norm=p.update_clip_norm, delta=p.delta,
                                    epsilon_round=eps["prv"] - previous["prv"], epsilon_cumulative=eps["prv"],
                                    epsilon_cumulative_rdp=eps["rdp"], accountant="prv",
                                    accountant_version=dp_accounting.accountant_version(),
                                    params={"mode": p.mode, "contributors": n, "central_noise_std": std})
        return new_state

    def _audit_attempt_end(self, attempt: Attempt, secagg_event: str, how: str) -> None:
        sa = attempt.secagg
        if sa is not None:
            missing = {}
            for step, _answered, absent in sa.history:
                for pid in absent:
                    missing.setdefault(pid, step)
            self.trail.secagg(self.run_id, attempt.round, secagg_event, attempt.secagg_summary, missing,
                              sa.threshold, sa.roster)
        self.trail.attempt_closed(attempt.round, how)

    def _abort(self, attempt: Attempt, reason: str) -> None:
        self._audit_attempt_end(attempt, "aborted", f"aborted: {reason}")
        self.store.record_abort(self.run_id, attempt.round, attempt.task_id.hex(), reason)
        log.warning("round %d aborted: %s; it will be retried", attempt.round, reason)
        with self._cond:
            self.attempt = None

    def _broadcast_finished(self, reason: str) -> None:
        finished = pb.Task(finished=pb.RunFinished(header=convert.header(self.run_id, self.rounds_completed),
                                                   reason=reason))
        for session in self.sessions.values():
            session.queue.put(finished)

    # -- status ---------------------------------------------------------------------------------
    def status(self) -> pb.RunStatus:
        with self._cond:
            attempt = self.attempt
            status = pb.RunStatus(
                header=convert.header(self.run_id, self.rounds_completed), state=self.state,
                rounds_completed=self.rounds_completed, rounds_total=self.fed.rounds,
                round_in_progress=attempt.round if attempt and not attempt.closed else 0,
                global_state_digest=self.global_digest,
                aborted_attempts=self.store.aborted_count(self.run_id))
            for pid in sorted(self.participants):
                info = self.participants[pid]
                status.participants.add(participant_id=pid, connected=pid in self.sessions,
                                        rounds_contributed=info.rounds_contributed,
                                        bytes_uploaded=info.bytes_uploaded, last_metrics=info.last_metrics,
                                        privacy_status=info.privacy_status, epsilon_spent=info.epsilon_spent,
                                        epsilon_budget=info.epsilon_budget, decline_reason=info.decline_reason,
                                        capabilities=info.capabilities)
        declined: dict[int, set[str]] = {}
        for d in self.store.declines(self.run_id):
            declined.setdefault(d["round"], set()).add(d["participant_id"])
        for rec in self.store.rounds(self.run_id):
            status.rounds.add(round=rec.round, contributors=rec.contributors, dropped=rec.dropped,
                              bytes_received=rec.bytes_received, seconds=rec.seconds,
                              global_state_digest=rec.state_digest, metrics=rec.metrics,
                              bytes_by_participant=rec.bytes_by_participant,
                              declined=sorted(declined.get(rec.round, ())),
                              secure_aggregation=rec.secagg is not None)
        return status


def _secagg_refusal(err: SecAggError) -> Refusal:
    if isinstance(err, DuplicateSubmission):
        return Refusal(grpc.StatusCode.ALREADY_EXISTS, f"secure aggregation: {err} (replay)")
    if isinstance(err, OutOfPhase):
        return Refusal(grpc.StatusCode.FAILED_PRECONDITION, f"secure aggregation: {err}")
    return Refusal(grpc.StatusCode.INVALID_ARGUMENT, f"secure aggregation: {err}")
