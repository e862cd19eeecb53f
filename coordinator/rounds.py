"""The round engine: the loop and each attempt's lifecycle.

Plain threads and one condition variable. The engine's own thread drives rounds: wait for sites,
start an attempt, collect, complete or abort, next. The servicers reach it through its parts: the
sites' assignment streams in `engine.sessions` (coordinator.sessions), the answers in
`engine.answers` (check_upload, submit, decline), the SecAgg steps in `engine.secagg`, and the
global state through `state_for`. Policy lives elsewhere: who takes part, with which settings, how
updates weigh and combine in the strategy (coordinator.strategy), what a message may carry in
admission, the status in run_status. Refusals are `coordinator.errors.Refusal`; the wire messages a
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
from coordinator.attempt import Attempt, name_reasons
from coordinator.audit_trail import AuditTrail
from coordinator.errors import Code, Refusal
from coordinator.run_status import Sites, run_status, site_metrics
from coordinator.secagg_round import SecAggDriver
from coordinator.sessions import Sessions
from coordinator.state_file import StateFile
from coordinator.store import Store
from coordinator.strategy import Strategy
from security.dp import accounting as dp_accounting
from kt_core.config import RunConfig

log = logging.getLogger(__name__)

MAX_RETRY_BACKOFF_S = 60.0

__all__ = ["Attempt", "RoundEngine"]


class RoundEngine:
    def __init__(self, store: Store, run_id: str, config: RunConfig, shared_specs: Mapping[str, tuple[str, tuple[int, ...]]],
                 strategy: Strategy, *, on_round: Callable[[int], None] | None = None,
                 trail: AuditTrail | None = None, manifest_digest: str = ""):
        self.store = store
        self.run_id = run_id
        self.config = config
        self.fed = config.federation
        self.shared_specs = dict(shared_specs)   # name -> (dtype, shape), the SHARED part of the manifest
        self.manifest_digest = manifest_digest   # the run's factor manifest, as JoinReply names it
        self.strategy = strategy
        self.on_round = on_round
        self.trail = trail or AuditTrail(None, "coordinator")
        self.rounds_completed, state, self.global_digest = store.last_round(run_id)
        self._set_global(state, self.global_digest)
        self.state = "running"
        self.sites = Sites.restored(store, run_id, self.fed.sites)
        self.privacy = config.privacy
        if self.privacy.enabled:
            store.record_privacy_params(run_id, json.dumps(dataclasses.asdict(self.privacy), sort_keys=True),
                                        self.privacy.accountant, dp_accounting.accountant_version())
        self.attempt: Attempt | None = None
        self.round_aborts = 0   # aborted attempts of the round in progress
        self.seal: tuple[int, str] | None = None   # the audit head that sealed the run, once it ended
        self.secagg = SecAggDriver(self)
        self.answers = Answers(self)
        self.cond = threading.Condition()
        self.stopped = threading.Event()
        self.sessions = Sessions(self)   # the sites' assignment streams, under the same lock

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

    # -- what a site's stream coming or going means for the open attempt (Sessions calls these) --
    def rejoined(self, site_id: str) -> None:
        """A selected site that reconnects in time gets the open attempt's assignment again and may
        still contribute. Call locked."""
        attempt = self.attempt
        if attempt and not attempt.closed and site_id in attempt.selected \
                and site_id not in attempt.uploads and self.secagg.can_rejoin(attempt, site_id):
            attempt.dropped.discard(site_id)
            self._send_assignment(attempt, (site_id,))

    def dropped(self, site_id: str) -> None:
        """A site awaited by the open attempt lost its stream. Call locked."""
        attempt = self.attempt
        if attempt and not attempt.closed and site_id in attempt.awaiting():
            attempt.dropped.add(site_id)
            log.warning("site %s dropped out of round %d", site_id, attempt.round)

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
            if problem is None and len(attempt.uploads) < self.fed.min_sites:
                problem = f"only {len(attempt.uploads)} update(s), {self.fed.min_sites} required"
                if attempt.declined:   # the operator's first question: why did the others not send?
                    problem += f"; declined: {name_reasons(attempt.declined)}"
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
                self.sessions.broadcast(messages.finished(self.run_id, self.rounds_completed, self.state, self.seal))
            else:  # shutting down: end the streams without a verdict, so the sites reconnect
                self.sessions.end_streams()

    def _start_attempt(self) -> Attempt | None:
        with self.cond:
            if not self.sessions.wait_for_round():
                return None
            round_no = self.rounds_completed + 1
            selected = self.strategy.select(self.sessions.selectable(), round_no)
            now = time.monotonic()
            attempt = Attempt(round=round_no, attempt_id=os.urandom(16), selected=selected,
                              deadline=now + self.fed.round_timeout_s,
                              deadline_unix_ms=int((time.time() + self.fed.round_timeout_s) * 1000), started=now)
            if self.config.secagg.enabled:
                attempt.secagg = self.secagg.new_round(round_no, selected)
            self.strategy.begin(self.global_state)
            self.attempt = attempt
            attempt.audit_head = self.trail.head()
            self._send_assignment(attempt, selected)
            log.info("round %d started with %s", attempt.round, ", ".join(sorted(selected)))
            return attempt

    def _send_assignment(self, attempt: Attempt, site_ids) -> None:
        """The attempt's assignment to each of `site_ids` (connected), audited as sent. Call locked."""
        sa = attempt.secagg
        roster = sa.roster if sa is not None else ()
        peers = {s: self.sessions.certificate(s) for s in roster} if sa is not None and self.config.secagg.active \
            else None
        message = messages.round_assignment(self.run_id, attempt.round, attempt.attempt_id, self.global_digest,
                                            self.strategy.configure(attempt.round), attempt.deadline_unix_ms,
                                            attempt.audit_head, roster=roster, peer_certificates=peers)
        for site_id in site_ids:
            self.trail.sent(self.run_id, attempt.round, site_id, "assignment", self.global_digest)
            self.sessions.push(site_id, message)

    def push_secagg_step(self, attempt: Attempt, site_id: str, step: str, payload: bytes) -> None:
        """Open SecAgg step `step` for one connected site (the driver calls this with the lock held)."""
        self.trail.sent_bytes(self.run_id, attempt.round, site_id, f"secagg/{step}", payload)
        self.sessions.push(site_id, messages.secagg_assignment(self.run_id, attempt.round, attempt.attempt_id,
                                                               step, payload))

    def _collect(self, attempt: Attempt) -> None:
        with self.cond:
            # once declines leave too few sites to complete the round, waiting for the others is futile
            while attempt.awaiting() and not self.stopped.is_set() \
                    and len(attempt.selected) - len(attempt.declined) >= self.fed.min_sites:
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
            for site_id, record in attempt.uploads.items():
                info = self.sites[site_id]
                info.rounds_contributed += 1
                info.bytes_uploaded += record.bytes
                info.last_metrics = site_metrics(attempt.metrics, site_id)
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
        self.store.record_abort(self.run_id, attempt.round, attempt.attempt_id.hex(), reason)
        log.warning("round %d aborted: %s", attempt.round, reason)
        with self.cond:
            self.attempt = None
            self.round_aborts += 1
            if (why := self.sessions.cannot_go_on()) is not None:
                self.fail(why)
                return False
            if self.round_aborts >= self.fed.max_attempts:
                self.fail(f"retries exhausted: round {attempt.round} aborted {self.round_aborts} time(s) "
                           f"(federation.max_attempts = {self.fed.max_attempts}); the last: {reason}")
                return False
        delay = min(self.fed.retry_backoff_s * 2 ** min(self.round_aborts - 1, 16), MAX_RETRY_BACKOFF_S)
        log.warning("round %d will be retried in %.1fs (attempt %d of %d)", attempt.round, delay,
                    self.round_aborts + 1, self.fed.max_attempts)
        return not self.stopped.wait(delay)

    def fail(self, why: str) -> None:
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
