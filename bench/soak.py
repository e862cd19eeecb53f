"""Soak: many lightweight participants x many rounds, with random SIGKILLs of sites and of the coordinator.

A real coordinator (`ktfed coordinator serve`: mTLS, SQLite state folder, audit log), 200 sites,
a small dense model, and client processes (bench/soak_client.py) hosting many sites each as threads
that speak the real protocol with their own certificates, each uploading an update known per (site,
round). A seeded schedule SIGKILLs whole client processes (all their sites drop; the process starts
again moments later) and the coordinator (restarted at once on its state folder: it must resume).
Then, from the coordinator's SQLite, its state files and the sites' own logs (must all be 0):
lost (acknowledged for an attempt that committed, yet not among its contributors), double-counted
(a site twice in a round's contributors or records), phantom (a contributor that sent no upload
for that attempt); and every committed state must equal the previous one plus the exact
sample-weighted mean of its recorded contributors' updates, bit for bit, so an update folded twice,
or folded and not recorded, shows. Acknowledged uploads of attempts that never committed (in flight
when the coordinator died) are legitimately discarded, and counted. Kills land mid-round: each fires
once its round has received a drawn number of updates, fewer than the round needs.

Memory: the coordinator's VmRSS (/proc) as each round commits, less `warmup` rounds after each start;
flat: the last 10 rounds' median is <= the first 5's + max(5 %, 16 MiB). Coordinator kills: first 60 %.

Defect found by this soak, mended: the coordinator's gRPC limits were sized for 100 sites, and with
~150 connected every round deadlocked (every assignment stream holds a worker thread). A coordinator now
refuses a run it cannot carry (coordinator.limits.ServerCapacity), and the soak starts it for more
than 100 sites with `--max-workers` and `--max-concurrent-rpcs` as that check asks.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from contextlib import closing, suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from bench.common import BenchFederation, Options, PKI, pyplot, say, table
from bench.soak_client import STOCK_SITES, RoundWatch, grpc_limits, read_events, site_update
from ktfed.launcher import _spawn as spawn
from ktfed.operator import OperatorClient

NAME = "soak"
DESCRIPTION = "200 participants x 50 rounds, random SIGKILLs of sites and coordinator: 0 lost or double-counted"
MARGIN_FRACTION, MARGIN_BYTES = 0.05, 16 << 20


@dataclass(frozen=True)
class Plan:
    sites: int = 200
    processes: int = 8                 # client processes; sites are dealt out evenly
    rounds: int = 50
    site_kills: int = 10               # SIGKILLs of a client process (all of its sites)
    coordinator_kills: int = 4
    seed: int = 18
    round_timeout_s: float = 20.0      # a site that vanished without a trace holds a round this long
    warmup: int = 5                    # rounds after each coordinator start left out of the memory check
    window: int = 10                   # rounds compared at the end (and 5 at the start, or fewer)
    timeout_s: float = 1800.0
    status_every_s: float = 2.0        # the operator's dashboard polls RunStatus this often (0: never)

    @property
    def min_sites(self) -> int:
        """Rounds complete with one client process down and as many sites again still reconnecting."""
        return max(1, self.sites - 2 * -(-self.sites // self.processes))


FULL = Plan()
QUICK = Plan(sites=20, processes=4, rounds=6, site_kills=2, coordinator_kills=1, warmup=1, window=2,
             round_timeout_s=10.0, timeout_s=240.0)


def soak_config(plan: Plan, sites: list[str]) -> str:
    names = ", ".join(f'"{s}"' for s in sites)
    return f"""# written by bench soak
[federation]
rounds = {plan.rounds}
min_sites = {plan.min_sites}
max_sites = {plan.sites}
round_timeout_s = {plan.round_timeout_s}
gather_timeout_s = 1.0
retry_backoff_s = 0.5
max_attempts = 50
upload_queue_timeout_s = 60
sites = [{names}]
seed = {plan.seed}

[model]
adapter = "dense"
hidden = [16]
seed = {plan.seed}

[data]
dataset = "digits"
"""


@dataclass
class Kill:
    what: str          # "sites" (a client process) | "coordinator"
    at_round: int      # fires in the round after this many are committed, once that round ...
    after_updates: int  # ... has received this many updates: a kill with uploads in flight
    process: int = -1  # which client process, for "sites"
    down_s: float = 0  # how long that client process stays down
    fired_at_round: int | None = None
    fired_s: float | None = None


def schedule(plan: Plan) -> list[Kill]:
    """The seeded kills, each at its own round: the coordinator's in the first 60 % of the run."""
    rng = random.Random(plan.seed)
    first = plan.warmup + min(5, plan.window)     # the first process lives through the memory check's start
    coordinator_rounds = list(range(first, max(first + 1, int(plan.rounds * 0.6))))
    chosen = sorted(rng.sample(coordinator_rounds, min(plan.coordinator_kills, len(coordinator_rounds))))
    free = [r for r in range(1, plan.rounds - 1) if r not in chosen]
    most = max(1, plan.min_sites - 1)     # fewer than a round needs: the kill lands before its commit
    kills = [Kill("coordinator", r, rng.randint(1, most)) for r in chosen]
    kills += [Kill("sites", r, rng.randint(1, most), rng.randrange(plan.processes), rng.uniform(0.5, 3.0))
              for r in sorted(rng.sample(free, min(plan.site_kills, len(free))))]
    return sorted(kills, key=lambda k: k.at_round)


class SoakFederation(BenchFederation):
    """The coordinator (the ktfed CLI; past 100 sites with gRPC limits sized for the run) and the
    client processes, each under its own name in `participants` so that shutdown() ends them too."""

    def __init__(self, workdir: Path, pki: PKI, plan: Plan):
        super().__init__(workdir, pki.path)
        self.plan = plan
        self.groups = [pki.sites[i::plan.processes] for i in range(plan.processes)]
        self.incarnations = [0] * plan.processes
        (workdir / "clients").mkdir(parents=True, exist_ok=True)
        root = str(Path(__file__).resolve().parent.parent)   # `-m bench.soak_client` from any folder
        self.env = {"PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}

    def coordinator_command(self, config: Path | None = None) -> list[str]:
        cmd = super().coordinator_command(config)
        if self.plan.sites <= STOCK_SITES:
            return cmd
        threads, calls = grpc_limits(self.plan.sites)
        return cmd + ["--max-workers", str(threads), "--max-concurrent-rpcs", str(calls)]

    def start_client(self, k: int):
        self.incarnations[k] += 1
        log = self.workdir / "clients" / f"client-{k}.{self.incarnations[k]}.jsonl"
        cmd = [sys.executable, "-m", "bench.soak_client", "--address", self.address, "--pki", str(self.pki),
               "--log", str(log), *self.groups[k]]
        self.participants[f"client-{k}"] = spawn(cmd, self.workdir / "logs" / f"client-{k}.out", self.env)


@dataclass
class Progress:   # what the soak saw while it ran
    rss: list[dict] = field(default_factory=list)     # {round, generation, rss_kb, threads, t}
    generation: int = 0                                # coordinator starts - 1
    statuses: int = 0                                  # operator status calls answered
    seen: int = 0


def drive(fed: SoakFederation, plan: Plan, config: Path, kills: list[Kill]) -> Progress:
    """Start everything, fire each kill in its round, and wait until the run has finished."""
    progress, watch = Progress(), RoundWatch(fed.workdir / "logs" / "coordinator.log")
    db_path = fed.workdir / "coordinator" / "coordinator.sqlite3"
    fed.start_coordinator(config, env=fed.env)
    deadline = time.monotonic() + 120
    while _committed(db_path)[1] is None:
        if fed.coordinator.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the run did not start\n{fed.tail_logs()}")
        time.sleep(0.2)
    for k in range(plan.processes):
        fed.start_client(k)
    started = last_progress = time.monotonic()
    pending, restarts, last_status, armed = list(kills), [], 0.0, None   # restarts: (when, client process)
    last_fired = -1     # one kill a round: the next waits for a commit after the last one fired
    client = OperatorClient(fed.address, fed.operator_tls())
    try:
        while True:
            now = time.monotonic()
            committed, state = _committed(db_path)
            if committed > progress.seen:
                _sample(fed, progress, committed, now - started)
                last_progress = now
            if state == "finished":
                return progress
            if state not in (None, "running"):
                raise RuntimeError(f"the run ended {state!r} after {committed} rounds\n{fed.tail_logs()}")
            for when, k in [r for r in restarts if r[0] <= now]:
                restarts.remove((when, k))
                fed.start_client(k)
            updates = watch.poll()
            if pending and committed >= max(pending[0].at_round, last_fired + 1):
                armed = armed or now    # a round that never gets that many updates: fire anyway, later
                if updates >= pending[0].after_updates or now - armed > plan.round_timeout_s:
                    _fire(fed, pending.pop(0), committed, now - started, progress, restarts)
                    armed, last_fired = None, committed
                    continue
            if plan.status_every_s and now - last_status > plan.status_every_s:
                last_status = now
                with suppress(Exception):   # a coordinator that is restarting does not answer
                    client.status()
                    progress.statuses += 1
            if fed.coordinator.poll() is not None:
                raise RuntimeError(f"the coordinator exited (rc {fed.coordinator.returncode})\n{fed.tail_logs()}")
            if now - last_progress > 3 * plan.round_timeout_s + 60 or now - started > plan.timeout_s:
                raise RuntimeError(f"no progress: {committed} of {plan.rounds} rounds after "
                                   f"{now - started:.0f}s\n{fed.tail_logs()}")
            time.sleep(0.02 if armed else 0.2)
    finally:
        client.close()


def _fire(fed, kill: Kill, committed: int, t: float, progress: Progress, restarts) -> None:
    kill.fired_at_round, kill.fired_s = committed, round(t, 2)
    if kill.what == "coordinator":
        say(f"[soak] {t:7.1f}s round {committed}: SIGKILL the coordinator (pid {fed.coordinator.pid}), restart")
        fed.coordinator.kill()   # SIGKILL
        fed.coordinator.wait(30)
        progress.generation += 1
        fed.start_coordinator(None, env=fed.env)    # no config: it must resume the unfinished run
    else:
        down = {k for _, k in restarts}
        if kill.process in down:   # already down (its last kill was moments ago): take one that is up
            kill.process = next((k for k in range(len(fed.groups)) if k not in down), kill.process)
        proc = fed.participants[f"client-{kill.process}"]
        if proc.poll() is not None:   # every process down at once: this kill has nothing to hit
            kill.fired_at_round = None
            return
        say(f"[soak] {t:7.1f}s round {committed}: SIGKILL client process {kill.process} "
            f"({len(fed.groups[kill.process])} sites), back in {kill.down_s:.1f}s")
        proc.kill()
        proc.wait(30)
        restarts.append((time.monotonic() + kill.down_s, kill.process))


def _sample(fed, progress: Progress, committed: int, t: float) -> None:
    """The coordinator's VmRSS and thread count (/proc) for each round committed since the last look."""
    fields = {}
    with suppress(OSError):
        for line in Path(f"/proc/{fed.coordinator.pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "Threads"):
                fields[key] = int(value.split()[0])
    for r in range(progress.seen + 1, committed + 1):
        progress.rss.append({"round": r, "generation": progress.generation, "rss_kb": fields.get("VmRSS"),
                             "threads": fields.get("Threads"), "t": round(t, 2)})
    progress.seen = committed


def _committed(db_path: Path) -> tuple[int, str | None]:
    """(rounds committed, run state) from the coordinator's SQLite, read-only; (0, None) before the run exists."""
    try:
        with closing(_read_only(db_path)) as db:
            run = db.execute("SELECT run_id, state FROM runs ORDER BY created_at DESC LIMIT 1").fetchone()
            if run is None:
                return 0, None
            (n,) = db.execute("SELECT COALESCE(MAX(round), 0) FROM rounds WHERE run_id = ?", (run[0],)).fetchone()
            return int(n), run[1]
    except sqlite3.Error:
        return 0, None


def _read_only(db_path: Path) -> sqlite3.Connection:
    """A reader beside the coordinator's own connection (WAL: it never blocks the coordinator's writes)."""
    return sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=5)


# -- what the run left behind ------------------------------------------------------------------------

def verify(workdir: Path, plan: Plan, status=None) -> dict:
    """Every check of the soak from the coordinator's records, state files and the sites' logs."""
    with closing(_read_only(workdir / "coordinator" / "coordinator.sqlite3")) as db:
        run_id, state = db.execute("SELECT run_id, state FROM runs ORDER BY created_at DESC LIMIT 1").fetchone()
        rounds = {r: (json.loads(c), f) for r, c, f in db.execute(
            "SELECT round, contributors_json, state_file FROM rounds WHERE run_id = ? ORDER BY round", (run_id,))}
        rows = db.execute("SELECT round, site_id, attempt_id, num_samples FROM uploads WHERE run_id = ?",
                          (run_id,)).fetchall()
        (aborted,) = db.execute("SELECT COUNT(*) FROM aborted_attempts WHERE run_id = ?", (run_id,)).fetchone()
    by_round: dict[int, list[tuple[str, str, int]]] = {}
    for r, site_id, task, n in rows:
        by_round.setdefault(r, []).append((site_id, task, n))
    committed_task = {r: {t for _, t, _ in ups} for r, ups in by_round.items()}
    events = read_events(sorted((workdir / "clients").glob("*.jsonl")))
    begun = {(e["site"], e["round"], e["attempt"]) for e in events if e["ev"] == "begin"}
    acks = [(e["site"], e["round"], e["attempt"]) for e in events if e["ev"] == "ack"]
    contributors = {r: c for r, (c, _) in rounds.items() if r > 0}

    lost = [a for a in acks if a[2] in committed_task.get(a[1], ()) and a[0] not in contributors.get(a[1], ())]
    double = sum(len(c) - len(set(c)) for c in contributors.values()) + \
        sum(len(ups) - len({p for p, _, _ in ups}) for ups in by_round.values())
    phantom = [(p, r) for r, ups in by_round.items() for p, t, _ in ups if (p, r, t) not in begun]
    wrong_samples = [(p, r) for r, ups in by_round.items() for p, _, n in ups if n != site_update(p, r)[1]]
    discarded = [a for a in acks if a[2] not in committed_task.get(a[1], ())]
    replay_failed = _replay(workdir / "coordinator" / "runs" / run_id, rounds, by_round)
    out = {
        "run_state": state, "rounds_committed": max(contributors, default=0), "updates_accepted": len(rows),
        "lost": len(lost), "double_counted": double, "phantom": len(phantom), "wrong_num_samples": len(wrong_samples),
        "replay_failed_rounds": replay_failed, "acks": len(acks), "discarded_with_their_attempt": len(discarded),
        "aborted_attempts": aborted,
        "unacknowledged_uploads": dict(Counter(e["code"] for e in events if e["ev"] == "refused")),
        "examples": {"lost": lost[:5], "phantom": phantom[:5], "wrong_num_samples": wrong_samples[:5],
                     "unacknowledged": sorted({f"{e['code']}: {e['why'][:160]}" for e in events
                                               if e["ev"] == "refused"})[:10]},
    }
    out["checks"] = {
        "run finished with every round": state == "finished" and sorted(rounds) == list(range(plan.rounds + 1)),
        "0 lost updates": not lost,
        "0 double-counted updates": double == 0,
        "every contributor uploaded for that attempt": not phantom,
        "one attempt (attempt id) per committed round": all(len(t) == 1 for t in committed_task.values()),
        "contributors == upload records, every round": all(
            sorted(contributors[r]) == sorted(p for p, _, _ in by_round.get(r, ())) for r in contributors),
        "recorded num_samples are the sites'": not wrong_samples,
        "every state = previous + exact weighted mean of its contributors": not replay_failed,
    }
    if status is not None:
        counts = {p: sum(p in c for c in contributors.values()) for p in {x for c in contributors.values() for x in c}}
        out["checks"]["RunStatus: rounds_contributed matches the records"] = all(
            p.rounds_contributed == counts.get(p.site_id, 0) for p in status.sites)
    return out


def _replay(run_dir: Path, rounds: dict, by_round: dict) -> list[int]:
    """Rounds whose state is not exactly the previous state + sum(n c) / sum(n) of its contributors.
    Each c is k/64 and each n a small integer (soak_client.site_update), so the float64 sum is exact
    in any folding order and FedAvg's arithmetic is replayed bit for bit."""
    from safetensors.numpy import load_file

    failed = []
    previous = load_file(str(run_dir / rounds[0][1]))
    for r in sorted(k for k in rounds if k > 0):
        state = load_file(str(run_dir / rounds[r][1]))
        ups = [(site_update(p, r)[0], n) for p, _, n in by_round.get(r, ())]
        weight = sum(n for _, n in ups)
        mean = sum(c * n for c, n in ups) / weight if weight else float("nan")
        exact = set(state) == set(previous) and all(
            np.array_equal((previous[k].astype(np.float64) + mean).astype(previous[k].dtype), state[k]) for k in state)
        if not exact:
            failed.append(r)
        previous = state
    return failed


def memory(progress: Progress, plan: Plan) -> dict:
    """RSS first / last / max, the slope after warm-up, and the flatness check."""
    starts: dict[int, int] = {}
    for s in progress.rss:
        starts.setdefault(s["generation"], s["round"])
    warm = [s for s in progress.rss if s["rss_kb"] and s["round"] >= starts[s["generation"]] + plan.warmup]
    if not warm:
        return {"checked": False, "why": "no rounds after warm-up"}
    first = [s["rss_kb"] for s in warm[:min(5, plan.window)]]
    last = [s["rss_kb"] for s in warm[-plan.window:]]
    final = [s for s in warm if s["generation"] == progress.generation]
    slope = float(np.polyfit([s["round"] for s in final], [s["rss_kb"] for s in final], 1)[0]) \
        if len(final) >= 3 else float("nan")
    first_b, last_b = float(np.median(first)) * 1024, float(np.median(last)) * 1024
    margin = max(MARGIN_FRACTION * first_b, MARGIN_BYTES)
    return {"checked": True, "first_bytes": first_b, "last_bytes": last_b,
            "max_bytes": max(s["rss_kb"] for s in warm) * 1024, "margin_bytes": margin,
            "slope_kib_per_round_last_process": slope, "rounds_after_warmup": len(warm),
            "flat": last_b <= first_b + margin}


# -- one soak -------------------------------------------------------------------------------------------

def run_soak(plan: Plan, pki: PKI | None = None, keep: bool = False, workdir: Path | None = None) -> dict:
    """One soak under `plan`; returns the counts, checks and memory figures (raises when it cannot finish)."""
    own_pki = pki is None
    pki = pki or PKI(plan.sites)
    workdir = workdir or Path(tempfile.mkdtemp(prefix="ktfed-bench-soak-"))
    fed = SoakFederation(workdir, pki, plan)
    config = workdir / "run.toml"
    config.write_text(soak_config(plan, pki.sites[:plan.sites]))
    kills = schedule(plan)
    t0 = time.monotonic()
    ok = False
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminated) if main_thread else None   # `timeout`: clean up too
    try:
        progress = drive(fed, plan, config, kills)
        wall = time.monotonic() - t0
        status = _wind_down(fed)
        result = verify(workdir, plan, status)
        result["memory"] = memory(progress, plan)
        result["checks"]["coordinator memory flat"] = bool(result["memory"].get("flat"))
        log = (workdir / "logs" / "coordinator.log").read_text(errors="replace")
        fired = Counter(k.what for k in kills if k.fired_at_round is not None)
        result.update(plan=asdict(plan), min_sites=plan.min_sites, wall_s=wall,
                      coordinator_grpc=_grpc(plan), kills=[asdict(k) for k in kills],
                      site_kills=fired["sites"], coordinator_kills=fired["coordinator"],
                      resumes=log.count("resumed run"), rss=progress.rss, status_calls=progress.statuses)
        result["checks"]["every coordinator restart resumed the run"] = result["resumes"] == result["coordinator_kills"]
        ok = all(result["checks"].values())
        return result
    finally:
        fed.shutdown()
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
        if keep or not ok:
            say(f"  (soak: work folder and logs kept in {workdir})")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
        if own_pki:
            pki.close()


def _grpc(plan: Plan) -> str:
    threads, calls = grpc_limits(plan.sites)
    return "as shipped" if plan.sites <= STOCK_SITES else f"{threads} / {calls} (--max-workers, --max-concurrent-rpcs)"


def _terminated(signum, frame):
    raise SystemExit(f"soak: stopped by signal {signum}")   # runs run_soak's `finally`: no stray processes


def _wind_down(fed):
    """The final RunStatus (None if it cannot be had); then the sites leave once they have the verdict."""
    client = OperatorClient(fed.address, fed.operator_tls())
    try:
        status = client.status()
    except Exception:  # noqa: BLE001 - verify() then leaves the RunStatus check out
        status = None
    client.close()
    deadline = time.monotonic() + 20
    for proc in fed.participants.values():
        with suppress(subprocess.TimeoutExpired):
            proc.wait(max(0.1, deadline - time.monotonic()))   # shutdown() ends whatever is left
    return status


# -- the benchmark ------------------------------------------------------------------------------------------

def run(opts: Options) -> dict:
    plan = QUICK if opts.quick else FULL
    if opts.rounds:
        plan = Plan(**{**asdict(plan), "rounds": opts.rounds})
    say(f"[soak] {plan.sites} participants in {plan.processes} client processes x {plan.rounds} rounds, kills: "
        f"{plan.site_kills} client processes, {plan.coordinator_kills} coordinator (seed {plan.seed})")
    result = run_soak(plan, keep=opts.keep)
    _print(result)
    _plot(result, opts)
    return result


def _mib(b) -> str:
    return f"{b / 2**20:.1f} MiB" if b == b else "-"


def _print(r: dict) -> None:
    m, p, nan = r["memory"], r["plan"], float("nan")
    unacked = ", ".join(f"{k} {v}" for k, v in sorted(r["unacknowledged_uploads"].items())) or "0"
    rss = " / ".join(_mib(m.get(k, nan)) for k in ("first_bytes", "last_bytes", "max_bytes"))
    rows = [("participants x rounds", f"{p['sites']} x {p['rounds']} ({p['processes']} client processes)"),
            ("rounds committed", f"{r['rounds_committed']} of {p['rounds']} (run {r['run_state']})"),
            ("updates accepted", r["updates_accepted"]), ("lost", r["lost"]),
            ("double-counted", r["double_counted"]), ("counted without an upload", r["phantom"]),
            ("rounds whose state does not replay exactly", len(r["replay_failed_rounds"])),
            ("acknowledged, discarded with their attempt", r["discarded_with_their_attempt"]),
            ("aborted attempts", r["aborted_attempts"]), ("uploads not acknowledged (by status)", unacked),
            ("kills of sites (client processes)", r["site_kills"]),
            ("kills of the coordinator", r["coordinator_kills"]), ("resumes", r["resumes"]),
            ("coordinator RSS first / last / max", rss),
            ("RSS slope, last process, after warm-up",
             f"{m.get('slope_kib_per_round_last_process', nan):.1f} KiB/round"),
            ("memory flat (last 10 <= first 5 + margin)",
             f"{'yes' if m.get('flat') else 'NO'} (margin {_mib(m.get('margin_bytes', nan))})"),
            ("coordinator gRPC threads / calls", r["coordinator_grpc"]), ("wall time", f"{r['wall_s']:.0f} s")]
    say(table(["soak", "value"], rows, title="\nsoak results", align="lr"))
    say(table(["check", "result"], [[k, "yes" if v else "NO"] for k, v in r["checks"].items()], align="ll"))


def _plot(r: dict, opts: Options) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9, 4))
    for g in sorted({s["generation"] for s in r["rss"]}):
        pts = [s for s in r["rss"] if s["generation"] == g and s["rss_kb"]]
        ax.plot([s["round"] for s in pts], [s["rss_kb"] / 1024 for s in pts], marker=".", label=f"process {g + 1}")
    for k in r["kills"]:
        if k["fired_at_round"] is not None:
            ax.axvline(k["fired_at_round"] + 0.5, color="red" if k["what"] == "coordinator" else "grey",
                       ls="--" if k["what"] == "coordinator" else ":", lw=0.8)
    ax.set(xlabel="round committed", ylabel="coordinator VmRSS (MiB)",
           title=f"soak: {r['plan']['sites']} participants; red: coordinator killed, grey: a client process killed")
    ax.legend(fontsize=8)
    fig.tight_layout()
    opts.out.mkdir(parents=True, exist_ok=True)
    fig.savefig(opts.out / f"{NAME}.png", dpi=110)
    plt.close(fig)
