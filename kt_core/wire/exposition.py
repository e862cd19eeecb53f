"""Prometheus text exposition (format 0.0.4) over a plain `http.server`, for every ktfed service.

No dependency: a service hands `MetricsServer` a function that returns its samples at scrape
time; the page is rendered fresh on every GET of /metrics. Served on the address the operator
gives (`--metrics-listen`); off by default.
"""
from __future__ import annotations

import logging
import math
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Iterable, Mapping

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@dataclass
class Metric:
    """One metric family: a name, its type (counter, gauge, histogram), help, and samples."""

    name: str
    kind: str
    help: str
    samples: list[tuple[str, Mapping[str, str], float]] = field(default_factory=list)

    def add(self, value: float, labels: Mapping[str, str] | None = None, suffix: str = "") -> "Metric":
        self.samples.append((suffix, dict(labels or {}), float(value)))
        return self


def histogram(name: str, help_text: str, values: Iterable[float], buckets: Iterable[float]) -> Metric:
    values = list(values)
    metric = Metric(name, "histogram", help_text)
    for bound in buckets:
        metric.add(sum(1 for v in values if v <= bound), {"le": _num(bound)}, "_bucket")
    metric.add(len(values), {"le": "+Inf"}, "_bucket")
    metric.add(sum(values), suffix="_sum")
    metric.add(len(values), suffix="_count")
    return metric


def _num(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value)) if value != int(value) or abs(value) >= 1e15 else str(int(value))


def _label_value(text: str) -> str:
    return str(text).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def render(metrics: Iterable[Metric]) -> str:
    lines = []
    for m in metrics:
        lines.append(f"# HELP {m.name} {m.help}")
        lines.append(f"# TYPE {m.name} {m.kind}")
        for suffix, labels, value in m.samples:
            label_text = ",".join(f'{k}="{_label_value(v)}"' for k, v in labels.items())
            lines.append(f"{m.name}{suffix}{{{label_text}}} {_num(value)}" if label_text
                         else f"{m.name}{suffix} {_num(value)}")
    return "\n".join(lines) + "\n"


def parse(text: str) -> dict[tuple[str, frozenset], float]:
    """The samples of an exposition page: {(name, frozenset(labels.items())): value}. For tests
    and `ktfed status`; handles what `render` writes (no escaped quotes inside label values)."""
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        head, value = line.rsplit(" ", 1)
        labels: dict[str, str] = {}
        if "{" in head:
            name, rest = head.split("{", 1)
            for part in filter(None, rest.rstrip("}").split('",')):
                key, val = part.split('="', 1)
                labels[key] = val.rstrip('"')
        else:
            name = head
        out[(name, frozenset(labels.items()))] = float(value)
    return out


class MetricsServer:
    """GET /metrics -> the text of `collect()`; GET /healthz -> ok. Runs in daemon threads."""

    def __init__(self, listen: str, collect: Callable[[], Iterable[Metric]]):
        host, _, port = listen.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"--metrics-listen must be HOST:PORT, got {listen!r}")
        collect_fn = collect

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's name
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    try:
                        body, status = render(collect_fn()).encode(), 200
                    except Exception as err:  # noqa: BLE001 - a scrape must not kill the service
                        log.warning("metrics collection failed: %s", err)
                        body, status = f"metrics collection failed: {err}\n".encode(), 500
                    ctype = CONTENT_TYPE
                elif path == "/healthz":
                    body, status, ctype = b"ok\n", 200, "text/plain"
                else:
                    body, status, ctype = b"not found\n", 404, "text/plain"
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, fmt, *args):  # scrapes every few seconds: keep them out of the log
                log.debug("metrics %s: " + fmt, self.client_address[0], *args)

        self.httpd = ThreadingHTTPServer((host.strip("[]"), int(port)), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="metrics", daemon=True)

    def start(self) -> "MetricsServer":
        self._thread.start()
        log.info("metrics on http://%s:%d/metrics", self.httpd.server_address[0], self.port)
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
