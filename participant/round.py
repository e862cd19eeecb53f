"""One round at a site, top to bottom: download -> train -> update -> guard -> send.

    Round(site_run, stub, assignment).run()

takes the coordinator's RoundAssignment, downloads the global state it names, trains on the site's own
data (the privacy engine may decline: the round is then refused with the reason), takes the
update of the shared factors, lets the egress guard check it against the factor manifest, and
sends it: uploaded in chunks, or under secure aggregation encoded and masked, step by step
(participant.secagg_update). Every message that crosses the boundary goes into the site's audit
trail; every refusal of ours is audited, every refusal of the coordinator's logged.
"""
from __future__ import annotations

import logging
import time

import grpc
import numpy as np

from kt_core import codec
from kt_core.wire import convert
from kt_core.wire import federation_pb2 as pb
from participant import policy as site_policy
from participant.policy import Violation
from participant.privacy import BudgetExceeded
from participant.secagg_update import SecAggSession
from participant.site_run import ROUND_CODES, SiteRun
from participant.state_check import StateStepRefused
from participant.trainer import TrainingDiverged
from security.egress import EgressRefused

log = logging.getLogger(__name__)



class Round:
    """One RoundAssignment of the coordinator's, carried out at this site."""

    def __init__(self, site_run: SiteRun, stub, assignment: pb.RoundAssignment):
        self.site_run, self.stub, self.assignment = site_run, stub, assignment
        self.round = assignment.header.round
        self.measured: dict[str, float] = {}   # the task's round metrics (train fills it in)

    def run(self) -> SecAggSession | None:
        """Returns the secure aggregation session when the round goes on step by step."""
        run, assignment = self.site_run, self.assignment
        run.audit.boundary(run.run_id, "receive", self.round, "assignment", assignment.global_state_digest)
        # a new assignment ends the attempt before it: the privacy engine settles what that one cost
        # (a site whose policy refused the run has no trainer: it trains nothing and spends nothing)
        if run.trainer is not None and run.trainer.privacy.next_attempt(self.round, assignment.attempt_id.hex()):
            run.trainer.save_private()
        if run.refused:
            self.refuse(list(run.refused), code=convert.DECLINE_RUN_REFUSED)
            return None
        violations = site_policy.check_assignment(run.policy, run.config, round_no=self.round,
                                                  secure=assignment.secagg, roster_size=len(assignment.roster))
        if violations:
            self.refuse(violations)
            return None
        t = assignment.train
        try:   # before anything is downloaded for it
            run.trainer.round_config(t.epochs, t.batch_size, t.lr, t.max_steps, t.seed)
        except ValueError as err:
            self.refuse([Violation("train", str(err), source="round")])
            return None
        try:
            state = self.download()
        except StateStepRefused as err:
            # the coordinator's state is not one the run's rule could have produced: this site
            # trains nothing on it and says why (the refusal is logged and audited by the fetch)
            self.site_run.decline(self.stub, self.assignment, convert.DECLINE_STATE_REFUSED, str(err)[:500])
            return None
        started = time.perf_counter()  # local compute from here: the framework's overhead is the rest
        try:
            before, result, after = self.train(state)
        except BudgetExceeded as err:
            self.decline(err)
            return None
        except TrainingDiverged as err:
            log.warning("%s: round %d: training diverged, nothing sent: %s", run.site, self.round, err)
            run.decline(self.stub, assignment, convert.DECLINE_DIVERGED, str(err)[:500])
            return None
        update = self.update(state)
        if not self.guard(update):
            self.withhold("the egress guard stopped the update")
            return None
        metrics = run.policy.reported_metrics({
            **self.measured, "accuracy_before": before["accuracy"], "accuracy": after["accuracy"], "loss": result.loss,
            "train_seconds": result.seconds, "compute_seconds": time.perf_counter() - started,
            **run.trainer.privacy_metrics()})
        if assignment.secagg:
            return self.send_secure(update, metrics)
        if self.past_deadline():
            log.warning("%s: round %d: the deadline passed before the update was ready: not sent", run.site,
                        self.round)
            self.withhold("the round's deadline passed before the update was ready")
            return None
        receipt, tensors = self.send(update, metrics)
        if receipt is not None:
            log.info("%s: round %d: accuracy %.3f -> %.3f, loss %.3f, sent %d bytes in %d shared tensors (%.2fs)",
                     run.site, self.round, before["accuracy"], after["accuracy"], result.loss, receipt.bytes_received,
                     tensors, time.perf_counter() - started)
        return None

    # -- the steps --------------------------------------------------------------------------------
    def download(self) -> dict[str, np.ndarray]:
        # round r's task names the state after r - 1 rounds
        run = self.site_run
        return run.states.fetch(self.stub, run.run_id, self.round, self.assignment.global_state_digest,
                                completed=self.round - 1)[1]

    def train(self, state: dict[str, np.ndarray]):
        """(accuracy before, training result, accuracy after); raises BudgetExceeded."""
        trainer, t = self.site_run.trainer, self.assignment.train
        trainer.load_global(state)
        before = trainer.evaluate()
        # the task's costly round metrics (rollouts) after every round's training, and before the
        # first one: the starting model's, round 0 of the curve
        self.measured = ({f"{k}_before": v for k, v in trainer.round_metrics().items()} if self.round == 1 else {})
        result = trainer.train(t.epochs, t.batch_size, t.lr, t.max_steps, t.seed,
                               round_no=self.round, attempt_id=self.assignment.attempt_id.hex())
        after = trainer.evaluate()
        self.measured.update(trainer.round_metrics())
        trainer.save_private()
        return before, result, after

    def update(self, state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """What this site would contribute: the delta of its shared factors since `state`."""
        return self.site_run.trainer.update(state)

    def guard(self, update: dict[str, np.ndarray]) -> bool:
        """The egress guard: any tensor the manifest does not declare shared stops the update."""
        run = self.site_run
        try:
            run.guard.check(update, destination=f"coordinator {run.settings.coordinator}")
        except EgressRefused as err:
            log.error("%s: round %d: update not sent (egress guard)", run.site, self.round)
            if err.rule == "manifest":
                run.audit.refusal(run.run_id, self.round, "update", "egress guard", str(err))
            else:  # the site's own rule: the coordinator hears which
                self.refuse([Violation(err.rule, str(err))])
            return False
        return True

    def send(self, update: dict[str, np.ndarray], metrics: dict[str, float]) -> tuple[pb.UploadReceipt | None, int]:
        """Upload the update in chunks: (the coordinator's receipt, or None when it refused; tensors sent)."""
        run, assignment = self.site_run, self.assignment
        header = pb.UploadHeader(header=run.header(self.round), attempt_id=assignment.attempt_id,
                                 base_state_digest=assignment.global_state_digest, num_samples=run.trainer.num_samples,
                                 metrics=metrics)
        token, token_seq = run.audit.countersign(run.run_id, assignment)
        header.audit_countersignature = token
        specs, messages = convert.upload_messages(header, update, run.chunk_bytes)
        sent = run.audit.boundary(run.run_id, "send", self.round, "update", codec.state_digest(specs), specs)
        run.trainer.privacy.released(assignment.attempt_id.hex())   # from here on the update may be out
        try:
            receipt = self.upload(messages)
        except grpc.RpcError as err:
            run.audit.undelivered((token_seq, sent), f"{err.code().name}: {err.details()}")
            if err.code() in ROUND_CODES:
                log.warning("%s: round %d: update refused: %s %s", run.site, self.round, err.code().name,
                            err.details())
                return None, len(specs)
            raise
        run.counters.rounds_contributed += 1
        run.counters.bytes_uploaded += receipt.bytes_received
        return receipt, len(specs)

    def send_secure(self, update: dict[str, np.ndarray], metrics: dict[str, float]) -> SecAggSession | None:
        """Encode the update and advertise keys; the update itself leaves with the masked input, a
        step the coordinator opens later, so the privacy engine asks the session once the attempt
        is over. A session that ends in a refusal may have sent it, and counts as sent."""
        session = SecAggSession.begin(self.site_run, self.stub, self.assignment, update, metrics)
        attempt_id = self.assignment.attempt_id.hex()
        if session is None:
            self.withhold("this site did not take part in the round's secure aggregation")
        else:
            client = session.update.client
            self.site_run.trainer.privacy.release_later(attempt_id, lambda: client.masked_input_may_have_left)
        return session

    def past_deadline(self) -> bool:
        """Whether the assignment's deadline has passed by this site's clock: the coordinator refuses a
        late update, so sending one would only spend privacy."""
        return bool(self.assignment.deadline_unix_ms) and time.time() * 1000 > self.assignment.deadline_unix_ms

    def withhold(self, why: str) -> None:
        """Nothing of this attempt's update leaves the site: the privacy engine undoes its training
        (no epsilon spent), and the private factors on disk go back with it."""
        if self.site_run.trainer.privacy.withhold(self.assignment.attempt_id.hex(), why):
            self.site_run.trainer.save_private()

    def upload(self, messages) -> pb.UploadReceipt:
        """The plain upload RPC itself."""
        return self.stub.Upload(messages, timeout=self.site_run.settings.rpc_timeout_s)

    def decline(self, err: BudgetExceeded) -> None:
        """Refuse the round (the hard stop): the privacy engine records it, the coordinator hears why."""
        run = self.site_run
        run.trainer.privacy.decline(err, round_no=self.round, attempt_id=self.assignment.attempt_id.hex())
        log.warning("%s: round %d declined: %s", run.site, self.round, err)
        run.decline(self.stub, self.assignment, convert.DECLINE_BUDGET, str(err), err.spent, err.budget, err.would_be)

    def refuse(self, violations: list[Violation], code: str = convert.DECLINE_SITE_POLICY) -> None:
        """Refuse the round because it breaks the site policy: audited rule by rule, then declined."""
        self.site_run.refuse(self.stub, self.assignment, "assignment", violations, code=code)
