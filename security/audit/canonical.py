"""The one byte encoding that hashes and signatures are computed over.

Canonical JSON: keys sorted, no whitespace, UTF-8, and only these value types: objects with string
keys, arrays, strings, booleans, null and integers within +-(2^53 - 1). For that subset the bytes
are exactly what RFC 8785 (JSON Canonicalization Scheme) produces, so an auditor can recompute
every hash with any JCS implementation, without Python.

Floats are the one place where JSON encoders disagree (1e-05 or 0.00001? 0.1 or
0.10000000000000001?), so they never reach the encoder: `normalize` turns each finite float into
the string of Python's shortest round-trip repr ("0.1", "1e-05"), which parses back to the same
double everywhere. Readers turn such fields back with `as_float`. NaN and infinities are refused.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
from typing import Any

from .errors import AuditError

MAX_SAFE_INT = 2**53 - 1


def normalize(value: Any, where: str = "body") -> Any:
    """A JSON-ready copy of `value` in the canonical subset (floats become repr strings; tuples and
    numpy values become lists and Python numbers). Raises AuditError naming the offending path."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        if abs(value) > MAX_SAFE_INT:
            raise AuditError(f"{where}: integer {value} is outside +-(2^53 - 1); store it as a string")
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise AuditError(f"{where}: {value!r} is not a finite number")
        return repr(value)
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise AuditError(f"{where}: key {key!r} is not a string")
            out[key] = normalize(item, f"{where}.{key}")
        return out
    if isinstance(value, (list, tuple)):
        return [normalize(item, f"{where}[{i}]") for i, item in enumerate(value)]
    # numpy scalars and arrays, without importing numpy here
    if hasattr(value, "tolist") and type(value).__module__.startswith("numpy"):
        return normalize(value.tolist(), where)
    if isinstance(value, (bytes, bytearray)):
        raise AuditError(f"{where}: bytes are ambiguous in JSON; give hex or base64 text")
    raise AuditError(f"{where}: cannot store a {type(value).__name__} in the audit log")


def canonical_bytes(value: Any) -> bytes:
    """The canonical encoding of an already normalized value (see `normalize`)."""
    _check_canonical(value, "value")
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")


def _check_canonical(value: Any, where: str) -> None:
    if value is None or isinstance(value, (bool, str)):
        return
    if isinstance(value, int):
        if abs(value) > MAX_SAFE_INT:
            raise AuditError(f"{where}: integer outside +-(2^53 - 1)")
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise AuditError(f"{where}: key {key!r} is not a string")
            _check_canonical(item, f"{where}.{key}")
        return
    if isinstance(value, list):
        for i, item in enumerate(value):
            _check_canonical(item, f"{where}[{i}]")
        return
    raise AuditError(f"{where}: {type(value).__name__} is not allowed in canonical JSON (normalize it first)")


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def as_float(value: Any) -> float | None:
    """Read back a number that `normalize` stored (a repr string or an integer); None stays None."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise AuditError(f"expected a number, got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise AuditError(f"expected a number, got {value!r}") from None


def utc_timestamp(now: dt.datetime | None = None) -> str:
    """RFC 3339 UTC with microseconds: a string, so no float ever encodes time."""
    now = now or dt.datetime.now(dt.timezone.utc)
    return now.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_timestamp(text: str) -> dt.datetime:
    try:
        return dt.datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=dt.timezone.utc)
    except (TypeError, ValueError):
        raise AuditError(f"time {text!r} is not an RFC 3339 UTC timestamp like 2025-01-31T12:00:00.000000Z") from None
