"""What the sites send back for a round's task: an update (plain upload) or a decline.

Every answer is checked against the open attempt (`answered_by`: the right round, task id and a
selected site that has not answered yet) under the engine's lock, audited as received, and only
then counted: an update is folded into the strategy's aggregate in the same locked step in which
it is recorded, so it is counted exactly when it is recorded. SecAgg steps are answered through
the SecAgg driver (coordinator.secagg_round), which uses `answered_by` and `audit_received` too.
"""
from __future__ import annotations

import hashlib
import logging
import time
from typing import TYPE_CHECKING, Mapping

import numpy as np

from coordinator.admission import check_update_header
from coordinator.attempt import Attempt
from coordinator.audit_trail import CountersignatureError
from coordinator.errors import Code, Refusal
from coordinator.messages import DeclineAnswer
from coordinator.store import UploadRecord
from kt_core.bounded import escape_field

if TYPE_CHECKING:
    from coordinator.rounds import RoundEngine

log = logging.getLogger(__name__)

# A decline with this code: the site's privacy budget cannot take another round of this run.
BUDGET_DECLINE = "budget_exhausted"


class Answers:
    def __init__(self, engine: "RoundEngine"):
        self.engine = engine

    def answered_by(self, participant_id: str, round_no: int, task_id: bytes, what: str) -> Attempt:
        """The open attempt that an upload, decline or SecAgg step answers, or a refusal saying why
        not. Call with the engine's lock held."""
        attempt = self.engine.attempt
        if attempt is None or attempt.closed:
            raise Refusal(Code.FAILED_PRECONDITION, "no round is collecting updates")
        attempt.check_answer(participant_id, round_no, task_id, what)
        return attempt

    def check_upload(self, participant_id: str, header) -> Attempt:
        """Everything that can be refused before a byte of tensor data is accepted (`header` is the
        upload's UploadHeader)."""
        e = self.engine
        with e.cond:
            attempt = self.answered_by(participant_id, header.header.round, header.task_id, "upload")
            if attempt.secagg is not None:
                raise Refusal(Code.FAILED_PRECONDITION,
                              f"round {attempt.round} runs under secure aggregation: the update travels as "
                              "masked SecAgg steps (SubmitSecAgg), never as a plain upload")
            if time.monotonic() > attempt.deadline:
                raise Refusal(Code.DEADLINE_EXCEEDED, f"round {attempt.round} is past its deadline")
        if header.base_state_digest != e.global_digest:
            raise Refusal(Code.FAILED_PRECONDITION, "update computed from a global state other than the current one")
        check_update_header(header, e.shared_specs)
        return attempt

    def submit(self, attempt: Attempt, record: UploadRecord, update: Mapping[str, np.ndarray],
               metrics: Mapping[str, float], countersignature: bytes = b"") -> None:
        """Fold a fully received and validated update into the round's aggregate. The update may
        be a spooled upload on disk: the strategy reads it block by block."""
        e = self.engine
        pid = record.participant_id
        with e.cond:
            if attempt is not e.attempt or attempt.closed:
                raise Refusal(Code.FAILED_PRECONDITION, f"round {attempt.round} closed while the update was in flight")
            if pid in attempt.uploads:
                raise Refusal(Code.ALREADY_EXISTS, f"{pid} already uploaded for round {attempt.round} (replay)")
            self.audit_received(attempt, pid, "update", record.update_digest, record.specs, countersignature)
            e.strategy.add(update, e.strategy.weight(record.num_samples))
            attempt.uploads[pid] = record
            e.participants[pid].note_privacy(metrics)
            attempt.dropped.discard(pid)
            attempt.note_metrics(pid, metrics)
            e.cond.notify_all()
            log.info("round %d: update from %s (%d samples, %d bytes)", attempt.round, pid, record.num_samples,
                     record.bytes)

    def decline(self, participant_id: str, answer: DeclineAnswer) -> Attempt:
        """A selected site will not train this round (e.g. its privacy budget): it is out of this
        round at once, the coordinator records why and goes on with the others."""
        e = self.engine
        with e.cond:
            attempt = self.answered_by(participant_id, answer.round, answer.task_id, "decline")
            self.audit_received(attempt, participant_id, "decline", hashlib.sha256(answer.task_id).hexdigest(),
                                countersignature=answer.countersignature)
            attempt.declined[participant_id] = f"{answer.code}: {answer.reason}"
            if answer.code == BUDGET_DECLINE:
                e.out_of_budget.add(participant_id)
            attempt.dropped.discard(participant_id)
            e.participants[participant_id].note_decline(answer.code, answer.reason, answer.epsilon_spent,
                                                        answer.epsilon_budget)
            e.cond.notify_all()
        e.store.record_decline(e.run_id, attempt.round, participant_id, attempt.task_id.hex(), answer.code,
                               answer.reason, answer.epsilon_spent, answer.epsilon_budget, answer.epsilon_would_be)
        log.warning("round %d: %s declined (%s): %s", attempt.round, participant_id, escape_field(answer.code),
                    escape_field(answer.reason, 500))
        return attempt

    def audit_received(self, attempt: Attempt, pid: str, message: str, sha256: str, specs=(),
                       countersignature: bytes = b"", nbytes: int | None = None) -> None:
        e = self.engine
        try:
            e.trail.received(e.run_id, attempt.round, pid, message, sha256, specs, nbytes=nbytes,
                             countersignature=countersignature, certificate=e.certificates.get(pid))
        except CountersignatureError as err:
            raise Refusal(Code.INVALID_ARGUMENT, f"audit countersignature refused: {err}") from None
