"""What the sites send back for a round's task: an update (plain upload) or a decline.

Every answer is checked against the open attempt (`answered_by`: the right round, attempt id and a
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
from kt_core.wire import convert

if TYPE_CHECKING:
    from coordinator.rounds import RoundEngine

log = logging.getLogger(__name__)

# declines that hold for the rest of a site's session (its budget is spent, its policy refuses the
# run): asking it again is futile, so it is left out of the rounds after
LEAVES_OUT = (convert.DECLINE_BUDGET, convert.DECLINE_RUN_REFUSED)


class Answers:
    def __init__(self, engine: "RoundEngine"):
        self.engine = engine

    def answered_by(self, site_id: str, round_no: int, attempt_id: bytes, what: str) -> Attempt:
        """The open attempt that an upload, decline or SecAgg step answers, or a refusal saying why
        not. Call with the engine's lock held."""
        attempt = self.engine.attempt
        if attempt is None or attempt.closed:
            raise Refusal(Code.FAILED_PRECONDITION, "no round is collecting updates")
        attempt.check_answer(site_id, round_no, attempt_id, what)
        return attempt

    def check_upload(self, site_id: str, header) -> Attempt:
        """Everything that can be refused before a byte of tensor data is accepted (`header` is the
        upload's UploadHeader)."""
        e = self.engine
        with e.cond:
            attempt = self.answered_by(site_id, header.header.round, header.attempt_id, "upload")
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
        site_id = record.site_id
        with e.cond:
            if attempt is not e.attempt or attempt.closed:
                raise Refusal(Code.FAILED_PRECONDITION, f"round {attempt.round} closed while the update was in flight")
            if site_id in attempt.uploads:
                raise Refusal(Code.ALREADY_EXISTS, f"{site_id} already uploaded for round {attempt.round} (replay)")
            self.audit_received(attempt, site_id, "update", record.update_digest, record.specs, countersignature)
            folded = e.strategy.add(update, e.strategy.weight(record.num_samples))
            attempt.uploads[site_id] = record
            e.sites[site_id].note_privacy(metrics)
            attempt.dropped.discard(site_id)
            attempt.note_metrics(site_id, metrics)
            attempt.note_fold(site_id, folded)
            e.cond.notify_all()
            log.info("round %d: update from %s (%d samples, %d bytes)", attempt.round, site_id, record.num_samples,
                     record.bytes)
            if folded.weight < record.num_samples or folded.factor < 1.0:
                # within the run's bounds an honest site never gets here under SecAgg's rule, so
                # this is a site that claims too much or did not clip: the operator should know
                log.warning("round %d: update from %s bounded: weight %d of the %d samples it claims; "
                            "L2 norm %.6g scaled by %.6g to the run's max_update_norm", attempt.round, site_id,
                            folded.weight, record.num_samples, folded.norm, folded.factor)

    def decline(self, site_id: str, answer: DeclineAnswer) -> Attempt:
        """A selected site will not train this round (e.g. its privacy budget): it is out of this
        round at once, the coordinator records why and goes on with the others."""
        e = self.engine
        with e.cond:
            attempt = self.answered_by(site_id, answer.round, answer.attempt_id, "decline")
            self.audit_received(attempt, site_id, "decline", hashlib.sha256(answer.attempt_id).hexdigest(),
                                countersignature=answer.countersignature)
            attempt.declined[site_id] = f"{answer.code}: {answer.reason}"
            if answer.code in LEAVES_OUT:
                e.sessions.leave_out(site_id, attempt.declined[site_id])
            attempt.dropped.discard(site_id)
            e.sites[site_id].note_decline(answer.code, answer.reason, answer.epsilon_spent,
                                                        answer.epsilon_budget)
            e.cond.notify_all()
        e.store.record_decline(e.run_id, attempt.round, site_id, attempt.attempt_id.hex(), answer.code,
                               answer.reason, answer.epsilon_spent, answer.epsilon_budget, answer.epsilon_would_be)
        log.warning("round %d: %s declined (%s): %s", attempt.round, site_id, escape_field(answer.code),
                    escape_field(answer.reason, 500))
        return attempt

    def audit_received(self, attempt: Attempt, site_id: str, message: str, sha256: str, specs=(),
                       countersignature: bytes = b"", nbytes: int | None = None) -> None:
        e = self.engine
        try:
            e.trail.received(e.run_id, attempt.round, site_id, message, sha256, specs, nbytes=nbytes,
                             countersignature=countersignature, certificate=e.sessions.certificate(site_id))
        except CountersignatureError as err:
            raise Refusal(Code.INVALID_ARGUMENT, f"audit countersignature refused: {err}") from None
