"""The coordinator's Prometheus metrics: read at scrape time from the engine and the store.

Counters that exist only in this process (bytes streamed in and out) live in `Traffic`; the
rest is derived from state that survives a restart (rounds, aborted attempts, refusals).
"""
from __future__ import annotations

import threading

from coordinator.coordinator import Coordinator
from kt_core.wire.exposition import Metric, histogram

ROUND_SECONDS_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Traffic:
    """Bytes of tensor data received (uploads) and sent (state downloads) since the process started."""

    def __init__(self):
        self._lock = threading.Lock()
        self.bytes_in = 0
        self.bytes_out = 0
        self.uploads = 0
        self.downloads = 0

    def received(self, n: int) -> None:
        with self._lock:
            self.bytes_in += n
            self.uploads += 1

    def sent(self, n: int) -> None:
        with self._lock:
            self.bytes_out += n

    def download_done(self) -> None:
        with self._lock:
            self.downloads += 1


def process_memory() -> dict[str, int]:
    """VmRSS and VmHWM of this process in bytes, from /proc/self/status ({} where there is none)."""
    out = {}
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    out[key] = int(value.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        return {}
    return out


def collect(coordinator: Coordinator, traffic: Traffic, serving) -> list[Metric]:
    store = coordinator.store
    metrics = [
        Metric("ktfed_coordinator_serving", "gauge", "1 when the health service reports SERVING").add(
            1 if serving() else 0),
        Metric("ktfed_bytes_received_total", "counter",
               "tensor bytes received in participant uploads (this process)").add(traffic.bytes_in),
        Metric("ktfed_bytes_sent_total", "counter",
               "tensor bytes sent in global-state downloads (this process)").add(traffic.bytes_out),
        Metric("ktfed_uploads_total", "counter", "uploads fully received (this process)").add(traffic.uploads),
        Metric("ktfed_state_downloads_total", "counter", "global-state downloads served (this process)").add(
            traffic.downloads),
    ]
    memory = process_memory()
    if memory:  # the process's own accounting (Linux): what the streaming aggregation keeps bounded
        metrics += [
            Metric("ktfed_coordinator_rss_bytes", "gauge", "resident set size of this process").add(memory["VmRSS"]),
            Metric("ktfed_coordinator_peak_rss_bytes", "gauge", "peak resident set size of this process (VmHWM)").add(
                memory["VmHWM"]),
        ]
    refusals = Metric("ktfed_refusals_total", "counter", "requests refused, by gRPC code and method (persisted)")
    for method, code, count in store.refusal_counts():
        refusals.add(count, {"code": code, "method": method})
    metrics.append(refusals)
    engine = coordinator.engine
    if engine is None:
        return metrics
    run = {"run_id": engine.run_id}
    status = engine.status()
    records = store.rounds(engine.run_id)
    metrics += [
        Metric("ktfed_run_info", "gauge", "the current run (value 1) and its state").add(
            1, {**run, "state": status.state}),
        Metric("ktfed_rounds_completed_total", "counter", "rounds completed in the current run").add(
            status.rounds_completed, run),
        Metric("ktfed_rounds_total", "gauge", "rounds the current run is configured for").add(
            status.rounds_total, run),
        Metric("ktfed_round_in_progress", "gauge", "the round being collected (0 when none)").add(
            status.round_in_progress, run),
        Metric("ktfed_aborted_attempts_total", "counter", "round attempts aborted (too few updates)").add(
            status.aborted_attempts, run),
        Metric("ktfed_sites_connected", "gauge", "participants holding an assignment stream").add(
            sum(p.connected for p in status.sites), run),
        histogram("ktfed_round_duration_seconds", "wall time of each completed round of the current run",
                  (r.seconds for r in records), ROUND_SECONDS_BUCKETS),
        Metric("ktfed_round_bytes_received_total", "counter", "update bytes aggregated in completed rounds").add(
            sum(r.bytes_received for r in records), run),
    ]
    connected = Metric("ktfed_site_connected", "gauge", "1 when the site holds an assignment stream")
    contributed = Metric("ktfed_site_rounds_contributed_total", "counter", "rounds the site contributed to")
    uploaded = Metric("ktfed_site_update_bytes_total", "counter",
                      "update bytes the coordinator accepted from the site")
    epsilon = Metric("ktfed_site_epsilon_spent", "gauge", "the site's reported cumulative epsilon")
    budget = Metric("ktfed_site_epsilon_budget", "gauge", "the site's epsilon budget (0: none reported)")
    for p in status.sites:
        site = {"site": p.site_id}
        connected.add(1 if p.connected else 0, site)
        contributed.add(p.rounds_contributed, site)
        uploaded.add(p.bytes_uploaded, site)
        epsilon.add(p.epsilon_spent, site)
        budget.add(p.epsilon_budget, site)
    return metrics + [connected, contributed, uploaded, epsilon, budget]
