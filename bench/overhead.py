"""Framework overhead per round: what a round costs beyond the participants' own compute.

    overhead = RoundSummary.seconds - max over sites of "<site>/compute_seconds"

`seconds` is the coordinator's clock from pushing the task to finishing the aggregate, so the
overhead holds the task push, the download of the global state, the upload (encode, mTLS, chunking,
digests, validation) and the aggregation. It does not hold the coordinator's persisting of the new
state (safetensors + fsync + SQLite), which happens after `seconds` is taken; that shows up in the
`gap` column: the time between two rounds' commits that neither round's `seconds` covers.
"""
from __future__ import annotations

import tempfile
import time

import numpy as np

from coordinator.strategy import FedAvg, update_norm
from kt_core import codec
from kt_core.manifest import manifest_of
from kt_core.models import ModelConfig, build_model, shared_state
from kt_core.wire import convert
from kt_core.wire import federation_pb2 as pb

from bench.common import (Options, PKI, fmt, federation_config, mib, percentiles, pyplot, run_federation, say,
                          site_names, table)

NAME = "overhead"
DESCRIPTION = "framework overhead per round (round wall time minus the slowest site's compute), 3 sites, mTLS"
TARGET_MS = 50.0
N_SITES = 3
QUICK_SITES = 1         # --quick: a smoke test; each participant process costs seconds to start
HIDDEN = (1024, 896)    # with digits' 64 inputs: ~1.0M shared parameters when dense
DATASET = "digits"
N_FACTORS = ModelConfig().n_factors


def variants(quick: bool = False) -> list[dict]:
    waffle = dict(label="waffle", mode="waffle", hidden=HIDDEN, n_factors=N_FACTORS, chunk=1 << 20)
    if quick:  # a smoke test: one federation (bytes reuses it); the dense target is the full run's
        return [waffle]
    return [dict(label="dense-1M", mode="dense", hidden=HIDDEN, n_factors=N_FACTORS, chunk=1 << 20), waffle,
            # the same dense model with the largest chunk the wire allows (default: 1 MiB)
            dict(label="dense-1M-4MiB-chunks", mode="dense", hidden=HIDDEN, n_factors=N_FACTORS, chunk=4 << 20)]


def shared_size(v: dict) -> tuple[int, int]:
    cfg = ModelConfig(adapter=v["mode"], input_dim=64, hidden=tuple(v["hidden"]), n_factors=v["n_factors"])
    m = manifest_of(build_model(cfg))
    return m.shared_numel(), m.shared_nbytes()


def _median_ms(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return float(np.median(times))


def _persist(state) -> None:
    """An approximation of the store's write of a round's state: safetensors, then fsync."""
    import os

    from safetensors.numpy import save_file
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "round.safetensors")
        save_file({n: np.ascontiguousarray(a) for n, a in state.items()}, path)
        with open(path, "rb") as fh:
            os.fsync(fh.fileno())


def cpu_breakdown(v: dict, n_sites: int = N_SITES, repeat: int = 3) -> dict:
    """Single-thread CPU cost of the per-round steps that the wire and the aggregate need, with the
    product's own functions on this model's shared state (median of `repeat`). The coordinator is
    one Python process, so its part of a round runs one step at a time."""
    cfg = ModelConfig(adapter=v["mode"], input_dim=64, hidden=tuple(v["hidden"]), n_factors=v["n_factors"])
    state = {n: t.numpy() for n, t in shared_state(build_model(cfg)).items()}
    update = {n: (a * 1e-3).astype(a.dtype) for n, a in state.items()}
    chunk = v["chunk"]

    def upload_wire():
        header = pb.UploadHeader(header=convert.header("run", 1, "site"), num_samples=1)
        _, messages = convert.upload_messages(header, update, chunk)
        return [m.SerializeToString() for m in messages]

    wire = upload_wire()
    encoded = codec.encode(state)

    def receive_upload():
        msgs = [pb.UploadChunk.FromString(raw) for raw in wire]
        asm = codec.TensorAssembler([convert.spec_from_pb(t) for t in msgs[0].header.tensors], max_chunk_bytes=chunk)
        for m in msgs[1:]:
            asm.add(m.chunk.name, m.chunk.offset, m.chunk.data)
        out = asm.finish()
        codec.state_digest(convert.spec_from_pb(t) for t in msgs[0].header.tensors)
        return out

    def serve_download():
        return [pb.StateChunk(chunk=c).SerializeToString() for c in convert.tensor_chunks(encoded, chunk)]

    served = serve_download()

    def assemble_download():
        msgs = [pb.StateChunk.FromString(raw) for raw in served]
        asm = codec.TensorAssembler([s for s, _ in encoded], max_chunk_bytes=chunk)
        for m in msgs:
            asm.add(m.chunk.name, m.chunk.offset, m.chunk.data)
        return asm.finish()

    received = receive_upload()
    # the product's strategy bounds every plain upload (README "One site's pull on the mean"):
    # add measures the update's norm before folding it in
    strategy = FedAvg(max_weight=10_000, max_update_norm=100.0)

    def fedavg_add():
        strategy.begin(state)
        strategy.add(received, 100)

    def fedavg_finish():
        # a finished round drops its accumulators: fold one update back in first (its cost is
        # the row above; this row is both)
        strategy.begin(state)
        strategy.add(received, 100)
        return strategy.finish()

    fedavg_add()
    steps = [
        ("participant", "assemble the downloaded global state (parse, SHA-256, copies, finiteness)", assemble_download),
        ("participant", "encode + chunk + serialize its upload (to_bytes, SHA-256, protobuf)", upload_wire),
        ("coordinator", "serve one download (chunk + serialize the pre-encoded state)", serve_download),
        ("coordinator", "receive one upload (parse, assemble, SHA-256, finiteness, digest)", receive_upload),
        ("coordinator", "FedAvg.begin + add of one update (its L2 norm, then float64 accumulate)", fedavg_add),
        ("coordinator", "FedAvg.begin + add + finish", fedavg_finish),
        ("coordinator", "encode the new global state (to_bytes, SHA-256), between rounds", lambda: codec.encode(state)),
        ("coordinator", "persist: safetensors write + fsync (approximation of the store's), between rounds",
         lambda: _persist(state)),
        ("coordinator", "of the add above: the update's L2 norm alone (the bound's check)",
         lambda: update_norm(received)),
    ]
    rows = [{"side": side, "step": what, "ms": _median_ms(fn, repeat)} for side, what, fn in steps]
    per_site = [rows[2]["ms"], rows[3]["ms"], rows[4]["ms"]]
    coordinator_in_round = n_sites * sum(per_site) + rows[5]["ms"]
    return {"steps": rows, "sites": n_sites,
            "coordinator_cpu_in_round_ms": coordinator_in_round,
            "participant_cpu_outside_compute_ms": rows[0]["ms"] + rows[1]["ms"],
            "coordinator_cpu_between_rounds_ms": rows[6]["ms"] + rows[7]["ms"]}


def analyse(result) -> list[dict]:
    rows = []
    prev_commit = None
    for r in result.rounds:
        compute = r["compute_seconds"]
        slowest_site = max(compute, key=compute.get) if compute else None
        slowest = compute[slowest_site] if compute else float("nan")
        commit = result.completed_at.get(r["round"])
        gap = None
        if commit is not None and prev_commit is not None:
            gap = (commit - prev_commit - r["seconds"]) * 1000
        prev_commit = commit
        rows.append({"round": r["round"], "round_ms": r["seconds"] * 1000, "slowest_compute_ms": slowest * 1000,
                     "slowest_site": slowest_site, "overhead_ms": (r["seconds"] - slowest) * 1000,
                     "gap_ms": gap, "contributors": len(r["contributors"]),
                     "bytes_up_per_site": max(r["bytes_by_site"].values(), default=0)})
    return rows


def run(opts: Options) -> dict:
    rounds = opts.rounds or (2 if opts.quick else 10)   # round 1 pays the warm-up: 2 is the fewest with a steady one
    n_sites = QUICK_SITES if opts.quick else N_SITES
    sites = site_names(n_sites)
    pki = PKI(n_sites)
    out = {"target_median_ms": TARGET_MS, "sites": n_sites, "rounds": rounds, "dataset": DATASET,
           "transport": "gRPC, mutual TLS, 127.0.0.1", "train": "1 local epoch capped at 2 steps of 32",
           "variants": {}}
    try:
        for v in variants(opts.quick):
            numel, nbytes = shared_size(v)
            say(f"[overhead] {v['label']}: {v['mode']} {list(v['hidden'])} on {DATASET}, {numel:,} shared "
                f"parameters ({mib(nbytes)} per upload, {mib(v['chunk'])} chunks), {n_sites} participant "
                f"processes, {rounds} rounds")

            def progress(r, label=v["label"]):
                compute = r["compute_seconds"]
                slowest = max(compute.values(), default=float("nan"))
                say(f"  {label} round {r['round']:>2}/{rounds}: {r['seconds'] * 1000:7.1f} ms, slowest compute "
                    f"{slowest * 1000:7.1f} ms, overhead {(r['seconds'] - slowest) * 1000:6.1f} ms")

            cfg = federation_config(sites=sites, rounds=rounds, adapter=v["mode"], hidden=v["hidden"], dataset=DATASET,
                                    n_factors=v["n_factors"], epochs=1, batch_size=32, lr=0.01, max_steps=2,
                                    max_chunk_bytes=v["chunk"])
            meta = dict(mode=v["mode"], hidden=tuple(v["hidden"]), dataset=DATASET, n_factors=v["n_factors"],
                        chunk=v["chunk"])
            result = run_federation(f"overhead-{v['label']}", pki, sites, cfg, rounds, keep=opts.keep,
                                    meta=meta, on_round=progress)
            rows = analyse(result)
            cpu = cpu_breakdown(v, n_sites, repeat=1 if opts.quick else 3)
            _print_rounds(v["label"], rows)
            steady = [r["overhead_ms"] for r in rows if r["round"] >= 2] or [r["overhead_ms"] for r in rows]
            stats = percentiles(steady)
            stats_all = percentiles([r["overhead_ms"] for r in rows])
            gaps = percentiles([r["gap_ms"] for r in rows if r["gap_ms"] is not None])
            round_ms = percentiles([r["round_ms"] for r in rows if r["round"] >= 2] or [r["round_ms"] for r in rows])
            out["variants"][v["label"]] = {
                "mode": v["mode"], "hidden": list(v["hidden"]), "n_factors": v["n_factors"],
                "max_chunk_bytes": v["chunk"],
                "shared_params": numel, "shared_bytes": nbytes,
                "overhead_ms_steady": stats, "overhead_ms_all_rounds": stats_all, "round_ms_steady": round_ms,
                "gap_ms": gaps, "target_met": stats["median"] < TARGET_MS, "cpu_breakdown": cpu,
                "startup_s": result.startup_s, "wall_s": result.wall_s, "rounds": rows}
            say(table(["side", "step", "ms"], [[r["side"], r["step"], f"{r['ms']:.1f}"] for r in cpu["steps"]],
                      title=f"\n{v['label']}: where the overhead can go: single-thread CPU per step, measured "
                            f"in-process on this state", align="llr"))
            say(f"  coordinator CPU inside a round ({n_sites} sites x (serve download + receive upload + add) "
                f"+ finish): {cpu['coordinator_cpu_in_round_ms']:.1f} ms; per participant outside its compute: "
                f"{cpu['participant_cpu_outside_compute_ms']:.1f} ms; coordinator between rounds: "
                f"{cpu['coordinator_cpu_between_rounds_ms']:.1f} ms\n")
    finally:
        pki.close()

    summary = []
    for label, d in out["variants"].items():
        s = d["overhead_ms_steady"]
        summary.append([label, f"{d['shared_params']:,}", mib(d["shared_bytes"]), s["n"], f"{s['median']:.1f}",
                        f"{s['p90']:.1f}", f"{s['max']:.1f}", f"{d['round_ms_steady']['median']:.1f}",
                        fmt(d["gap_ms"]["median"], ".1f"), "met" if d["target_met"] else "NOT met"])
    say(table(["model", "shared params", "upload", "rounds", "median ms", "p90 ms", "max ms", "round ms (median)",
               "gap ms (median)", f"median < {TARGET_MS:.0f} ms"], summary,
              title="overhead per round, rounds 2.. (round 1 includes warm-up; all rounds are in the JSON)"))
    dense = out["variants"].get("dense-1M")
    if dense:
        verdict = "MET" if dense["target_met"] else "NOT MET"
        say(f"\ntarget (median framework overhead < {TARGET_MS:.0f} ms per round, ~1M-parameter dense model): "
            f"{verdict} ({dense['overhead_ms_steady']['median']:.1f} ms)")
    else:
        say(f"\ntarget (median < {TARGET_MS:.0f} ms on the ~1M-parameter dense model): not measured by --quick")
    _plot(out, opts)
    return out


def _print_rounds(label: str, rows: list[dict]) -> None:
    say(table(["round", "round ms", "slowest compute ms", "slowest site", "overhead ms", "gap ms"],
              [[r["round"], f"{r['round_ms']:.1f}", f"{r['slowest_compute_ms']:.1f}", r["slowest_site"],
                f"{r['overhead_ms']:.1f}", fmt(r["gap_ms"], ".1f")] for r in rows],
              title=f"\n{label}: per round (gap = time between two commits not inside `seconds`: persisting "
                    f"+ starting the next round)"))


def _plot(out: dict, opts: Options) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, d in out["variants"].items():
        rows = d["rounds"]
        (line,) = ax.plot([r["round"] for r in rows], [r["overhead_ms"] for r in rows], marker="o",
                          label=f"{label} overhead")
        ax.plot([r["round"] for r in rows], [r["round_ms"] for r in rows], ls=":", alpha=0.7, color=line.get_color(),
                label=f"{label} whole round")
    ax.axhline(TARGET_MS, color="red", lw=0.8, ls="--", label=f"target {TARGET_MS:.0f} ms")
    ax.set_xlabel("round")
    ax.set_ylabel("ms")
    ax.set_yscale("log")
    ax.set_title(f"framework overhead per round ({out['sites']} sites, mTLS, loopback)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    opts.out.mkdir(parents=True, exist_ok=True)
    fig.savefig(opts.out / f"{NAME}.png", dpi=110)
    plt.close(fig)
