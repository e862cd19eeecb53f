"""The coordinator's persistent records: SQLite (WAL), with each round's global state in a state
file beside it (the format: coordinator.state_file).

Crash safety rests on two atomic steps per completed round:
1. the new global state is written to a temporary file, fsynced, and renamed into place;
2. one SQLite transaction records the round (its digest and file) and its uploads.
A crash before (2) leaves at most an unreferenced file, which startup removes; a crash after
(2) is a completed round. So a restart resumes at the last completed round, never counts a
round twice, and never reads a half-written file. On startup every referenced file is checked
against its recorded digest; a mismatch stops the coordinator and names the file.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np

from coordinator.state_file import CorruptStateError, StateFile, open_state_file, write_state_file
from kt_core import codec
from kt_core.durable import open_durable_sqlite

log = logging.getLogger(__name__)

# The records' schema version (SQLite's user_version). 2: the one-name-per-concept renames
# (participant_id -> site_id, task_id -> attempt_id, aborted_rounds -> aborted_attempts). A store
# written before (version 0, which had no version) is refused with its version named rather than
# migrated: its run's audit log is of the old format too, so such a run could not be resumed
# consistently anyway; start it again in a fresh state folder.
SCHEMA_VERSION = 2

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY, config_json TEXT NOT NULL, manifest_json TEXT NOT NULL,
    state TEXT NOT NULL, created_at REAL NOT NULL, finished_at REAL);
CREATE TABLE IF NOT EXISTS rounds (
    run_id TEXT NOT NULL, round INTEGER NOT NULL, state_file TEXT NOT NULL, state_digest TEXT NOT NULL,
    contributors_json TEXT NOT NULL, dropped_json TEXT NOT NULL, bytes_received INTEGER NOT NULL,
    seconds REAL NOT NULL, metrics_json TEXT NOT NULL, completed_at REAL NOT NULL,
    PRIMARY KEY (run_id, round));
CREATE TABLE IF NOT EXISTS uploads (
    run_id TEXT NOT NULL, round INTEGER NOT NULL, site_id TEXT NOT NULL, attempt_id TEXT NOT NULL,
    num_samples INTEGER NOT NULL, tensors_json TEXT NOT NULL, bytes INTEGER NOT NULL,
    update_digest TEXT NOT NULL, received_at REAL NOT NULL,
    PRIMARY KEY (run_id, round, site_id));
CREATE TABLE IF NOT EXISTS aborted_attempts (
    run_id TEXT NOT NULL, round INTEGER NOT NULL, attempt_id TEXT NOT NULL, reason TEXT NOT NULL, at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS declines (
    run_id TEXT NOT NULL, round INTEGER NOT NULL, site_id TEXT NOT NULL, attempt_id TEXT NOT NULL,
    code TEXT NOT NULL, reason TEXT NOT NULL, epsilon_spent REAL NOT NULL, epsilon_budget REAL NOT NULL,
    epsilon_would_be REAL NOT NULL, at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS privacy_params (
    run_id TEXT PRIMARY KEY, params_json TEXT NOT NULL, accountant TEXT NOT NULL,
    accountant_version TEXT NOT NULL, at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS privacy_rounds (
    run_id TEXT NOT NULL, round INTEGER NOT NULL, mechanism TEXT NOT NULL, noise_multiplier REAL NOT NULL,
    clip_norm REAL NOT NULL, contributors INTEGER NOT NULL, noise_std REAL NOT NULL, delta REAL NOT NULL,
    epsilon_prv REAL NOT NULL, epsilon_rdp REAL NOT NULL, accountant_version TEXT NOT NULL,
    PRIMARY KEY (run_id, round));
-- what secure aggregation did in a round: roster, t, who answered each step, whose secrets were
-- reconstructed; never an individual update (the coordinator never holds one).
CREATE TABLE IF NOT EXISTS secagg_rounds (
    run_id TEXT NOT NULL, round INTEGER NOT NULL, summary_json TEXT NOT NULL,
    PRIMARY KEY (run_id, round));
CREATE TABLE IF NOT EXISTS refusals (
    at REAL NOT NULL, peer TEXT NOT NULL, method TEXT NOT NULL, code TEXT NOT NULL, reason TEXT NOT NULL);
"""


@dataclass(frozen=True)
class RunRecord:
    run_id: str
    config_json: str
    manifest_json: str
    state: str  # running | finished | stopped


@dataclass(frozen=True)
class UploadRecord:
    site_id: str
    attempt_id: str
    num_samples: int
    specs: tuple[codec.TensorSpec, ...]
    bytes: int
    update_digest: str

    def tensors_json(self) -> str:
        return json.dumps([{"name": s.name, "dtype": s.dtype, "shape": list(s.shape),
                            "sha256": s.sha256.hex(), "nbytes": s.nbytes} for s in self.specs])


@dataclass(frozen=True)
class RoundRecord:
    round: int
    state_digest: str
    contributors: tuple[str, ...]
    dropped: tuple[str, ...]
    bytes_received: int
    seconds: float
    metrics: dict[str, float]
    bytes_by_site: dict[str, int]
    secagg: dict | None = None            # the secure aggregation summary, for SecAgg rounds


class StoreVersionError(RuntimeError):
    """The state folder holds records of another schema version (see SCHEMA_VERSION)."""


def _open_records(path: Path):
    db = open_durable_sqlite(path, "")
    (version,) = db.execute("PRAGMA user_version").fetchone()
    (tables,) = db.execute("SELECT COUNT(*) FROM sqlite_master WHERE type = 'table'").fetchone()
    if tables and version != SCHEMA_VERSION:
        db.close()
        raise StoreVersionError(f"{path}: records of schema version {version}, this coordinator reads version "
                                f"{SCHEMA_VERSION} only (older records are not migrated): start the run in a fresh "
                                "state folder")
    db.executescript(SCHEMA)
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
    return db


class Store:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self.db = _open_records(self.root / "coordinator.sqlite3")
        self._latest: dict[str, StateFile] = {}   # run -> its newest state file, hashed when written

    def close(self) -> None:
        with self._lock:
            self.db.close()

    # -- runs ---------------------------------------------------------------------------------
    def create_run(self, run_id: str, config_json: str, manifest_json: str,
                   initial_state: Mapping[str, np.ndarray]) -> str:
        """Persist a new run with its round-0 state; returns the state digest."""
        state_file = self._write_state(run_id, 0, initial_state)
        path, digest = state_file.path, state_file.digest
        with self._lock, self.db:
            self.db.execute("BEGIN IMMEDIATE")
            self.db.execute("INSERT INTO runs VALUES (?, ?, ?, 'running', ?, NULL)",
                            (run_id, config_json, manifest_json, time.time()))
            self.db.execute("INSERT INTO rounds VALUES (?, 0, ?, ?, '[]', '[]', 0, 0, '{}', ?)",
                            (run_id, path.name, digest, time.time()))
        self._latest[run_id] = state_file
        return digest

    def active_run(self) -> RunRecord | None:
        row = self.db.execute("SELECT run_id, config_json, manifest_json, state FROM runs "
                              "WHERE state = 'running' ORDER BY created_at DESC LIMIT 1").fetchone()
        return RunRecord(*row) if row else None

    def run(self, run_id: str) -> RunRecord | None:
        row = self.db.execute("SELECT run_id, config_json, manifest_json, state FROM runs WHERE run_id = ?",
                              (run_id,)).fetchone()
        return RunRecord(*row) if row else None

    def latest_run(self) -> RunRecord | None:
        row = self.db.execute("SELECT run_id, config_json, manifest_json, state FROM runs "
                              "ORDER BY created_at DESC LIMIT 1").fetchone()
        return RunRecord(*row) if row else None

    def set_run_state(self, run_id: str, state: str) -> None:
        with self._lock, self.db:
            self.db.execute("UPDATE runs SET state = ?, finished_at = ? WHERE run_id = ?",
                            (state, time.time(), run_id))

    # -- rounds -------------------------------------------------------------------------------
    def last_round(self, run_id: str) -> tuple[int, StateFile, str]:
        """The last completed round, its global state file (verified against its digest) and digest."""
        row = self.db.execute("SELECT round, state_file, state_digest FROM rounds WHERE run_id = ? "
                              "ORDER BY round DESC LIMIT 1", (run_id,)).fetchone()
        if row is None:
            raise CorruptStateError(f"run {run_id} has no recorded state (database {self.root / 'coordinator.sqlite3'})")
        round_no, name, digest = row
        return round_no, self.load_state(run_id, name, digest), digest

    def load_state(self, run_id: str, name: str, digest: str) -> StateFile:
        state_file = open_state_file(self._run_dir(run_id) / name, digest)
        self._latest[run_id] = state_file
        return state_file

    def state_file(self, run_id: str, digest: str) -> StateFile:
        """The state file with this digest: the newest one written (already hashed), else the
        latest round's file that recorded it, verified."""
        latest = self._latest.get(run_id)
        if latest is not None and latest.digest == digest:
            return latest
        row = self.db.execute("SELECT state_file FROM rounds WHERE run_id = ? AND state_digest = ? "
                              "ORDER BY round DESC LIMIT 1", (run_id, digest)).fetchone()
        if row is None:
            raise CorruptStateError(f"run {run_id} has no state with digest {digest[:16]}…")
        return self.load_state(run_id, row[0], digest)

    def rounds(self, run_id: str) -> list[RoundRecord]:
        rows = self.db.execute("SELECT round, state_digest, contributors_json, dropped_json, bytes_received, "
                               "seconds, metrics_json FROM rounds WHERE run_id = ? AND round > 0 ORDER BY round",
                               (run_id,)).fetchall()
        sent: dict[int, dict[str, int]] = {}
        for r, site_id, b in self.db.execute("SELECT round, site_id, bytes FROM uploads WHERE run_id = ?", (run_id,)):
            sent.setdefault(r, {})[site_id] = b
        secure = {r: json.loads(j) for r, j in self.db.execute(
            "SELECT round, summary_json FROM secagg_rounds WHERE run_id = ?", (run_id,))}
        return [RoundRecord(r, d, tuple(json.loads(c)), tuple(json.loads(x)), b, s, json.loads(m), sent.get(r, {}),
                            secure.get(r))
                for r, d, c, x, b, s, m in rows]

    def complete_round(self, run_id: str, round_no: int, state: Mapping[str, np.ndarray],
                       uploads: Iterable[UploadRecord], dropped: Iterable[str], seconds: float,
                       metrics: Mapping[str, float], secagg: Mapping | None = None) -> str:
        uploads = list(uploads)
        # the state file first, then its records: a crash between the two leaves a file no record
        # names, which sweep() removes at the next start (tests/fault_harness.py pauses in between)
        state_file = self._write_state(run_id, round_no, state)
        path, digest = state_file.path, state_file.digest
        now = time.time()
        with self._lock, self.db:
            self.db.execute("BEGIN IMMEDIATE")
            self.db.execute("INSERT INTO rounds VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                            (run_id, round_no, path.name, digest,
                             json.dumps(sorted(u.site_id for u in uploads)), json.dumps(sorted(dropped)),
                             sum(u.bytes for u in uploads), seconds, json.dumps(dict(metrics)), now))
            self.db.executemany("INSERT INTO uploads VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                                [(run_id, round_no, u.site_id, u.attempt_id, u.num_samples,
                                  u.tensors_json(), u.bytes, u.update_digest, now) for u in uploads])
            if secagg is not None:
                self.db.execute("INSERT INTO secagg_rounds VALUES (?, ?, ?)",
                                (run_id, round_no, json.dumps(dict(secagg), sort_keys=True)))
        self._latest[run_id] = state_file
        return digest

    def record_abort(self, run_id: str, round_no: int, attempt_id: str, reason: str) -> None:
        with self._lock, self.db:
            self.db.execute("INSERT INTO aborted_attempts VALUES (?, ?, ?, ?, ?)",
                            (run_id, round_no, attempt_id, reason, time.time()))

    # -- privacy --------------------------------------------------------------------------------
    def record_privacy_params(self, run_id: str, params_json: str, accountant: str, version: str) -> None:
        """The run's DP parameters and the accountant (with its version) an auditor recomputes with."""
        with self._lock, self.db:
            self.db.execute("INSERT OR IGNORE INTO privacy_params VALUES (?, ?, ?, ?, ?)",
                            (run_id, params_json, accountant, version, time.time()))

    def record_decline(self, run_id: str, round_no: int, site_id: str, attempt_id: str, code: str,
                       reason: str, spent: float, budget: float, would_be: float) -> None:
        with self._lock, self.db:
            self.db.execute("INSERT INTO declines VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                            (run_id, round_no, site_id, attempt_id, code, reason, spent, budget, would_be,
                             time.time()))

    def declines(self, run_id: str) -> list[dict]:
        rows = self.db.execute("SELECT round, site_id, attempt_id, code, reason, epsilon_spent, epsilon_budget, "
                               "epsilon_would_be FROM declines WHERE run_id = ? ORDER BY at", (run_id,)).fetchall()
        keys = ("round", "site_id", "attempt_id", "code", "reason", "epsilon_spent", "epsilon_budget",
                "epsilon_would_be")
        return [dict(zip(keys, r)) for r in rows]

    def record_privacy_round(self, run_id: str, round_no: int, mechanism: str, noise_multiplier: float, clip_norm: float,
                             contributors: int, noise_std: float, delta: float, eps_prv: float, eps_rdp: float,
                             version: str) -> None:
        with self._lock, self.db:
            self.db.execute("INSERT OR REPLACE INTO privacy_rounds VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                            (run_id, round_no, mechanism, noise_multiplier, clip_norm, contributors, noise_std, delta,
                             eps_prv, eps_rdp, version))

    def privacy_rounds(self, run_id: str) -> list[dict]:
        rows = self.db.execute("SELECT round, mechanism, noise_multiplier, clip_norm, contributors, noise_std, delta, "
                               "epsilon_prv, epsilon_rdp FROM privacy_rounds WHERE run_id = ? ORDER BY round",
                               (run_id,)).fetchall()
        keys = ("round", "mechanism", "noise_multiplier", "clip_norm", "contributors", "noise_std", "delta",
                "epsilon_prv", "epsilon_rdp")
        return [dict(zip(keys, r)) for r in rows]

    def aborted_count(self, run_id: str) -> int:
        return self.db.execute("SELECT COUNT(*) FROM aborted_attempts WHERE run_id = ?", (run_id,)).fetchone()[0]

    def record_refusal(self, peer: str, method: str, code: str, reason: str) -> None:
        with self._lock, self.db:
            self.db.execute("INSERT INTO refusals VALUES (?, ?, ?, ?, ?)", (time.time(), peer, method, code, reason))

    def refusal_counts(self) -> list[tuple[str, str, int]]:
        """(method, code, count) of every refusal recorded, for the metrics endpoint."""
        return self.db.execute("SELECT method, code, COUNT(*) FROM refusals GROUP BY method, code "
                               "ORDER BY method, code").fetchall()

    def uploads(self, run_id: str) -> list[dict]:
        rows = self.db.execute("SELECT round, site_id, num_samples, tensors_json, bytes, update_digest "
                               "FROM uploads WHERE run_id = ? ORDER BY round, site_id", (run_id,)).fetchall()
        return [dict(round=r, site_id=p, num_samples=n, tensors=json.loads(t), bytes=b, update_digest=d)
                for r, p, n, t, b, d in rows]

    # -- files --------------------------------------------------------------------------------
    def _run_dir(self, run_id: str) -> Path:
        return self.root / "runs" / run_id

    def _write_state(self, run_id: str, round_no: int, state: Mapping[str, np.ndarray]) -> StateFile:
        directory = self._run_dir(run_id)
        directory.mkdir(parents=True, exist_ok=True)
        return write_state_file(directory / f"round-{round_no:05d}.safetensors", state,
                                {"run_id": run_id, "round": str(round_no)})

    def sweep(self, run_id: str) -> list[Path]:
        """Remove temporaries and files of rounds that never committed (a crash between the two steps)."""
        directory = self._run_dir(run_id)
        if not directory.is_dir():
            return []
        known = {r[0] for r in self.db.execute("SELECT state_file FROM rounds WHERE run_id = ?", (run_id,))}
        removed = []
        for path in directory.iterdir():
            if path.name.endswith(".tmp") or (path.suffix == ".safetensors" and path.name not in known):
                path.unlink()
                removed.append(path)
        if removed:
            log.warning("removed %d uncommitted state file(s): %s", len(removed), ", ".join(p.name for p in removed))
        return removed

__all__ = ["CorruptStateError", "RoundRecord", "RunRecord", "Store", "UploadRecord"]
