"""SQLite opened for records that must survive a crash: WAL journal, fsync on every commit."""
from __future__ import annotations

import sqlite3
from pathlib import Path


def open_durable_sqlite(path: Path, schema: str, timeout: float = 30) -> sqlite3.Connection:
    """Autocommit connection (callers BEGIN their own transactions), shareable across threads
    behind the caller's lock, with `schema` applied (CREATE ... IF NOT EXISTS)."""
    db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=timeout)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.executescript(schema)
    return db
