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
import json
import logging
import os
import threading
import time
from typing import Callable, Mapping

import numpy as np

from coordinator import messages
from coordinator import round_records as records
from coordinator.answers import Answers
from coordinator.admission import check_capabilities
from coordinator.attempt import Attempt, Session
from coordinator.audit_trail import AuditTrail
from coordinator.errors import Code, Refusal
from coordinator.run_status import Participants, run_status, site_metrics
from coordinator.secagg_round import SecAggDriver
from coordinator.state_file import StateFile
from coordinator.store import Store
from coordinator.strategy import Strategy
from security.dp import accounting as dp_accounting
from kt_core.config import RunConfig

log = logging.getLogger(__name__)

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
        self.answers = Answers(self)
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
        records.record_privacy(self, attempt.round, self.strategy.privacy_round(attempt.round))
        seconds = time.monotonic() - attempt.started
        records.audit_attempt_end(self, attempt, "unmasked", "completed")
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

    def _abort(self, attempt: Attempt, reason: str) -> bool:
        """Record an aborted attempt; True when the round is to be retried (after a backoff that
        doubles with each abort), False when the run failed instead."""
        records.audit_attempt_end(self, attempt, "aborted", f"aborted: {reason}")
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
