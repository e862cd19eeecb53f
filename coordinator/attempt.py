"""One try at a round (`Attempt`): what the round engine keeps per attempt, and whether a site's
answer (upload, decline, SecAgg step) belongs to it. (A site's assignment stream is a
`coordinator.sessions.Session`.)"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, TYPE_CHECKING

from coordinator.errors import Code, Refusal
from coordinator.store import UploadRecord
from kt_core.bounded import escape_field

if TYPE_CHECKING:
    from coordinator.secagg_round import SecAggRound


# how much of the sites' own decline reasons a run's abort or failure reason quotes: it is stored,
# audited and shown in `run status`, and 100 sites x 500 characters would swamp all three
QUOTED_SITES = 5
QUOTED_CHARS = 160


def name_reasons(reasons: Mapping[str, str]) -> str:
    """"site-a (code: reason); site-b (...)" for the first QUOTED_SITES sites by name, each reason
    cut to QUOTED_CHARS, with how many more there are."""
    names = sorted(reasons)
    text = "; ".join(f"{s} ({escape_field(reasons[s], QUOTED_CHARS)})" for s in names[:QUOTED_SITES])
    return text + (f"; and {len(names) - QUOTED_SITES} more" if len(names) > QUOTED_SITES else "")


@dataclass
class Attempt:
    """One try at a round. An aborted round is retried as a new attempt with a new attempt id."""

    round: int
    attempt_id: bytes
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

    def check_answer(self, site_id: str, round_no: int, attempt_id: bytes, what: str) -> None:
        """Refuse an answer that is stale, early, from a site not selected, for another attempt,
        or a second answer of the same site."""
        if round_no < self.round:
            raise Refusal(Code.FAILED_PRECONDITION, f"stale round {round_no}: round {self.round} is in progress")
        if round_no > self.round:
            raise Refusal(Code.FAILED_PRECONDITION,
                          f"round {round_no} has not started: round {self.round} is in progress")
        if site_id not in self.selected:
            raise Refusal(Code.PERMISSION_DENIED, f"{site_id} was not selected for round {self.round}")
        if attempt_id != self.attempt_id:
            raise Refusal(Code.FAILED_PRECONDITION,
                          f"attempt id does not belong to the current attempt of round {self.round} "
                          f"(a replayed or superseded {what})")
        if site_id in self.uploads:
            raise Refusal(Code.ALREADY_EXISTS,
                          f"{site_id} already uploaded its update for round {self.round} (replay)")
        if site_id in self.declined:
            raise Refusal(Code.ALREADY_EXISTS, f"{site_id} already declined round {self.round}")

    def note_metrics(self, site_id: str, metrics: Mapping[str, float]) -> None:
        """A site's reported metrics, kept for the round's record as "<site>/<name>"."""
        for key, value in metrics.items():
            self.metrics[f"{site_id}/{key}"] = float(value)

    def note_fold(self, site_id: str, folded) -> None:
        """What the coordinator measured and applied to a site's update (coordinator.strategy.Folded),
        kept beside the site's metrics as "<site>/aggregation.<name>"; written after them, so a site
        reporting a metric of that name cannot stand in for the coordinator's figure."""
        self.metrics[f"{site_id}/aggregation.weight"] = float(folded.weight)
        if folded.norm is not None:
            self.metrics[f"{site_id}/aggregation.update_norm"] = float(folded.norm)
        self.metrics[f"{site_id}/aggregation.clip_factor"] = float(folded.factor)
