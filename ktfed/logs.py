"""Log set-up for the services: human text (default) or one JSON object per line.

JSON lines carry `time` (UTC, ISO 8601 with milliseconds), `level`, `logger`, `message`, the
process and thread, `fields` (anything passed with `extra=`), and `exception` when there is one.
ktfed never logs key material; as a second line of defence, a field whose name looks like a
secret (key, secret, password, token, ...) is written as "[redacted]".
"""
from __future__ import annotations

import datetime as dt
import json
import logging
import sys
from pathlib import Path

from kt_core.bounded import escape_control

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_STANDARD = set(vars(logging.LogRecord("x", 0, "x", 0, "x", None, None))) | {"message", "asctime", "taskName"}
_SECRET_WORDS = ("key", "secret", "password", "passwd", "token", "credential", "private")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": dt.datetime.fromtimestamp(record.created, dt.timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "process": record.process,
            "thread": record.threadName,
        }
        fields = {k: _jsonable(k, v) for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")}
        if fields:
            entry["fields"] = fields
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, separators=(",", ":"))


class TextFormatter(logging.Formatter):
    """One record, one line: a peer's text inside a message (a Leave reason, Join capabilities)
    can carry newlines that would otherwise forge whole log lines. Tracebacks are ours and stay
    multi-line."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        return escape_control(super().formatMessage(record))


def _jsonable(name: str, value):
    if any(word in name.lower() for word in _SECRET_WORDS):
        return "[redacted]"
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    try:
        json.dumps(value)
        return value
    except (TypeError, ValueError):
        return repr(value)


def setup_logging(level: str, log_file: str | None, fmt: str = "text") -> None:
    handler: logging.Handler = logging.StreamHandler(sys.stderr)
    if log_file:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(log_file)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter(TEXT_FORMAT))
    logging.basicConfig(level=getattr(logging, level.upper()), handlers=[handler], force=True)
