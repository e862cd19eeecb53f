"""The round engine: the loop, the sites' task streams, and each attempt's lifecycle.

Plain threads and a condition variable. The servicers call `connect`, `disconnect`, `check_upload`,
`submit`, `decline` and `state_for` (and the SecAgg driver's `check`/`submit`); the engine's own
thread drives rounds: wait for sites, start an attempt, collect, complete or abort, next. Policy
lives elsewhere: who takes part, with which settings, how updates weigh and combine in the strategy
(coordinator.strategy), what a message may carry in admission, the secure steps in the SecAgg
driver, the status in run_status. Refusals are `coordinator.errors.Refusal`; the wire messages a
stream carries are built in coordinator.messages.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import threading
import time
from typing import Callable, Mapping

import numpy as np

from coordinator import messages
from coordinator.admission import check_capabilities, check_update_header
from coordinator.attempt import Attempt, Session
from coordinator.audit_trail import AuditTrail, CountersignatureError
from coordinator.errors import Code, Refusal
from coordinator.run_status import Participants, run_status, site_metrics
from coordinator.secagg_round import SecAggDriver
from coordinator.state_file import StateFile
from coordinator.store import Store, UploadRecord
from coordinator.strategy import Strategy
from security.dp import accounting as dp_accounting
from kt_core.bounded import escape_field
from kt_core.config import RunConfig

log = logging.getLogger(__name__)

# A decline with this code: the site's privacy budget cannot take another round of this run.
BUDGET_DECLINE = "budget_exhausted"
# How long a second task stream of a site waits for the first to go before it is refused: a site
# that reconnects cancels its old stream first, and that cancellation may still be in flight.
DUPLICATE_GRACE_S = 2.0
MAX_RETRY_BACKOFF_S = 60.0

__all__ = ["Attempt", "RoundEngine", "Session"]


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
        self.participants = Participants.restored(store, run_id, self.fed.sites)
        self.privacy = config.privacy
        if self.privacy.enabled:
            store.record_privacy_params(run_id, json.dumps(dataclasses.asdict(self.privacy), sort_keys=True),
                                        self.privacy.accountant, dp_accounting.accountant_version())
        self.attempt: Attempt | None = None
        # sites that declined for their privacy budget: not selected again while they stay connected
        self.out_of_budget: set[str] = set()
        self.round_aborts = 0   # aborted attempts of the round in progress
        self.certificates: dict[str, bytes] = {}   # participant -> PEM it connected with
        self.seal: tuple[int, str] | None = None   # the audit head that sealed the run, once it ended
        self.secagg = SecAggDriver(self)
        self.cond = threading.Condition()
        self.stopped = threading.Event()

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
        with self.cond:
            if digest != self.global_digest:
                raise Refusal(Code.FAILED_PRECONDITION,
                              f"state {digest[:16]}… is not the current global state {self.global_digest[:16]}…")
            return self._global_file

    # -- sessions ------------------------------------------------------------------------------
    def refuse_duplicate(self, participant_id: str) -> None:
        """Refuse a second agent of a site while its first holds a live task stream (two agents of
        one site flap, each stream replacing the other's). PERMISSION_DENIED: the site stops and says
        so rather than retrying."""
        until = time.monotonic() + DUPLICATE_GRACE_S
        with self.cond:   # re-entrant: connect calls this with the lock held
            while (old := self.sessions.get(participant_id)) is not None and old.open and old.alive() \
                    and (left := until - time.monotonic()) > 0:
                self.cond.wait(timeout=min(left, 0.2))
            old = self.sessions.get(participant_id)
            if old is None or not old.open or not old.alive():
                return
            raise Refusal(Code.PERMISSION_DENIED,
                          f"duplicate session: {participant_id} already has a live task stream with run {self.run_id} "
                          f"(open {time.monotonic() - old.opened:.0f}s); a second agent of {participant_id} is "
                          "refused: stop one of them")

    def connect(self, participant_id: str, alive: Callable[[], bool] | None = None) -> Session:
        with self.cond:
            if self.state != "running":
                raise Refusal(Code.FAILED_PRECONDITION, f"run {self.run_id} is {self.state}")
            self.refuse_duplicate(participant_id)
            old = self.sessions.get(participant_id)
            if old is None and len(self.sessions) >= self.fed.max_participants:
                raise Refusal(Code.RESOURCE_EXHAUSTED,
                              f"federation.max_participants: run {self.run_id} already has {len(self.sessions)} "
                              f"participants connected, the most it allows; {participant_id} is refused")
            if old is not None:  # a reconnect replaces the stale stream
                old.open = False
                old.queue.put(None)
            session = Session(participant_id) if alive is None else Session(participant_id, alive=alive)
            # a site that comes back (restarted, perhaps with a larger budget) is asked again: a
            # second budget decline leaves it out again, and a connected one is never re-asked
            self.out_of_budget.discard(participant_id)
            self.sessions[participant_id] = session
            self.participants[participant_id].connected = True
            attempt = self.attempt
            if attempt and not attempt.closed and participant_id in attempt.selected \
                    and participant_id not in attempt.uploads and self.secagg.can_rejoin(attempt, participant_id):
                attempt.dropped.discard(participant_id)  # back in time: it may still contribute
                self.trail.sent(self.run_id, attempt.round, participant_id, "task", self.global_digest)
                session.queue.put(self._task(attempt))
            self.cond.notify_all()
            log.info("participant %s connected (%d connected)", participant_id, len(self.sessions))
            return session

    def disconnect(self, session: Session) -> None:
        with self.cond:
            session.open = False
            if self.sessions.get(session.participant_id) is not session:
                return  # already replaced by a newer stream
            del self.sessions[session.participant_id]
            self.participants[session.participant_id].connected = False
            attempt = self.attempt
            if attempt and not attempt.closed and session.participant_id in attempt.awaiting():
                attempt.dropped.add(session.participant_id)
                log.warning("participant %s dropped out of round %d", session.participant_id, attempt.round)
            self.cond.notify_all()
            log.info("participant %s disconnected (%d connected)", session.participant_id, len(self.sessions))

    def note_capabilities(self, participant_id: str, caps) -> None:
        """What a site reported at join, bounded before it is kept and shown."""
        check_capabilities(caps)
        with self.cond:
            self.participants.note_capabilities(participant_id, caps)

    def note_certificate(self, participant_id: str, pem: bytes) -> None:
        """The certificate a participant connected with: SecAgg's active option relays it to the
        other sites and verifies that site's signatures with it."""
        with self.cond:
            self.certificates[participant_id] = pem

    # -- what an attempt receives ----------------------------------------------------------------
    def answered_by(self, participant_id: str, round_no: int, task_id: bytes, what: str) -> Attempt:
        """The open attempt that an upload, decline or SecAgg step answers, or a refusal saying why
        not. Call with the lock held."""
        attempt = self.attempt
        if attempt is None or attempt.closed:
            raise Refusal(Code.FAILED_PRECONDITION, "no round is collecting updates")
        attempt.check_answer(participant_id, round_no, task_id, what)
        return attempt

    def check_upload(self, participant_id: str, header) -> Attempt:
        """Everything that can be refused before a byte of tensor data is accepted."""
        with self.cond:
            attempt = self.answered_by(participant_id, header.header.round, header.task_id, "upload")
            if attempt.secagg is not None:
                raise Refusal(Code.FAILED_PRECONDITION,
                              f"round {attempt.round} runs under secure aggregation: the update travels as "
                              "masked SecAgg steps (SubmitSecAgg), never as a plain upload")
            if time.monotonic() > attempt.deadline:
                raise Refusal(Code.DEADLINE_EXCEEDED, f"round {attempt.round} is past its deadline")
        if header.base_state_digest != self.global_digest:
            raise Refusal(Code.FAILED_PRECONDITION, "update computed from a global state other than the current one")
        check_update_header(header, self.shared_specs)
        return attempt

    def submit(self, attempt: Attempt, record: UploadRecord, update: Mapping[str, np.ndarray],
               metrics: Mapping[str, float], countersignature: bytes = b"") -> None:
        """Fold a fully received and validated update into the round's aggregate. The update may
        be a spooled upload on disk: the strategy reads it block by block. The fold runs under the
        engine's lock so that an update is counted in the aggregate exactly when it is recorded."""
        pid = record.participant_id
        with self.cond:
            if attempt is not self.attempt or attempt.closed:
                raise Refusal(Code.FAILED_PRECONDITION, f"round {attempt.round} closed while the update was in flight")
            if pid in attempt.uploads:
                raise Refusal(Code.ALREADY_EXISTS, f"{pid} already uploaded for round {attempt.round} (replay)")
            self.audit_received(attempt, pid, "update", record.update_digest, record.specs, countersignature)
            self.strategy.add(update, self.strategy.weight(record.num_samples))
            attempt.uploads[pid] = record
            self.participants[pid].note_privacy(metrics)
            attempt.dropped.discard(pid)
            attempt.note_metrics(pid, metrics)
            self.cond.notify_all()
            log.info("round %d: update from %s (%d samples, %d bytes)", attempt.round, pid, record.num_samples,
                     record.bytes)

    def decline(self, participant_id: str, request) -> Attempt:
        """A selected site will not train this round (e.g. its privacy budget): it is out of this
        round at once, the coordinator records why and goes on with the others."""
        with self.cond:
            attempt = self.answered_by(participant_id, request.header.round, request.task_id, "decline")
            code, reason = request.code[:64] or "declined", request.reason[:500]
            figures = (request.epsilon_spent, request.epsilon_budget, request.epsilon_would_be)
            if not all(math.isfinite(v) for v in figures):
                raise Refusal(Code.INVALID_ARGUMENT, "decline: epsilon figures must be finite")
            self.audit_received(attempt, participant_id, "decline", hashlib.sha256(request.task_id).hexdigest(),
                                countersignature=request.audit_countersignature)
            attempt.declined[participant_id] = f"{code}: {reason}"
            if code == BUDGET_DECLINE:
                self.out_of_budget.add(participant_id)
            attempt.dropped.discard(participant_id)
            self.participants[participant_id].note_decline(code, reason, *figures[:2])
            self.cond.notify_all()
        self.store.record_decline(self.run_id, attempt.round, participant_id, attempt.task_id.hex(), code, reason,
                                  *figures)
        log.warning("round %d: %s declined (%s): %s", attempt.round, participant_id, escape_field(code),
                    escape_field(reason, 500))
        return attempt

    def audit_received(self, attempt: Attempt, pid: str, message: str, sha256: str, specs=(),
                       countersignature: bytes = b"", nbytes: int | None = None) -> None:
        try:
            self.trail.received(self.run_id, attempt.round, pid, message, sha256, specs, nbytes=nbytes,
                                countersignature=countersignature, certificate=self.certificates.get(pid))
        except CountersignatureError as err:
            raise Refusal(Code.INVALID_ARGUMENT, f"audit countersignature refused: {err}") from None

    def note_state_sent(self, participant_id: str, round_no: int, digest: str, specs) -> None:
        """A global state streamed to a site (DownloadState), for the audit log."""
        self.trail.sent(self.run_id, round_no, participant_id, "state", digest, specs)

    # -- the engine's own loop ------------------------------------------------------------------
    def stop(self, reason: str = "stopped") -> None:
        with self.cond:
            if self.state == "running":
                self.state = reason
            self.stopped.set()
            self.cond.notify_all()

    def run(self) -> None:
        """Drive rounds until the run's round count is reached or `stop()` is called."""
        while not self.stopped.is_set() and self.rounds_completed < self.fed.rounds:
            attempt = self._start_attempt()
            if attempt is None:
                break
            problem = self.secagg.collect(attempt) if attempt.secagg is not None else self._collect(attempt)
            if self.stopped.is_set():
                break
            if problem is None and len(attempt.uploads) < self.fed.min_participants:
                problem = f"only {len(attempt.uploads)} update(s), {self.fed.min_participants} required"
            if problem is None:
                self._complete(attempt)
            elif not self._abort(attempt, problem):
                break
        with self.cond:
            if self.rounds_completed >= self.fed.rounds:
                self.state = "finished"
                self.store.set_run_state(self.run_id, "finished")
                log.info("run %s finished after %d rounds", self.run_id, self.rounds_completed)
            if self.state in ("finished", "stopped") or self.state.startswith("failed: "):
                if self.seal is None:   # sealed once: every site countersigns the same head
                    self.seal = self.trail.seal(self.run_id, self.rounds_completed, self.state)
                finished = messages.finished(self.run_id, self.rounds_completed, self.state, self.seal)
                for session in self.sessions.values():
                    session.queue.put(finished)
            else:  # shutting down: end the streams without a verdict, so participants reconnect
                self.end_streams()

    def end_streams(self) -> None:
        """End every open task stream without a verdict (its site reconnects)."""
        with self.cond:
            for session in self.sessions.values():
                session.queue.put(None)

    def selectable(self) -> dict[str, Session]:
        """The connected sites a round may select: not those whose privacy budget is spent."""
        return {pid: s for pid, s in self.sessions.items() if pid not in self.out_of_budget}

    def _cannot_go_on(self) -> str | None:
        """Why no round of this run can complete any more (too few sites with budget), or None."""
        with_budget = [s for s in self.fed.sites if s not in self.out_of_budget]
        if len(with_budget) >= self.fed.min_participants:
            return None
        return (f"too few sites with privacy budget: {', '.join(sorted(self.out_of_budget))} declined for their "
                f"budget, {len(with_budget)} site(s) left, federation.min_participants = {self.fed.min_participants}")

    def _wait_for_sites(self) -> bool:
        """Wait until enough selectable sites are connected; False when the engine stops first, or
        when too few sites with budget remain for a round ever to complete (the run then fails).
        Call locked."""
        with_budget = [s for s in self.fed.sites if s not in self.out_of_budget]
        if (why := self._cannot_go_on()) is not None:
            self._fail(why)
            return False
        while True:
            while len(self.selectable()) < self.fed.min_participants and not self.stopped.is_set():
                self.cond.wait(timeout=0.5)
            # Enough sites to run, but give the others a short window to connect: starting
            # without a site that is seconds away would leave it out of a whole round.
            gather_until = time.monotonic() + self.fed.gather_timeout_s
            while (len(self.selectable()) < len(with_budget) and not self.stopped.is_set()
                   and (left := gather_until - time.monotonic()) > 0):
                self.cond.wait(timeout=min(left, 0.5))
            if self.stopped.is_set():
                return False
            if len(self.selectable()) >= self.fed.min_participants:
                return True

    def _start_attempt(self) -> Attempt | None:
        with self.cond:
            if not self._wait_for_sites():
                return None
            round_no = self.rounds_completed + 1
            selected = self.strategy.select(self.selectable(), round_no)
            now = time.monotonic()
            attempt = Attempt(round=round_no, task_id=os.urandom(16), selected=selected,
                              deadline=now + self.fed.round_timeout_s,
                              deadline_unix_ms=int((time.time() + self.fed.round_timeout_s) * 1000), started=now)
            if self.config.secagg.enabled:
                attempt.secagg = self.secagg.new_round(round_no, selected)
            self.strategy.begin(self.global_state)
            self.attempt = attempt
            attempt.audit_head = self.trail.head()
            task = self._task(attempt)
            for pid in selected:
                self.trail.sent(self.run_id, attempt.round, pid, "task", self.global_digest)
                self.sessions[pid].queue.put(task)
            log.info("round %d started with %s", attempt.round, ", ".join(sorted(selected)))
            return attempt

    def _task(self, attempt: Attempt):
        sa = attempt.secagg
        roster = sa.roster if sa is not None else ()
        peers = {pid: self.certificates[pid] for pid in roster} if sa is not None and self.config.secagg.active \
            else None
        return messages.round_task(self.run_id, attempt.round, attempt.task_id, self.global_digest,
                                   self.strategy.configure(attempt.round), attempt.deadline_unix_ms,
                                   attempt.audit_head, roster=roster, peer_certificates=peers)

    def push_secagg_step(self, attempt: Attempt, pid: str, step: str, payload: bytes) -> None:
        """Open SecAgg step `step` for one site (the driver calls this with the lock held)."""
        self.trail.sent_bytes(self.run_id, attempt.round, pid, f"secagg/{step}", payload)
        self.sessions[pid].queue.put(messages.secagg_task(self.run_id, attempt.round, attempt.task_id, step, payload))

    def _collect(self, attempt: Attempt) -> None:
        with self.cond:
            # once declines leave too few sites to complete the round, waiting for the others is futile
            while attempt.awaiting() and not self.stopped.is_set() \
                    and len(attempt.selected) - len(attempt.declined) >= self.fed.min_participants:
                left = attempt.deadline - time.monotonic()
                if left <= 0:
                    late = sorted(attempt.awaiting())
                    log.warning("round %d deadline: leaving out %s", attempt.round, ", ".join(late))
                    attempt.dropped.update(late)
                    break
                self.cond.wait(timeout=min(left, 0.5))
            attempt.closed = True

    def _complete(self, attempt: Attempt) -> None:
        new_state = self.strategy.finish()
        self._record_privacy(attempt.round)
        seconds = time.monotonic() - attempt.started
        self._audit_attempt_end(attempt, "unmasked", "completed")
        digest = self.store.complete_round(self.run_id, attempt.round, new_state, attempt.uploads.values(),
                                           attempt.dropped, seconds, attempt.metrics,
                                           secagg=attempt.secagg_summary)
        with self.cond:
            self._set_global(new_state, digest)
            self.rounds_completed = attempt.round
            for pid, record in attempt.uploads.items():
                info = self.participants[pid]
                info.rounds_contributed += 1
                info.bytes_uploaded += record.bytes
                info.last_metrics = site_metrics(attempt.metrics, pid)
            self.attempt = None
            self.round_aborts = 0
        log.info("round %d completed in %.3fs: %d update(s), dropped %s", attempt.round, seconds,
                 len(attempt.uploads), sorted(attempt.dropped) or "none")
        if self.on_round:
            self.on_round(attempt.round)

    def _record_privacy(self, round_no: int) -> None:
        """The user-level DP the strategy applied to this round, for the store and the auditor."""
        r = self.strategy.privacy_round(round_no)
        if r is None:
            return
        self.store.record_privacy_round(self.run_id, round_no, r.mode, r.noise_multiplier, r.clip_norm,
                                        r.contributors, r.noise_std, r.delta, r.epsilon_prv, r.epsilon_rdp,
                                        r.accountant_version)
        if self.trail.enabled:
            self.trail.audit.log_dp(run=self.run_id, round=round_no, level="user", sample_rate=1.0,
                                    noise_multiplier=r.noise_multiplier, steps=1, max_grad_norm=r.clip_norm,
                                    delta=r.delta, epsilon_round=r.epsilon_round_prv, epsilon_cumulative=r.epsilon_prv,
                                    epsilon_cumulative_rdp=r.epsilon_rdp, accountant="prv",
                                    accountant_version=r.accountant_version,
                                    params={"mode": r.mode, "contributors": r.contributors,
                                            "central_noise_std": r.noise_std})

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

    def _abort(self, attempt: Attempt, reason: str) -> bool:
        """Record an aborted attempt; True when the round is to be retried (after a backoff that
        doubles with each abort), False when the run failed instead."""
        self._audit_attempt_end(attempt, "aborted", f"aborted: {reason}")
        self.store.record_abort(self.run_id, attempt.round, attempt.task_id.hex(), reason)
        log.warning("round %d aborted: %s", attempt.round, reason)
        with self.cond:
            self.attempt = None
            self.round_aborts += 1
            if (why := self._cannot_go_on()) is not None:
                self._fail(why)
                return False
            if self.round_aborts >= self.fed.max_attempts:
                self._fail(f"retries exhausted: round {attempt.round} aborted {self.round_aborts} time(s) "
                           f"(federation.max_attempts = {self.fed.max_attempts}); the last: {reason}")
                return False
        delay = min(self.fed.retry_backoff_s * 2 ** min(self.round_aborts - 1, 16), MAX_RETRY_BACKOFF_S)
        log.warning("round %d will be retried in %.1fs (attempt %d of %d)", attempt.round, delay,
                    self.round_aborts + 1, self.fed.max_attempts)
        return not self.stopped.wait(delay)

    def _fail(self, why: str) -> None:
        """End the run for good, saying why: in the run status, the store (a restart does not resume
        it), the audit log and the metrics (the run's state). Call with the lock held."""
        if self.state != "running":
            return
        self.state = f"failed: {why}"
        self.store.set_run_state(self.run_id, "failed")
        self.trail.refusal(self.run_id, self.rounds_completed + 1, self.trail.name, "round", "run_failed", why)
        log.error("run %s failed: %s", self.run_id, why)
        self.stopped.set()
        self.cond.notify_all()

    def status(self):
        """The run's RunStatus message (coordinator.run_status)."""
        return run_status(self)
