"""Byte encoding for SecAgg messages: no pickle, every field checked on the way in.

Frame: b"KSA1" | kind (1 byte) | header length (4 bytes, big-endian) | header | blob
The header is UTF-8 JSON (bytes fields as base64); the blob carries bulk data (masked vectors)
as raw little-endian words, so a 10^6-entry vector is not inflated by base64.
"""
from __future__ import annotations

import base64
import binascii
import json
import struct
from typing import Any

from kt_core.bounded import loads_json

from .errors import SecAggError

MAGIC = b"KSA1"
MAX_ID_CHARS = 256
MAX_LIST = 1 << 16
HEADER_DEPTH = 8        # the deepest honest header is an object of lists of objects


def frame(kind: int, header: dict, blob: bytes = b"") -> bytes:
    h = json.dumps(header, separators=(",", ":"), sort_keys=True).encode("utf-8")
    return MAGIC + bytes([kind]) + struct.pack(">I", len(h)) + h + blob


def unframe(data: bytes, kind: int, what: str) -> tuple[dict, memoryview]:
    """The header, and the bytes after it as a read-only view into `data` (a masked vector is as
    large as the update: it is not copied here)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise SecAggError(f"{what}: expected bytes, got {type(data).__name__}")
    data = memoryview(data).cast("B").toreadonly()
    if len(data) < 9 or data[:4] != MAGIC:
        raise SecAggError(f"{what}: not a SecAgg message (bad magic or too short)")
    if data[4] != kind:
        raise SecAggError(f"{what}: wrong message kind {data[4]} (expected {kind})")
    (hlen,) = struct.unpack(">I", data[5:9])
    if 9 + hlen > len(data):
        raise SecAggError(f"{what}: truncated header")
    try:
        # bounded: a peer's header of nested brackets must be a refusal, not a RecursionError
        header = loads_json(bytes(data[9:9 + hlen]), max_depth=HEADER_DEPTH, max_int_digits=160, what="header")
    except (UnicodeDecodeError, ValueError) as err:   # BoundedInputError is a ValueError
        raise SecAggError(f"{what}: header is not valid JSON ({err})") from None
    if not isinstance(header, dict):
        raise SecAggError(f"{what}: header must be a JSON object")
    return header, data[9 + hlen:]


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


class Fields:
    """Typed access to one header (or nested object) that raises SecAggError naming the field."""

    def __init__(self, obj: Any, what: str):
        if not isinstance(obj, dict):
            raise SecAggError(f"{what}: expected an object")
        self.obj, self.what = obj, what

    def _get(self, name: str):
        if name not in self.obj:
            raise SecAggError(f"{self.what}: missing field {name!r}")
        return self.obj[name]

    def str(self, name: str) -> str:
        v = self._get(name)
        if not isinstance(v, str) or not 0 < len(v) <= MAX_ID_CHARS:
            raise SecAggError(f"{self.what}: field {name!r} must be a non-empty string of at most "
                              f"{MAX_ID_CHARS} characters")
        return v

    def int(self, name: str, lo: int = 0, hi: int = (1 << 63) - 1) -> int:
        v = self._get(name)
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            raise SecAggError(f"{self.what}: field {name!r} must be an integer in {lo}..{hi}")
        return v

    def bytes(self, name: str, length: int | None = None, allow_empty: bool = False) -> bytes:
        v = self._get(name)
        if not isinstance(v, str):
            raise SecAggError(f"{self.what}: field {name!r} must be base64 text")
        try:
            raw = base64.b64decode(v.encode("ascii"), validate=True)
        except (binascii.Error, UnicodeEncodeError):
            raise SecAggError(f"{self.what}: field {name!r} is not valid base64") from None
        if length is not None and len(raw) != length:
            raise SecAggError(f"{self.what}: field {name!r} must be {length} bytes, got {len(raw)}")
        if not raw and not allow_empty:
            raise SecAggError(f"{self.what}: field {name!r} is empty")
        return raw

    def list(self, name: str) -> list:
        v = self._get(name)
        if not isinstance(v, list) or len(v) > MAX_LIST:
            raise SecAggError(f"{self.what}: field {name!r} must be a list of at most {MAX_LIST} items")
        return v

    def ids(self, name: str) -> tuple[str, ...]:
        items = self.list(name)
        if not all(isinstance(i, str) and 0 < len(i) <= MAX_ID_CHARS for i in items):
            raise SecAggError(f"{self.what}: field {name!r} must list participant ids (strings)")
        if len(set(items)) != len(items):
            raise SecAggError(f"{self.what}: field {name!r} lists a participant twice")
        return tuple(items)

    def bytes_map(self, name: str, length: int) -> dict[str, bytes]:
        v = self._get(name)
        if not isinstance(v, dict) or len(v) > MAX_LIST:
            raise SecAggError(f"{self.what}: field {name!r} must be an object of participant id -> bytes")
        sub = Fields(v, f"{self.what}.{name}")
        return {k: sub.bytes(k, length) for k in v if sub.str_key(k)}

    def str_key(self, key: Any) -> bool:
        if not isinstance(key, str) or not 0 < len(key) <= MAX_ID_CHARS:
            raise SecAggError(f"{self.what}: bad participant id {key!r}")
        return True
