"""One try at a round (`Attempt`) and one site's task stream (`Session`): what the round engine
keeps per attempt, and whether a site's answer (upload, decline, SecAgg step) belongs to it."""
from __future__ import annotations

import queue
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping, TYPE_CHECKING

from coordinator.errors import Code, Refusal
from coordinator.store import UploadRecord

if TYPE_CHECKING:
    from coordinator.secagg_round import SecAggRound


@dataclass
class Session:
    """One participant's open task stream. `None` on the queue ends the stream."""

    participant_id: str
    queue: queue.Queue = field(default_factory=queue.Queue)
    open: bool = True
    # whether the stream's peer is still there (gRPC's is_active); a session that cannot tell is
    # replaced by a newer stream of its site rather than refusing it
    alive: Callable[[], bool] = lambda: False
    opened: float = field(default_factory=time.monotonic)


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
    secagg: "SecAggRound | None" = None   # set when the round runs under secure aggregation
    secagg_summary: dict | None = None  # what secure aggregation did, for the record
    audit_head: tuple[int, str] = (0, "")   # the coordinator's audit head the task names

    def awaiting(self) -> set[str]:
        return set(self.selected) - set(self.uploads) - self.dropped - set(self.declined)

    def check_answer(self, participant_id: str, round_no: int, task_id: bytes, what: str) -> None:
        """Refuse an answer that is stale, early, from a site not selected, for another attempt,
        or a second answer of the same site."""
        if round_no < self.round:
            raise Refusal(Code.FAILED_PRECONDITION, f"stale round {round_no}: round {self.round} is in progress")
        if round_no > self.round:
            raise Refusal(Code.FAILED_PRECONDITION,
                          f"round {round_no} has not started: round {self.round} is in progress")
        if participant_id not in self.selected:
            raise Refusal(Code.PERMISSION_DENIED, f"{participant_id} was not selected for round {self.round}")
        if task_id != self.task_id:
            raise Refusal(Code.FAILED_PRECONDITION,
                          f"task id does not belong to the current attempt of round {self.round} "
                          f"(a replayed or superseded {what})")
        if participant_id in self.uploads:
            raise Refusal(Code.ALREADY_EXISTS,
                          f"{participant_id} already uploaded its update for round {self.round} (replay)")
        if participant_id in self.declined:
            raise Refusal(Code.ALREADY_EXISTS, f"{participant_id} already declined round {self.round}")

    def note_metrics(self, participant_id: str, metrics: Mapping[str, float]) -> None:
        """A site's reported metrics, kept for the round's record as "<site>/<name>"."""
        for key, value in metrics.items():
            self.metrics[f"{participant_id}/{key}"] = float(value)
