"""Load: many lightweight participants in ONE process against one real coordinator process.

Each lightweight participant is a thread with its own gRPC channel and its own certificate from
the federation CA (mutual TLS on 127.0.0.1). It joins, holds the assignment stream, downloads the global
state when it changes (streamed and discarded), and uploads a synthetic update of the manifest's
shapes: the constant c_i in every entry, with num_samples n_i. No training. So the coordinator does
all of its real work (checks, spooling, folding, persisting, serving downloads) and the final
state is known exactly: global_R = global_0 advanced R times by sum(n_i c_i) / sum(n_i), which the
benchmark checks bit for bit, next to the SQLite `uploads` table and RunStatus.

Measured: round time (the coordinator's `seconds`, task push to aggregate, and commit to commit),
the coordinator's CPU (utime + stime from /proc/<pid>/stat) per round, against the number of
participants and the update size. Ratios are against the smallest run of the same update size.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import sqlite3
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from coordinator.state_file import open_state_file
from kt_core.wire import convert, transport
from kt_core.wire import federation_pb2 as pb
from kt_core.wire.federation_pb2_grpc import ParticipantServiceStub
from ktfed.operator import OperatorClient

from bench.common import BenchFederation, Options, PKI, listening, mib, percentiles, pyplot, say, table

NAME = "load"
DESCRIPTION = "50 lightweight participants (threads, own certificates, mTLS) x 20 rounds against one coordinator process"
# dense MLPs on digits (64 inputs, 10 classes): every weight is shared, so the update is the model
SIZES = {"20KB": (64,), "1.3MB": (1024, 256), "9MB": (2048, 1024)}
CLK_TCK = os.sysconf("SC_CLK_TCK")


# -- the coordinator process's own accounting ----------------------------------------------------

def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK   # utime, stime


def memory_kb(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


def reset_peak_rss(pid: int) -> bool:
    """Start VmHWM afresh from the current RSS (Linux >= 4.0), so the peak excludes start-up."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


# -- lightweight participants ----------------------------------------------------------------------

class SyntheticUpdate:
    """An update of the manifest's shared shapes holding `value` everywhere, streamed chunk by chunk
    from one reusable chunk (so even a 500 MB update costs the sender one chunk of memory)."""

    def __init__(self, shared: list[tuple[str, str, tuple[int, ...]]], value: float, chunk: int):
        self.chunk = chunk
        self.tensors = []
        self.specs = []
        for name, dtype, shape in sorted(shared):
            dt = np.dtype(dtype)
            nbytes = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
            full = np.full(max(1, chunk // dt.itemsize), value, dtype=dt.newbyteorder("<")).tobytes()
            h = hashlib.sha256()
            for offset in range(0, nbytes, len(full)):
                h.update(full[:min(len(full), nbytes - offset)])
            self.tensors.append((name, nbytes, full))
            self.specs.append(pb.TensorSpec(name=name, dtype=dtype, shape=list(shape), sha256=h.digest(), nbytes=nbytes))
        self.nbytes = sum(n for _, n, _ in self.tensors)

    def messages(self, head: pb.UploadHeader):
        head.tensors.extend(self.specs)
        yield pb.UploadChunk(header=head)
        for name, nbytes, full in self.tensors:
            if nbytes == 0:
                yield pb.UploadChunk(chunk=pb.TensorChunk(name=name, offset=0, data=b""))
            for offset in range(0, nbytes, len(full)):
                data = full if offset + len(full) <= nbytes else full[:nbytes - offset]
                yield pb.UploadChunk(chunk=pb.TensorChunk(name=name, offset=offset, data=data))


class LoadParticipant(threading.Thread):
    def __init__(self, site: str, address: str, pki: Path, value: float, samples: int, download: bool = True):
        super().__init__(name=f"load-{site}", daemon=True)
        self.site, self.address, self.pki = site, address, pki
        self.value, self.samples, self.download = value, samples, download
        self.uploads = 0
        self.bytes_up = self.bytes_down = 0
        self.timings: list[dict] = []
        self.error: str | None = None
        self.finished = False
        self._digest = ""

    def run(self) -> None:
        try:
            self._run()
        except Exception as err:  # noqa: BLE001 - reported by the benchmark as an error
            self.error = f"{type(err).__name__}: {getattr(err, 'details', lambda: err)()}"

    def _run(self) -> None:
        with transport.open_channel(self.address, transport.TLSFiles.from_pki(self.pki, self.site)) as channel:
            stub = ParticipantServiceStub(channel)
            join = stub.Join(pb.JoinRequest(header=convert.header(site_id=self.site)), timeout=120)
            run_id = join.header.run_id
            shared = [(e.name, e.dtype, tuple(e.shape)) for e in join.manifest if e.role == pb.ManifestEntry.SHARED]
            update = SyntheticUpdate(shared, self.value, join.max_chunk_bytes)
            stream = stub.Assignments(pb.AssignmentStreamRequest(header=convert.header(run_id, site_id=self.site)))
            try:
                for task in stream:
                    kind = task.WhichOneof("kind")
                    if kind == "finished":
                        self.finished = True
                        stub.Leave(pb.LeaveRequest(header=convert.header(run_id, site_id=self.site),
                                                   reason="load test done"), timeout=30)
                        return
                    if kind == "round":
                        self._round(stub, run_id, task.round, update)
            finally:
                stream.cancel()

    def _round(self, stub, run_id: str, task: pb.RoundAssignment, update: SyntheticUpdate) -> None:
        t0 = time.perf_counter()
        if self.download and task.global_state_digest != self._digest:
            for message in stub.DownloadState(pb.StateRequest(header=convert.header(run_id, task.header.round, self.site),
                                                              global_state_digest=task.global_state_digest), timeout=900):
                if message.HasField("chunk"):
                    self.bytes_down += len(message.chunk.data)
            self._digest = task.global_state_digest
        t1 = time.perf_counter()
        head = pb.UploadHeader(header=convert.header(run_id, task.header.round, self.site), attempt_id=task.attempt_id,
                               base_state_digest=task.global_state_digest, num_samples=self.samples)
        receipt = stub.Upload(update.messages(head), timeout=900)
        self.uploads += 1
        self.bytes_up += receipt.bytes_received
        self.timings.append({"round": task.header.round, "download_s": t1 - t0, "upload_s": time.perf_counter() - t1})


def site_value(i: int) -> tuple[float, int]:
    """(c_i, n_i): exact in float32 and their weighted sums exact in float64, in any order."""
    return (i % 7 + 1) / 64.0, i % 5 + 1


# -- one run ----------------------------------------------------------------------------------------

def load_config(sites, rounds: int, hidden, chunk: int = 1 << 20, timeout_s: float = 600) -> str:
    names = ", ".join(f'"{s}"' for s in sites)
    return f"""# written by bench load
[federation]
rounds = {rounds}
min_sites = {len(sites)}
round_timeout_s = {timeout_s}
gather_timeout_s = 30
sites = [{names}]
seed = 1
max_chunk_bytes = {chunk}

[model]
adapter = "dense"
hidden = [{", ".join(str(h) for h in hidden)}]
seed = 1

[data]
dataset = "digits"
"""


@dataclass
class LoadRun:
    label: str
    participants: int
    rounds: int
    update_bytes: int
    round_s: list[float]                  # the coordinator's `seconds` per round
    commit_gaps_s: list[float]            # commit to commit (round 2..)
    wall_s: float                         # first participant started -> run finished
    cpu_s: float                          # coordinator CPU over that span
    rss_kb: dict[str, int]
    checks: dict[str, bool]
    errors: list[str]
    rss_samples: list[tuple[float, int]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(self.checks.values()) and not self.errors

    def to_json(self) -> dict:
        return {"label": self.label, "participants": self.participants, "rounds": self.rounds,
                "update_bytes": self.update_bytes, "round_s": self.round_s, "round_s_stats": percentiles(self.round_s),
                "commit_gaps_s": self.commit_gaps_s, "wall_s": self.wall_s, "coordinator_cpu_s": self.cpu_s,
                "coordinator_cpu_s_per_round": self.cpu_s / max(1, self.rounds),
                "coordinator_cpu_utilisation": self.cpu_s / self.wall_s if self.wall_s else None,
                "coordinator_rss_kb": self.rss_kb, "checks": self.checks, "errors": self.errors, "ok": self.ok}


def run_load(label: str, pki: PKI, n: int, rounds: int, hidden, *, chunk: int = 1 << 20, download: bool = True,
             reset_hwm: bool = False, sample_rss: bool = False, keep: bool = False, timeout_s: float = 900) -> LoadRun:
    sites = pki.sites[:n]
    workdir = Path(tempfile.mkdtemp(prefix=f"ktfed-bench-{label}-"))
    fed = BenchFederation(workdir, pki.path)
    config = workdir / "run.toml"
    config.write_text(load_config(sites, rounds, hidden, chunk, timeout_s))
    client = None
    ok = False
    try:
        proc = fed.start_coordinator(config)
        deadline = time.monotonic() + 180
        # a gRPC channel opened before the port listens backs off for seconds: open it once it does
        while not listening(fed.address) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        client = OperatorClient(fed.address, fed.operator_tls())
        while not _serving(client):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{label}: the coordinator did not start\n{fed.tail_logs()}")
            time.sleep(0.1)
        pid = proc.pid
        rss_idle = memory_kb(pid)["VmRSS"]
        hwm_reset = reset_peak_rss(pid) if reset_hwm else False
        samples: list[tuple[float, int]] = []
        stop_sampling = threading.Event()
        if sample_rss:
            threading.Thread(target=_sample, args=(pid, samples, stop_sampling), daemon=True).start()
        cpu0, t0 = cpu_seconds(pid), time.monotonic()
        workers = [LoadParticipant(s, fed.address, pki.path, *site_value(i), download=download)
                   for i, s in enumerate(sites)]
        for w in workers:
            w.start()
        while True:
            status = client.status()
            if status.state != "running" or proc.poll() is not None:
                break
            if time.monotonic() - t0 > timeout_s:
                raise RuntimeError(f"{label}: timed out after {timeout_s}s\n{fed.tail_logs()}")
            if all(not w.is_alive() for w in workers):
                break
            time.sleep(0.2)
        wall, cpu = time.monotonic() - t0, cpu_seconds(pid) - cpu0
        rss = memory_kb(pid)
        stop_sampling.set()
        for w in workers:
            w.join(60)
        rss.update(idle=rss_idle, hwm_reset=int(hwm_reset))
        status = client.status()
        checks = _check(workdir, status, workers, rounds)
        errors = [f"{w.site}: {w.error}" for w in workers if w.error]
        committed = fed.completed_at()
        gaps = [committed[r] - committed[r - 1] for r in sorted(committed) if r - 1 in committed]
        result = LoadRun(label, n, status.rounds_completed, workers[0].bytes_up // max(1, workers[0].uploads),
                         [r.seconds for r in status.rounds], gaps, wall, cpu, rss, checks, errors, samples)
        ok = result.ok
        return result
    finally:
        if client is not None:
            client.close()
        fed.shutdown()
        if keep or not ok:
            say(f"  ({label}: work folder and logs kept in {workdir})")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def _serving(client) -> bool:
    try:
        return client.serving()
    except Exception:  # noqa: BLE001 - not up yet
        return False


def _sample(pid: int, samples: list, stop: threading.Event) -> None:
    t0 = time.monotonic()
    while not stop.wait(0.05):
        try:
            samples.append((time.monotonic() - t0, memory_kb(pid)["VmRSS"]))
        except OSError:
            return


def _check(workdir: Path, status, workers, rounds: int) -> dict[str, bool]:
    """Every update counted exactly once: in SQLite, in RunStatus, and in the aggregate itself."""
    n = len(workers)
    db = sqlite3.connect(workdir / "coordinator" / "coordinator.sqlite3")
    try:
        per_pair = db.execute("SELECT MAX(c), COUNT(*) FROM (SELECT COUNT(*) AS c FROM uploads "
                              "GROUP BY round, site_id)").fetchone()
        total = db.execute("SELECT COUNT(*) FROM uploads").fetchone()[0]
        refusals = db.execute("SELECT COUNT(*) FROM refusals").fetchone()[0]
        (run_id,) = db.execute("SELECT run_id FROM runs").fetchone()
    finally:
        db.close()
    checks = {
        "run finished": status.state == "finished" and status.rounds_completed == rounds,
        "uploads table: one row per (round, participant), n x rounds rows": per_pair == (1, n * rounds)
        and total == n * rounds,
        "RunStatus: every round has every participant": all(len(r.contributors) == n for r in status.rounds),
        "RunStatus: rounds_contributed == rounds for each": all(p.rounds_contributed == rounds
                                                                  for p in status.sites),
        "participants: every upload acknowledged": sum(w.uploads for w in workers) == n * rounds,
        "no refusals recorded, no aborted attempts": refusals == 0 and status.aborted_attempts == 0,
    }
    checks["aggregate: global_R == global_0 advanced by the exact mean R times"] = _aggregate_exact(
        workdir / "coordinator" / "runs" / run_id, rounds, [site_value(i) for i in range(n)])
    return checks


def _aggregate_exact(run_dir: Path, rounds: int, values) -> bool:
    """Replays FedAvg's arithmetic on the initial state, block by block, and compares bit for bit."""
    total = sum(c * k for c, k in values)       # exact: see site_value
    mean = 1.0 * total / sum(k for _, k in values)
    first = open_state_file(run_dir / "round-00000.safetensors")
    last = open_state_file(run_dir / f"round-{rounds:05d}.safetensors")
    for spec in first.specs:
        for g, got in zip(first.blocks(spec.name), last.blocks(spec.name)):
            expected = g
            for _ in range(rounds):   # float64 mean onto the stored dtype, as FedAvgResult does
                expected = (expected.astype(np.float64) + mean).astype(g.dtype)
            if not np.array_equal(expected, got):
                return False
    return True


# -- the benchmark ----------------------------------------------------------------------------------

def run(opts: Options) -> dict:
    # --quick: a smoke test, one coordinator: the headline run is also the sweep's only point
    rounds = opts.rounds or (2 if opts.quick else 20)
    headline_n = 3 if opts.quick else 50
    counts = (3,) if opts.quick else (3, 10, 50)
    sizes = {k: SIZES[k] for k in (("20KB",) if opts.quick else SIZES)}
    sweep_rounds = rounds if opts.quick else 5
    pki = PKI(max(headline_n, *counts))
    out: dict = {"transport": "gRPC, mutual TLS, 127.0.0.1, one channel and certificate per participant",
                 "participants_process": "one process, one thread per participant", "headline": None, "sweep": []}
    try:
        say(f"[load] {headline_n} participants x {rounds} rounds, dense {list(SIZES['20KB'])} on digits")
        head = run_load(f"load-{headline_n}x{rounds}", pki, headline_n, rounds, SIZES["20KB"], keep=opts.keep)
        out["headline"] = head.to_json()
        _print_headline(head)
        for size, hidden in sizes.items():
            for n in counts:
                if (n, hidden, sweep_rounds) == (headline_n, SIZES["20KB"], rounds):
                    out["sweep"].append(out["headline"] | {"size": size})   # measured just now
                    continue
                say(f"[load] sweep: {n} participants, update {size}, {sweep_rounds} rounds")
                out["sweep"].append(run_load(f"sweep-{n}-{size}", pki, n, sweep_rounds, hidden,
                                             keep=opts.keep).to_json() | {"size": size})
    finally:
        pki.close()
    _print_sweep(out["sweep"])
    _plot(out, opts)
    return out


def _print_headline(r: LoadRun) -> None:
    s = percentiles(r.round_s)
    g = percentiles(r.commit_gaps_s)
    say(table(["round", "seconds"], [[i + 1, f"{v:.3f}"] for i, v in enumerate(r.round_s)],
              title=f"\n{r.label}: round time (coordinator's clock: task push to aggregate)"))
    say(f"\n{r.participants} participants x {r.rounds} rounds, update {mib(r.update_bytes)}: round median "
        f"{s['median']:.3f} s, p90 {s['p90']:.3f} s, max {s['max']:.3f} s; commit to commit median "
        f"{g['median']:.3f} s; coordinator CPU {r.cpu_s:.1f} s in {r.wall_s:.1f} s "
        f"({r.cpu_s / max(1, r.rounds):.2f} s per round)")
    say(table(["check", "result"], [[k, "yes" if v else "NO"] for k, v in r.checks.items()]
              + [["errors at the participants", str(len(r.errors))]], align="ll"))
    for e in r.errors[:10]:
        say(f"  error: {e}")


def _print_sweep(rows: list[dict]) -> None:
    base = {}
    out = []
    for r in rows:
        med = r["round_s_stats"]["median"]
        cpu = r["coordinator_cpu_s_per_round"]
        b = base.setdefault(r["size"], (med, cpu))
        out.append([r["size"], r["participants"], mib(r["update_bytes"]), f"{med:.3f}", f"{med / b[0]:.1f}x",
                    f"{cpu:.2f}", f"{cpu / b[1]:.1f}x" if b[1] else "-",
                    f"{100 * (r['coordinator_cpu_utilisation'] or 0):.0f}%", "ok" if r["ok"] else "ERRORS"])
    say(table(["update", "participants", "bytes/upload", "round s (median)", "vs 3", "coord CPU s/round", "vs 3",
               "coord CPU %", "checks"], out,
              title="\nround time and coordinator CPU vs participants and update size (ratios: vs 3 participants, "
                    "same size)"))


def _plot(out: dict, opts: Options) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    head = out["headline"]
    axes[0].plot(range(1, len(head["round_s"]) + 1), head["round_s"], marker="o")
    axes[0].set(xlabel="round", ylabel="seconds", title=f"{head['participants']} participants: round time")
    for size in dict.fromkeys(r["size"] for r in out["sweep"]):
        rows = [r for r in out["sweep"] if r["size"] == size]
        xs = [r["participants"] for r in rows]
        axes[1].plot(xs, [r["round_s_stats"]["median"] for r in rows], marker="o", label=size)
        axes[2].plot(xs, [r["coordinator_cpu_s_per_round"] for r in rows], marker="o", label=size)
    axes[1].set(xlabel="participants", ylabel="median round s", title="round time", xscale="log", yscale="log")
    axes[2].set(xlabel="participants", ylabel="coordinator CPU s / round", title="coordinator CPU",
                xscale="log", yscale="log")
    counts = sorted({r["participants"] for r in out["sweep"]})
    for ax in axes[1:]:
        ax.set_xticks(counts, [str(c) for c in counts])
        ax.minorticks_off()
        ax.legend(title="update")
    fig.tight_layout()
    opts.out.mkdir(parents=True, exist_ok=True)
    fig.savefig(opts.out / f"{NAME}.png", dpi=110)
    plt.close(fig)
