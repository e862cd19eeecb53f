"""Argument types of the `ktfed` command and `KTFED_<FLAG>` environment defaults.

Standard library only: the CLI builds its parser on every invocation."""
from __future__ import annotations

import argparse
import math
import os
import re

ENV_PREFIX = "KTFED_"
TRUE, FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off", ""}

# dest -> (variable, raw value) of the flags whose default came from the environment in the last
# apply_env_defaults: an error about such a value names the variable, not the flag.
_FROM_ENV: dict[str, tuple[str, str]] = {}


def host_port(text: str) -> str:
    """HOST:PORT (a DNS name, an IPv4 address or a [bracketed] IPv6 one; port 0..65535)."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535 \
            or any(c.isspace() for c in text):
        raise argparse.ArgumentTypeError(f"must be HOST:PORT (e.g. 127.0.0.1:9100), got {text!r}")
    return text


def hex_serial(text: str) -> int:
    try:
        return int(text.lower().removeprefix("0x").replace(":", ""), 16)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a hexadecimal serial: {text!r}") from None


def run_id(text: str) -> str:
    """An argparse type: a run id as the coordinator makes them (run- and 12 hex digits)."""
    if not re.fullmatch(r"run-[0-9a-f]{12}", text):
        raise argparse.ArgumentTypeError(f"not a run id (run- and 12 hexadecimal digits): {text[:80]!r}")
    return text


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def int_between(lo: int, hi: int):
    """An argparse type: an integer from lo to hi."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"must be between {lo} and {hi}, got {value}")
        return value
    return parse


def source(args, dest: str, flag: str) -> str:
    """How to name where a flag's value came from: `KTFED_X` when the environment set it."""
    var, raw = _FROM_ENV.get(dest, (None, None))
    if var is not None and str(getattr(args, dest, None)) == raw:
        return var
    return flag


def _naming_variable(convert, var: str, raw: str):
    def converted(text: str):
        try:
            return convert(text)
        except (argparse.ArgumentTypeError, ValueError) as err:
            if text != raw:
                raise
            raise argparse.ArgumentTypeError(f"from the environment, {var}={raw!r}: {err}") from None
    converted.__name__ = getattr(convert, "__name__", "value")
    return converted


def apply_env_defaults(parser: argparse.ArgumentParser, environ=os.environ) -> None:
    """Let every `--flag-name` of every command default to $KTFED_FLAG_NAME (containers configure
    services through the environment); a flag given on the command line still wins. A value that
    the flag would refuse is refused here too, naming the variable."""
    if parser.prog.count(" ") == 0:  # the top-level call: forget an earlier parser's sources
        _FROM_ENV.clear()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in set(action.choices.values()):
                apply_env_defaults(sub, environ)
            continue
        longs = [o for o in action.option_strings if o.startswith("--") and o not in ("--help", "--version")]
        if not longs:
            continue
        var = ENV_PREFIX + longs[0][2:].replace("-", "_").upper()
        if var not in environ:
            continue
        raw = environ[var]
        if isinstance(action, argparse._StoreTrueAction):
            if raw.lower() not in TRUE | FALSE:
                parser.error(f"{var}={raw!r}: expected true or false")
            action.default = raw.lower() in TRUE
        elif action.nargs is None and not isinstance(action, argparse._AppendAction):
            if action.choices is not None and raw not in action.choices:
                parser.error(f"{var}={raw!r}: choose from {', '.join(map(str, action.choices))}")
            if callable(action.type):  # checked when this command is the one run, naming the variable
                action.type = _naming_variable(action.type, var, raw)
            action.default = raw  # argparse applies the flag's type to a string default
            action.required = False
            _FROM_ENV[action.dest] = (var, raw)
