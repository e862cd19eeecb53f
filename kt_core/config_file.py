"""Reading a settings file: one reader and one error type for every TOML file ktfed takes.

The run config (kt_core.config), a site's policy (participant.policy), a site's `[distill]`
section (kt_core.distill.config) and a pretraining config (kt_core.vln.pretrain) are all read by
`load_table` and built by `build` or `coerce`, so each refuses a file the same way: bounded in
size and nesting before it is parsed, every key checked against the fields it may set (a misspelt
key silently ignored is a setting the operator believes they have and do not), every value against
its field's type, and every error a `ConfigError` whose message starts with the file and the
dotted field name, e.g. `site-policy.toml: egress.max_upload_bytes: expected an integer, got 'a lot'`.
"""
from __future__ import annotations

import dataclasses
import math
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, Iterable

from kt_core.bounded import MAX_TOML_DEPTH, BoundedInputError, check_toml_depth, depth_of

# A settings file is a page of text: anything larger is a mistake or an attack, refused unread.
MAX_CONFIG_BYTES = 1 << 20


class ConfigError(ValueError):
    """An invalid settings file or value; the message names the file (where there is one) and
    starts the rest with the dotted name of the field."""


class RunUnworkable(ConfigError):
    """A run whose own settings cannot work at this site: its privacy target at this site's
    record count, a partition that leaves the site no data. Not the site's fault (its files, its
    installed task): the site declines the run and stays up for the next one (participant.site_run),
    telling the coordinator `public`, which names the setting but none of the site's own numbers
    (its record count, its sample rate); the message itself stays in the site's log and audit."""

    def __init__(self, message: str, public: str | None = None):
        super().__init__(message)
        self.public = public if public is not None else message


def read_text(path: Path | str, what: str = "settings file", max_bytes: int = MAX_CONFIG_BYTES) -> str:
    """The file's text; a ConfigError naming the file when it is missing, unreadable, too large or
    not UTF-8."""
    path = Path(path)
    try:
        with path.open("rb") as fh:
            data = fh.read(max_bytes + 1)
        if len(data) > max_bytes:
            raise ConfigError(f"{path}: the {what} is larger than {max_bytes} bytes")
        return data.decode("utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: cannot read the {what}: file not found") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: cannot read the {what}: {err}") from None


def parse_toml(text: str, source: str) -> dict:
    """The TOML document as tables, refused (ConfigError naming `source`) when it is not valid TOML
    or nests deeper than MAX_TOML_DEPTH; the depth is checked on the text first, since the parser
    itself recurses."""
    try:
        check_toml_depth(text, what=source)
        table = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{source}: not valid TOML: {err}") from None
    except BoundedInputError as err:
        message = str(err)
        raise ConfigError(message if message.startswith(source) else f"{source}: {message}") from None
    if (depth := depth_of(table)) > MAX_TOML_DEPTH:
        raise ConfigError(f"{source}: tables nested {depth} levels deep (at most {MAX_TOML_DEPTH})")
    return table


def load_table(path: Path | str, what: str = "settings file") -> dict:
    """`read_text` then `parse_toml`: a file's tables, every error naming the file."""
    return parse_toml(read_text(path, what), str(path))


def check_known(table: Any, known: Iterable[str], where: str, kind: str = "field") -> dict:
    """`table` must be a table whose keys are all in `known`; returns it."""
    if not isinstance(table, dict):
        raise ConfigError(f"{where or '<root>'}: expected a table, got {type(table).__name__}")
    known = set(known)
    unknown = sorted(set(table) - known)
    if unknown:
        name = f"{where}.{unknown[0]}" if where else unknown[0]
        raise ConfigError(f"{name}: unknown {kind} (known: {', '.join(sorted(known))})")
    return table


def build(cls: type, table: Any, where: str, skip: Iterable[str] = ()):
    """Dataclass `cls` from a TOML table: every key a field of `cls` (except those in `skip`,
    which the caller fills), every value coerced to its field's type, then `cls.validate()` when it
    has one; its ValueError becomes a ConfigError qualified with `where`."""
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)} - set(skip)
    check_known(table, fields, where)
    obj = cls(**{key: coerce(hints[key], value, f"{where}.{key}") for key, value in table.items()})
    validate = getattr(obj, "validate", None)
    if validate is not None:
        try:
            validate()
        except ConfigError:
            raise
        except ValueError as err:
            message = str(err)
            # the sections' own checks say "field: problem"; qualify it with the section
            raise ConfigError(message if message.startswith(where) else f"{where}.{message}") from None
    return obj


def coerce(hint: Any, value: Any, where: str):
    """`value` checked against the type `hint` (TOML has lists where the field has a tuple)."""
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return build(hint, value, where)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        return coerce(next(a for a in typing.get_args(hint) if a is not type(None)), value, where)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, got {type(value).__name__}")
        item = typing.get_args(hint)[1]
        return {str(k): coerce(item, v, f"{where}.{k}") for k, v in value.items()}
    if origin is tuple:
        item = typing.get_args(hint)[0]
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list of {_type_words(item)}, got {type(value).__name__}")
        return tuple(coerce(item, v, f"{where}[{i}]") for i, v in enumerate(value))
    return _scalar(hint, value, where)


def _scalar(hint: Any, value: Any, where: str):
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if hint is float:
        # no setting of ktfed means anything at infinity or NaN; refusing them here means no
        # section's own check can forget to
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{where}: must be a finite number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported field type {hint}")


def _type_words(hint: Any) -> str:
    return {bool: "true/false values", int: "integers", float: "numbers", str: "strings"}.get(hint, "values")
