"""Readers for untrusted JSON and TOML that refuse hostile shapes with a clear error.

Python's json and tomllib parsers recurse once per nesting level, so a few kilobytes of `[[[[...`
end in RecursionError (a traceback, not a refusal), and an integer of thousands of digits ends in
a ValueError about "integer string conversion" that names nothing. Every reader of bytes a peer
or a file controls (audit lines, countersignature tokens, SecAgg frame headers, run configs) goes
through here instead:

    loads_json(data, max_depth=32, max_int_digits=20, what="countersignature token")
    check_toml_depth(text, max_depth=16)   before tomllib.loads
    depth_of(value)                        the nesting depth of an already parsed value

Each raises BoundedInputError (a ValueError) whose message names `what` and the limit.

`escape_field` / `escape_control` are the other half of the same defence: free text a peer chose
(a Leave reason, a capability string) is printed with its control characters escaped, so it
cannot start a line of its own in a text log.
"""
from __future__ import annotations

import json
import re
from typing import Any

MAX_JSON_DEPTH = 32
MAX_INT_DIGITS = 20        # 2^64 has 20 digits: every integer field of the wire fits
MAX_TOML_DEPTH = 16

# what may sit inside brackets without counting: JSON strings (with escapes)
_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
# TOML: multi-line and single-line basic and literal strings, and comments
_TOML_SKIP = re.compile(r'"""(?:[^\\]|\\.)*?"""|\'\'\'.*?\'\'\'|"(?:[^"\\\n]|\\.)*"|\'[^\'\n]*\'|#[^\n]*',
                        re.DOTALL)
_BRACKET = re.compile(r"[\[\]{}]")
_CONTROL = re.compile(r"[\x00-\x1f\x7f\u0085\u2028\u2029]")


class BoundedInputError(ValueError):
    """Input refused for its shape (nesting, integer size) before it was parsed further."""


def bracket_depth(text: str, skip: re.Pattern = _JSON_STRING) -> int:
    """The deepest nesting of [ and { in `text`, ignoring what `skip` matches (strings)."""
    depth = deepest = 0
    for match in _BRACKET.finditer(skip.sub("", text)):
        if match.group() in "[{":
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth -= 1
    return deepest


def loads_json(data: bytes | str, *, max_depth: int = MAX_JSON_DEPTH, max_int_digits: int = MAX_INT_DIGITS,
               what: str = "JSON") -> Any:
    """json.loads with bounded nesting and integer size; NaN and Infinity are refused too (they
    are not JSON). Raises BoundedInputError for those, json.JSONDecodeError for malformed text and
    UnicodeDecodeError for bytes that are not UTF-8."""
    text = data.decode("utf-8") if isinstance(data, (bytes, bytearray, memoryview)) else data
    if not isinstance(text, str):
        raise BoundedInputError(f"{what}: expected text, got {type(text).__name__}")
    depth = bracket_depth(text)
    if depth > max_depth:
        raise BoundedInputError(f"{what}: nested {depth} levels deep (at most {max_depth})")

    def bounded_int(digits: str) -> int:
        if len(digits.lstrip("-")) > max_int_digits:
            raise BoundedInputError(f"{what}: an integer of {len(digits.lstrip('-'))} digits "
                                    f"(at most {max_int_digits})")
        return int(digits)

    def no_constant(name: str):
        raise BoundedInputError(f"{what}: {name} is not a JSON number")

    return json.loads(text, parse_int=bounded_int, parse_constant=no_constant)


def check_toml_depth(text: str, max_depth: int = MAX_TOML_DEPTH, what: str = "TOML") -> None:
    """Refuse TOML whose arrays or inline tables nest deeper than `max_depth`, before tomllib
    recurses into it. (Dotted keys nest without recursion: check the parsed table with depth_of.)"""
    depth = bracket_depth(text, _TOML_SKIP)
    if depth > max_depth:
        raise BoundedInputError(f"{what}: arrays or inline tables nested {depth} levels deep (at most {max_depth})")


def depth_of(value: Any) -> int:
    """Nesting depth of parsed JSON/TOML values (a scalar is 0), without recursion."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            item = list(item.values())
        elif not isinstance(item, (list, tuple)):
            continue
        deepest = max(deepest, depth + 1)
        stack.extend((child, depth + 1) for child in item)
    return deepest


def escape_control(text: str) -> str:
    """Control characters (newlines, carriage returns, escape sequences, Unicode line separators)
    as \\xNN / \\uNNNN: what a text log formatter applies to every message."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}" if ord(m.group()) < 0x100
                        else f"\\u{ord(m.group()):04x}", text)


def escape_field(text: Any, limit: int = 200) -> str:
    """A peer's free text made safe for one log line: control characters escaped, cut to `limit`
    characters with the number left out."""
    text = str(text)
    cut = len(text) - limit
    out = escape_control(text[:limit] if cut > 0 else text)
    return out + (f"... ({cut} more characters)" if cut > 0 else "")
