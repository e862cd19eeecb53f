"""Helpers shared by the benchmarks: tables, results files, statistics, and a real local federation.

A benchmark module exposes `NAME`, `DESCRIPTION` and `run(opts) -> dict`; `bench.__main__` prints
what it returns (the tables are printed by the benchmark itself) and writes the JSON.
"""
from __future__ import annotations

import json
import math
import shutil
import socket
import sqlite3
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from kt_core.models import ModelConfig
from ktfed.launcher import Federation, free_port, make_pki
from ktfed.operator import OperatorClient

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass
class Options:
    """What `python -m bench` was asked for; each benchmark reads the fields it understands."""

    quick: bool = False
    rounds: int | None = None        # overrides a benchmark's round count
    max_train: int | None = None     # waffle: training samples before partitioning (0 = all)
    dataset: str = "auto"            # waffle: auto | fashion-mnist | digits
    epochs: int | None = None        # waffle: local epochs per round
    keep: bool = False               # keep federation work folders (logs) after a run
    grid: bool = False               # waffle: the whole grid of partitions, sizes and data sets
    out: Path = RESULTS


# ---------------------------------------------------------------------------------------------
# printing and files
# ---------------------------------------------------------------------------------------------

def say(*parts) -> None:
    print(*parts, flush=True)


def fmt(value, spec: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    return format(value, spec) if spec else str(value)


def table(headers: Sequence[str], rows: Iterable[Sequence], title: str | None = None, align: str = "") -> str:
    """A plain text table. `align` has one letter per column, l or r; by default the first column
    is left-aligned and the others right-aligned."""
    rows = [[str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    align = align or "l" + "r" * (len(headers) - 1)

    def line(cells):
        return "  ".join(c.ljust(w) if align[i] == "l" else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    out = [title] if title else []
    out += [line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows]
    return "\n".join(out)


def write_json(out: Path, name: str, data: dict) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps(data, indent=2, default=_json_default) + "\n")
    return path


def _json_default(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def percentiles(values: Sequence[float]) -> dict[str, float]:
    a = np.asarray(values, dtype=np.float64)
    if a.size == 0:
        return {"n": 0, "median": math.nan, "p90": math.nan, "max": math.nan, "min": math.nan, "mean": math.nan}
    return {"n": int(a.size), "median": float(np.median(a)), "p90": float(np.percentile(a, 90)),
            "max": float(a.max()), "min": float(a.min()), "mean": float(a.mean())}


def mib(n: float) -> str:
    return f"{n / 2**20:.3f} MiB" if n >= 2**20 else f"{n / 1024:.1f} KiB"


# ---------------------------------------------------------------------------------------------
# a real federation on loopback
# ---------------------------------------------------------------------------------------------

def federation_config(*, sites: Sequence[str], rounds: int, adapter: str, hidden: Sequence[int],
                      dataset: str = "digits", n_factors: int = ModelConfig().n_factors, lora_rank: int = 8, epochs: int = 1, batch_size: int = 32,
                      lr: float = 0.01, max_steps: int | None = None, timeout_s: float = 120,
                      scheme: str = "iid", seed: int = 1, max_chunk_bytes: int = 1 << 20) -> str:
    names = ", ".join(f'"{s}"' for s in sites)
    steps = f"max_steps = {max_steps}\n" if max_steps else ""
    return f"""# written by bench
[federation]
rounds = {rounds}
min_sites = {len(sites)}
round_timeout_s = {timeout_s}
sites = [{names}]
seed = {seed}
max_chunk_bytes = {max_chunk_bytes}

[model]
adapter = "{adapter}"
hidden = [{", ".join(str(h) for h in hidden)}]
n_factors = {n_factors}
lora_rank = {lora_rank}
seed = {seed}

[train]
epochs = {epochs}
batch_size = {batch_size}
lr = {lr}
{steps}
[data]
dataset = "{dataset}"

[data.partition]
scheme = "{scheme}"
seed = {seed}
"""


class BenchFederation(Federation):
    """A coordinator and participants as real processes, mTLS on 127.0.0.1, with a PKI shared
    across the runs of one bench invocation."""

    # The benchmarks measure dense FedAvg as the baseline, which the default site policy refuses
    # (every weight would leave): these sites are the bench's own, and their policy says so.
    SITE_POLICY = ('# written by bench: the dense baseline is measured too\n'
                   '[model]\nadapters = ["waffle", "lora", "ffa_lora", "dense"]\n')

    def __init__(self, workdir: Path, pki: Path):
        super().__init__(workdir, f"127.0.0.1:{free_port()}")
        self._pki = pki
        self.client: OperatorClient | None = None
        policy = self.workdir / "site-policy.toml"
        policy.parent.mkdir(parents=True, exist_ok=True)
        policy.write_text(self.SITE_POLICY)

    def policy_file(self, site: str) -> Path:
        return self.workdir / "site-policy.toml"

    @property
    def pki(self) -> Path:  # type: ignore[override]
        return self._pki

    def tail_logs(self, lines: int = 12) -> str:
        out = []
        for path in sorted((self.workdir / "logs").glob("*")):
            text = path.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"--- {path.name}\n" + "\n".join(text))
        return "\n".join(out)

    def completed_at(self) -> dict[int, float]:
        """round -> the coordinator's wall-clock time when the round was committed (SQLite),
        or {} when the table is not readable (its schema is the coordinator's business)."""
        try:
            with sqlite3.connect(self.workdir / "coordinator" / "coordinator.sqlite3") as db:
                return {int(r): float(t) for r, t in
                        db.execute("SELECT round, completed_at FROM rounds WHERE round > 0")}
        except sqlite3.Error:
            return {}


class PKI:
    """One CA for a bench invocation, with certificates for up to `n` sites."""

    def __init__(self, n_sites: int = 10):
        self.root = Path(tempfile.mkdtemp(prefix="ktfed-bench-pki-"))
        self.sites = site_names(n_sites)
        make_pki(self.root / "pki", self.sites)

    @property
    def path(self) -> Path:
        return self.root / "pki"

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def site_names(n: int) -> list[str]:
    return [f"site-{i:02d}" for i in range(n)]


@dataclass
class RunResult:
    label: str
    status: object                  # the final pb.RunStatus
    rounds: list[dict]              # one per completed round (see round_record)
    wall_s: float                   # from starting the coordinator to the run's end
    startup_s: float                # from starting the coordinator to round 1 starting to be timed
    completed_at: dict[int, float]
    meta: dict
    workdir: Path | None = None     # kept only with keep=True (the caller removes it)


# Runs made earlier in this invocation, so that one benchmark can read what another already measured
# (e.g. `bytes` reuses the dense and WAFFLe federations that `overhead` ran on the same model).
_RUNS: list[RunResult] = []


def find_run(**meta) -> RunResult | None:
    """The latest run of this invocation whose meta has all these items."""
    for result in reversed(_RUNS):
        if all(result.meta.get(k) == v for k, v in meta.items()):
            return result
    return None


def round_record(r) -> dict:
    metrics = dict(r.metrics)
    compute = {k.split("/", 1)[0]: v for k, v in metrics.items() if k.endswith("/compute_seconds")}
    return {"round": int(r.round), "seconds": float(r.seconds), "contributors": list(r.contributors),
            "dropped": list(r.dropped), "bytes_received": int(r.bytes_received),
            "bytes_by_site": {k: int(v) for k, v in r.bytes_by_site.items()},
            "compute_seconds": compute, "metrics": metrics}


def run_federation(label: str, pki: PKI, sites: Sequence[str], config_toml: str, rounds: int, *,
                   keep: bool = False, poll_s: float = 0.5, timeout_s: float = 600, meta: dict | None = None,
                   on_round: Callable[[dict], None] | None = None) -> RunResult:
    """Start a coordinator with `config_toml` and one participant process per site, wait for the
    run to finish, and return what the operator API reports (remembered for `find_run(**meta)`).
    Raises RuntimeError with the logs' tails on failure."""
    workdir = Path(tempfile.mkdtemp(prefix=f"ktfed-bench-{label.replace('/', '-')}-"))
    fed = BenchFederation(workdir, pki.path)
    config = workdir / "run.toml"
    config.write_text(config_toml)
    started = time.monotonic()
    shown = 0
    first_round_seen = None
    ok = False
    try:
        fed.start_coordinator(config)
        # The participants start at once: their imports overlap the coordinator's, and they retry
        # joining (backoff capped at 1 s) until it listens. No round starts before they all joined.
        for site in sites:
            fed.start_participant(site)
        # a gRPC channel opened before the port listens backs off for seconds: open it once it does
        _wait(lambda: listening(fed.address), 60, "the coordinator to listen", fed)
        fed.client = OperatorClient(fed.address, fed.operator_tls())
        _wait(lambda: fed.client.serving(), 60, "the coordinator to serve", fed)
        deadline = started + timeout_s
        while True:
            status = fed.client.status()
            if first_round_seen is None and (status.round_in_progress or status.rounds_completed):
                first_round_seen = time.monotonic()
            for r in status.rounds[shown:]:
                if on_round is not None:
                    on_round(round_record(r))
                shown += 1
            if status.state != "running":
                break
            if fed.coordinator.poll() is not None:
                raise RuntimeError(f"{label}: the coordinator exited\n{fed.tail_logs()}")
            if all(p.poll() is not None for p in fed.participants.values()):
                raise RuntimeError(f"{label}: every participant exited before the run finished\n{fed.tail_logs()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{label}: timed out after {timeout_s}s\n{fed.tail_logs()}")
            time.sleep(poll_s)
        wall = time.monotonic() - started
        if status.state != "finished" or status.rounds_completed < rounds:
            raise RuntimeError(f"{label}: run ended {status.state} after {status.rounds_completed} rounds\n"
                               f"{fed.tail_logs()}")
        result = RunResult(label, status, [round_record(r) for r in status.rounds], wall,
                           (first_round_seen or started) - started, fed.completed_at(), dict(meta or {}),
                           workdir if keep else None)
        _RUNS.append(result)
        ok = True
        return result
    finally:
        if fed.client is not None:
            fed.client.close()
        fed.shutdown()
        if keep or not ok:
            print(f"  ({label}: work folder and logs kept in {workdir})", file=sys.stderr, flush=True)
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def listening(address: str) -> bool:
    """Whether something accepts TCP connections at host:port (a coordinator that is up)."""
    host, port = address.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=0.2).close()
    except OSError:
        return False
    return True


def _wait(predicate, timeout: float, what: str, fed: BenchFederation) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if fed.coordinator is not None and fed.coordinator.poll() is not None:
            raise RuntimeError(f"the coordinator exited while waiting for {what}\n{fed.tail_logs()}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}\n{fed.tail_logs()}")
        time.sleep(0.05)
