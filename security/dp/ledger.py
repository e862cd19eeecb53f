"""A site's privacy ledger: its own SQLite file in the site's state folder, on the site.

One row per attempt the site trained (or is about to train) with DP: the sampling rate, steps, noise
multiplier, clip norm, delta, epsilon of that attempt alone and cumulative (both accountants), the
budget and what remains, and the accountant with its version: everything an auditor needs to
recompute epsilon. One row per round the site declined, with why.

A row's `state` says what it costs:
    reserved   the budget is taken, training is under way (or the site crashed during it): counted
    spent      DP-SGD ran and its update left the site, or may have: counted
    withheld   DP-SGD ran, but nothing derived from it left the site and the site undid the training
               (its model went back to before it): epsilon 0 added, the row kept for the record
and its `attempt` says what became of the coordinator's attempt: "" (not known to have failed) or
"aborted" (a retry of the same round arrived, or the run ended before the round completed). An
aborted attempt whose update was released stays spent: the coordinator saw the update.

Crash safety: the budget check and the row that spends the budget are one `BEGIN IMMEDIATE`
transaction, written *before* training starts (state `reserved`), then marked `spent` (with the
steps actually taken) after training. A crash during training therefore leaves the round counted:
the ledger never under-counts, and only the site that trained, still holding what it trained,
can withhold a row. Cumulative epsilon is always recomposed from the whole history of (q, sigma,
steps) of the rows that count, never summed from per-round figures. The ledger spans every run this
site took part in: the guarantee is about the site's data, whichever run used it.
"""
from __future__ import annotations

import json
import math
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from kt_core.durable import open_durable_sqlite
from security.dp.accounting import RoundSpend, accountant_version, epsilons

SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    site TEXT NOT NULL, run_id TEXT NOT NULL, round INTEGER NOT NULL, attempt_id TEXT NOT NULL,
    level TEXT NOT NULL,                 -- record (DP-SGD) | user (whole-update clipping + noise)
    sample_rate REAL NOT NULL, steps INTEGER NOT NULL, noise_multiplier REAL NOT NULL,
    max_grad_norm REAL NOT NULL, delta REAL NOT NULL,
    eps_round_prv REAL NOT NULL, eps_round_rdp REAL NOT NULL,
    eps_cum_prv REAL NOT NULL, eps_cum_rdp REAL NOT NULL,
    budget REAL NOT NULL, remaining REAL NOT NULL,
    accountant TEXT NOT NULL, accountant_version TEXT NOT NULL,
    params_json TEXT NOT NULL,           -- every other DP parameter (mechanism, batch, epochs, N, sampling)
    state TEXT NOT NULL,                 -- reserved (training) | spent | withheld (epsilon 0)
    at REAL NOT NULL,
    attempt TEXT NOT NULL DEFAULT '',    -- '' | aborted (the coordinator's attempt did not complete)
    note TEXT NOT NULL DEFAULT '');      -- why a row was withheld or its attempt marked aborted
CREATE TABLE IF NOT EXISTS declines (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    site TEXT NOT NULL, run_id TEXT NOT NULL, round INTEGER NOT NULL, attempt_id TEXT NOT NULL,
    reason TEXT NOT NULL, eps_spent REAL NOT NULL, eps_would_be REAL NOT NULL, budget REAL NOT NULL,
    accountant TEXT NOT NULL, at REAL NOT NULL);
"""

LEDGER_FILE = "privacy-ledger.sqlite3"
# columns added since the first ledgers were written: an older file gains them when it is opened
_ADDED_COLUMNS = {"attempt": "TEXT NOT NULL DEFAULT ''", "note": "TEXT NOT NULL DEFAULT ''"}
# columns renamed since (the coordinator's per-attempt id was called task_id): an older file's are
# renamed when it is opened, so a site keeps its whole history, and with it its spent budget
_RENAMED_COLUMNS = {"task_id": "attempt_id"}
# the states whose epsilon counts (everything but a row the site withheld)
COUNTED = ("reserved", "spent")


class BudgetExceeded(Exception):
    """Training this round would take the site past its budget: the round is declined."""

    def __init__(self, message: str, spent: float, would_be: float, budget: float):
        super().__init__(message)
        self.spent, self.would_be, self.budget = spent, would_be, budget


@dataclass(frozen=True)
class LedgerEntry:
    seq: int
    site: str
    run_id: str
    round: int
    attempt_id: str
    level: str
    sample_rate: float
    steps: int
    noise_multiplier: float
    max_grad_norm: float
    delta: float
    eps_round_prv: float
    eps_round_rdp: float
    eps_cum_prv: float
    eps_cum_rdp: float
    budget: float
    remaining: float
    accountant: str
    accountant_version: str
    params: dict = field(default_factory=dict)
    state: str = "spent"
    at: float = 0.0
    attempt: str = ""
    note: str = ""

    @property
    def counts(self) -> bool:
        """Whether this row's epsilon is part of the site's cumulative figure."""
        return self.state in COUNTED

    @property
    def spend(self) -> RoundSpend:
        return RoundSpend(self.sample_rate, self.noise_multiplier, self.steps)

    def eps_cum(self) -> float:
        return self.eps_cum_prv if self.accountant == "prv" else self.eps_cum_rdp

    def to_dict(self) -> dict:
        return asdict(self)


_ENTRY_COLUMNS = ("seq, site, run_id, round, attempt_id, level, sample_rate, steps, noise_multiplier, max_grad_norm, "
                  "delta, eps_round_prv, eps_round_rdp, eps_cum_prv, eps_cum_rdp, budget, remaining, accountant, "
                  "accountant_version, params_json, state, at, attempt, note")


def _entry_of(row) -> LedgerEntry:
    return LedgerEntry(*row[:19], params=json.loads(row[19]), state=row[20], at=row[21], attempt=row[22],
                       note=row[23])


class PrivacyLedger:
    def __init__(self, path: Path, site: str):
        """`path`: the ledger file, or an existing folder to hold LEDGER_FILE."""
        self.path = Path(path)
        if self.path.is_dir():
            self.path = self.path / LEDGER_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.site = site
        self._lock = threading.Lock()
        self.db = self._open(self.path)
        have = {row[1] for row in self.db.execute("PRAGMA table_info(entries)")}
        for column, kind in _ADDED_COLUMNS.items():
            if column not in have:
                self.db.execute(f"ALTER TABLE entries ADD COLUMN {column} {kind}")

    @staticmethod
    def _open(path: Path):
        """The ledger file, its tables renamed to today's columns first when it is an older one
        (the schema's CREATE ... IF NOT EXISTS would otherwise leave the old tables as they are)."""
        db = open_durable_sqlite(path, "")
        for table in ("entries", "declines"):
            have = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
            for old, new in _RENAMED_COLUMNS.items():
                if old in have:
                    db.execute(f"ALTER TABLE {table} RENAME COLUMN {old} TO {new}")
        db.executescript(SCHEMA)
        return db

    def close(self) -> None:
        with self._lock:
            self.db.close()

    # -- reading ---------------------------------------------------------------------------------
    def entries(self, level: str | None = None) -> list[LedgerEntry]:
        sql = f"SELECT {_ENTRY_COLUMNS} FROM entries WHERE site = ?"
        args: list = [self.site]
        if level:
            sql += " AND level = ?"
            args.append(level)
        rows = self.db.execute(sql + " ORDER BY seq", args).fetchall()
        return [_entry_of(r) for r in rows]

    def counted(self, level: str | None = None) -> list[LedgerEntry]:
        """The rows whose epsilon counts (not the withheld ones)."""
        return [e for e in self.entries(level) if e.counts]

    def declines(self) -> list[dict]:
        rows = self.db.execute("SELECT seq, run_id, round, attempt_id, reason, eps_spent, eps_would_be, budget, "
                               "accountant, at FROM declines WHERE site = ? ORDER BY seq", (self.site,)).fetchall()
        keys = ("seq", "run_id", "round", "attempt_id", "reason", "eps_spent", "eps_would_be", "budget", "accountant", "at")
        return [dict(zip(keys, r)) for r in rows]

    def history(self, level: str = "record") -> list[RoundSpend]:
        return [e.spend for e in self.counted(level)]

    def spent(self, delta: float, level: str = "record") -> dict[str, float]:
        """Cumulative epsilon of everything this site has spent (or reserved) at `delta`."""
        return epsilons(self.history(level), delta)

    def preview(self, spend: RoundSpend, delta: float, level: str = "record") -> dict[str, float]:
        """The cumulative epsilon this site would have after also spending `spend`."""
        return epsilons(self.history(level) + [spend], delta)

    # -- writing ---------------------------------------------------------------------------------
    def reserve(self, *, run_id: str, round_no: int, attempt_id: str, spend: RoundSpend, max_grad_norm: float,
                delta: float, budget: float, accountant: str = "prv", level: str = "record",
                params: dict | None = None) -> LedgerEntry:
        """Check the budget and record the round in one transaction, before any training.

        Raises BudgetExceeded (and records nothing) when the round would exceed `budget`."""
        with self._lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                previous = self.counted(level)
                history = [e.spend for e in previous]
                last = previous[-1] if previous else None
                # the last row's cumulative figures are this history's epsilon at its delta
                before = ({"prv": last.eps_cum_prv, "rdp": last.eps_cum_rdp} if last and last.delta == delta
                          else epsilons(history, delta))
                after = epsilons(history + [spend], delta)
                alone = epsilons([spend], delta)
                if after[accountant] > budget * (1 + 1e-9):
                    raise BudgetExceeded(
                        f"privacy budget: training round {round_no} would take epsilon from "
                        f"{before[accountant]:.4f} to {after[accountant]:.4f} ({accountant}, delta={delta:g}), "
                        f"past this site's budget {budget:g}", before[accountant], after[accountant], budget)
                now = time.time()
                cur = self.db.execute(
                    f"INSERT INTO entries ({_ENTRY_COLUMNS.replace('seq, ', '', 1)}) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'reserved', ?, '', '')",
                    (self.site, run_id, round_no, attempt_id, level, spend.sample_rate, spend.steps,
                     spend.noise_multiplier, max_grad_norm, delta, alone["prv"], alone["rdp"], after["prv"],
                     after["rdp"], budget, budget - after[accountant], accountant, accountant_version(),
                     json.dumps(params or {}, sort_keys=True), now))
                seq = cur.lastrowid
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
        return self._entry(seq)

    def settle(self, entry: LedgerEntry, steps_taken: int) -> LedgerEntry:
        """Mark a reserved round spent. Fewer steps than reserved (a step cap) lower its figures;
        more than reserved is impossible (the training loop stops at the reservation)."""
        if steps_taken > entry.steps:
            raise ValueError(f"round {entry.round} took {steps_taken} steps, {entry.steps} were reserved")
        with self._lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                if steps_taken != entry.steps:
                    spend = RoundSpend(entry.sample_rate, entry.noise_multiplier, steps_taken)
                    history = [e.spend for e in self.counted(entry.level) if e.seq < entry.seq]
                    alone, cum = epsilons([spend], entry.delta), epsilons(history + [spend], entry.delta)
                    self.db.execute("UPDATE entries SET steps = ?, eps_round_prv = ?, eps_round_rdp = ?, "
                                    "eps_cum_prv = ?, eps_cum_rdp = ?, remaining = budget - ? WHERE seq = ?",
                                    (steps_taken, alone["prv"], alone["rdp"], cum["prv"], cum["rdp"],
                                     cum[entry.accountant], entry.seq))
                self.db.execute("UPDATE entries SET state = 'spent' WHERE seq = ?", (entry.seq,))
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
        return self._entry(entry.seq)

    def withhold(self, entry: LedgerEntry, note: str) -> LedgerEntry:
        """Mark a trained row withheld: nothing derived from its training left the site, and the
        caller has undone that training. Its epsilon no longer counts (the row shows 0 for the
        attempt and the cumulative figure of the rows before it); its q, sigma and steps stay, so
        the record says what DP-SGD ran. Only the site's last counted row can be withheld: a later
        row was accounted with this one in it."""
        with self._lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                counted = self.counted(entry.level)
                if not counted or counted[-1].seq != entry.seq:
                    raise ValueError(f"ledger row {entry.seq} is not the last counted row: it cannot be withheld")
                before = epsilons([e.spend for e in counted[:-1]], entry.delta)
                self.db.execute("UPDATE entries SET state = 'withheld', eps_round_prv = 0, eps_round_rdp = 0, "
                                "eps_cum_prv = ?, eps_cum_rdp = ?, remaining = budget - ?, note = ? WHERE seq = ?",
                                (before["prv"], before["rdp"], before[entry.accountant], note, entry.seq))
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
        return self._entry(entry.seq)

    def mark_aborted(self, *, run_id: str, round_no: int | None = None, after_round: int | None = None,
                     keep_attempt_id: str = "", note: str) -> list[LedgerEntry]:
        """Mark the attempts that did not complete: those of `round_no` other than `keep_attempt_id`
        (a retry of the round arrived), or every attempt of a round after `after_round` (the run
        ended having completed only that many). Their states (what they cost) do not change."""
        if (round_no is None) == (after_round is None):
            raise ValueError("give round_no or after_round")
        where, args = ("round = ? AND attempt_id != ?", [round_no, keep_attempt_id]) if round_no is not None \
            else ("round > ?", [after_round])
        with self._lock, self.db:
            self.db.execute("BEGIN IMMEDIATE")
            seqs = [r[0] for r in self.db.execute(
                f"SELECT seq FROM entries WHERE site = ? AND run_id = ? AND attempt = '' AND {where}",  # noqa: S608
                [self.site, run_id, *args])]
            # a withheld row keeps why it was withheld, and gains why its attempt ended
            self.db.executemany("UPDATE entries SET attempt = 'aborted', "
                                "note = CASE WHEN note = '' THEN ? ELSE note || '; ' || ? END WHERE seq = ?",
                                [(note, note, seq) for seq in seqs])
        return [self._entry(seq) for seq in seqs]

    def record_decline(self, *, run_id: str, round_no: int, attempt_id: str, reason: str, spent: float,
                       would_be: float, budget: float, accountant: str) -> None:
        with self._lock, self.db:
            self.db.execute("BEGIN IMMEDIATE")
            self.db.execute("INSERT INTO declines (site, run_id, round, attempt_id, reason, eps_spent, eps_would_be, "
                            "budget, accountant, at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                            (self.site, run_id, round_no, attempt_id, reason, spent,
                             would_be if math.isfinite(would_be) else -1.0, budget, accountant, time.time()))

    def _entry(self, seq: int) -> LedgerEntry:
        return _entry_of(self.db.execute(f"SELECT {_ENTRY_COLUMNS} FROM entries WHERE seq = ?", (seq,)).fetchone())

    # -- presentation ----------------------------------------------------------------------------
    def table(self) -> str:
        head = (f"{'run':<14} {'round':>5} {'level':<6} {'q':>8} {'steps':>6} {'sigma':>7} {'clip':>6} {'delta':>8} "
                f"{'eps_rnd':>8} {'eps_cum':>8} {'eps_rdp':>8} {'budget':>7} {'left':>7} {'state':<34} accountant")
        lines = [f"privacy ledger of {self.site} ({self.path})", head]
        entries = self.entries()
        for e in entries:
            lines.append(f"{e.run_id[:14]:<14} {e.round:>5} {e.level:<6} {e.sample_rate:>8.4f} {e.steps:>6} "
                         f"{e.noise_multiplier:>7.3f} {e.max_grad_norm:>6.2f} {e.delta:>8.1e} "
                         f"{(e.eps_round_prv if e.accountant == 'prv' else e.eps_round_rdp):>8.4f} "
                         f"{e.eps_cum():>8.4f} {e.eps_cum_rdp:>8.4f} {e.budget:>7.3f} {e.remaining:>7.3f} "
                         f"{describe_state(e):<34} {e.accountant} ({e.accountant_version})")
        for e in entries:
            if e.note:
                lines.append(f"note: run {e.run_id} round {e.round} (task {e.attempt_id[:8]}): {e.note}")
        for d in self.declines():
            lines.append(f"declined: run {d['run_id']} round {d['round']}: {d['reason']}")
        if len(lines) == 2:
            lines.append("(no rounds recorded)")
        counted = [e for e in entries if e.counts]
        if counted:
            last = counted[-1]
            withheld = len(entries) - len(counted)
            aborted = sum(e.attempt == "aborted" for e in counted)
            lines.append(f"spent: epsilon {last.eps_cum():.4f} ({last.accountant}, delta {last.delta:g}) over "
                         f"{len(counted)} attempt(s), {aborted} of them in attempts the coordinator aborted; "
                         f"{withheld} withheld (not released, epsilon 0)")
        return "\n".join(lines)


def describe_state(entry: LedgerEntry) -> str:
    """The table's state column: what the row costs, then what became of its attempt."""
    shown = "withheld (eps 0)" if entry.state == "withheld" else entry.state
    return f"{shown}, attempt aborted" if entry.attempt == "aborted" else shown
