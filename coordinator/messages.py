"""The wire's side of the round engine: what it pushes down an assignment stream, and what a site's
answer says once it is read off the wire.

The engine and the SecAgg driver decide what a site is told; the protobuf messages for it are
built here, so neither of them constructs or reads a wire message itself.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

from coordinator.strategy import TrainPlan
from kt_core.wire import convert
from coordinator.errors import Code, Refusal
from kt_core.wire import federation_pb2 as pb

MAX_DECLINE_CODE = 64
MAX_DECLINE_REASON = 500


def round_assignment(run_id: str, round_no: int, attempt_id: bytes, global_digest: str, plan: TrainPlan,
               deadline_unix_ms: int, audit_head: tuple[int, str], *, roster: Sequence[str] = (),
               peer_certificates: Mapping[str, bytes] | None = None) -> pb.Assignment:
    """A round's order to one site; `roster` non-empty means the round runs under secure aggregation."""
    assignment = pb.RoundAssignment(
        header=convert.header(run_id, round_no), attempt_id=attempt_id, global_state_digest=global_digest,
        train=pb.TrainSettings(epochs=plan.epochs, batch_size=plan.batch_size, lr=plan.lr,
                               max_steps=plan.max_steps, seed=plan.seed),
        deadline_unix_ms=deadline_unix_ms, audit_head_seq=audit_head[0], audit_head_hash=audit_head[1])
    if roster:
        assignment.secagg = True
        assignment.roster.extend(roster)
        for site_id, pem in (peer_certificates or {}).items():
            assignment.peer_certificates[site_id] = pem
    return pb.Assignment(round=assignment)


def secagg_assignment(run_id: str, round_no: int, attempt_id: bytes, step: str, payload: bytes) -> pb.Assignment:
    """The message that opens SecAgg step `step` for one site."""
    return pb.Assignment(secagg=pb.SecAggMessage(header=convert.header(run_id, round_no), attempt_id=attempt_id,
                                           step=convert.SECAGG_STEP_TO_PB[step], payload=payload))


def finished(run_id: str, rounds_completed: int, reason: str, seal: tuple[int, str] = (0, "")) -> pb.Assignment:
    """The run's verdict, naming the coordinator's sealed audit head for every site to countersign."""
    return pb.Assignment(finished=pb.RunFinished(header=convert.header(run_id, rounds_completed), reason=reason,
                                           audit_head_seq=seal[0], audit_head_hash=seal[1]))


def is_finished(assignment) -> bool:
    return assignment.HasField("finished")


def heartbeat() -> pb.Assignment:
    return pb.Assignment(heartbeat=pb.Heartbeat(unix_ms=0))


@dataclass(frozen=True)
class DeclineAnswer:
    """A site's DeclineRequest, bounded: it will not train the round it names, and why."""
    round: int
    attempt_id: bytes
    code: str
    reason: str
    epsilon_spent: float
    epsilon_budget: float
    epsilon_would_be: float
    countersignature: bytes


def decline_answer(request: pb.DeclineRequest) -> DeclineAnswer:
    """The decline's fields, its texts cut to size and its figures refused unless finite."""
    figures = (request.epsilon_spent, request.epsilon_budget, request.epsilon_would_be)
    if not all(math.isfinite(v) for v in figures):
        raise Refusal(Code.INVALID_ARGUMENT, "decline: epsilon figures must be finite")
    return DeclineAnswer(round=request.header.round, attempt_id=request.attempt_id,
                         code=request.code[:MAX_DECLINE_CODE] or "declined", reason=request.reason[:MAX_DECLINE_REASON],
                         epsilon_spent=figures[0], epsilon_budget=figures[1], epsilon_would_be=figures[2],
                         countersignature=request.audit_countersignature)
