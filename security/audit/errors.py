"""What the audit log raises. Every message names the file and, where there is one, the entry."""
from __future__ import annotations

from dataclasses import dataclass


class AuditError(Exception):
    """The log cannot be opened, written or parsed as asked; the message says why."""


class TornTailError(AuditError):
    """The last line of the log is incomplete: the producer crashed in the middle of an append
    (or someone cut the file). Nothing is dropped or repaired silently: the operator inspects it and
    reopens with `recover_torn=True`, which quarantines the fragment and records that in the chain."""

    def __init__(self, message: str, line: int, fragment: bytes):
        super().__init__(message)
        self.line = line
        self.fragment = fragment


class CountersignatureError(AuditError):
    """A countersignature token that does not match this log, or does not verify."""


@dataclass(frozen=True)
class Problem:
    """One finding of `verify`: the file, the entry (seq and line) where there is one, and why."""
    file: str
    seq: int | None
    line: int | None
    message: str
    severity: str = "error"

    def __str__(self) -> str:
        where = self.file
        if self.seq is not None:
            where += f" seq {self.seq}"
        if self.line is not None:
            where += f" (line {self.line})"
        return f"{where}: {self.message}"

    def to_dict(self) -> dict:
        return {"file": self.file, "seq": self.seq, "line": self.line, "message": self.message,
                "severity": self.severity}
