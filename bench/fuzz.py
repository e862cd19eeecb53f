"""Fuzz campaign: hostile messages of every wire type, and raw bytes, against a real coordinator.

    python -m bench fuzz [--quick]        (10,000 messages per RPC: half structured, half raw;
                                           --quick: 80)

A coordinator process serves a two-site run on 127.0.0.1 with mutual TLS. Two hand-driven sites
(site-x, site-a) hold their assignment streams so round 1 stays open; the fuzzer then sends, per RPC
(bench/fuzz_messages.py): a valid message with one field at a time set to each hostile value,
messages drawn by hypothesis from the message's own descriptor (every field: boundary integers,
NaN and infinities, huge and control-character strings, nested JSON and TOML bombs, headers valid
field by field so one hostile field meets the deeper checks), as many raw byte strings (random
and bit-flipped valid messages) on the same method path, and one message over the size limit. A
peer's refusals past the coordinator's record budget count as recorded when a later row of that
peer carries their number. It counts per RPC:

    crashes     the coordinator process died
    hangs       a call that got no answer within its deadline (an assignment stream that is open is not one)
    unknown     UNKNOWN or INTERNAL statuses: an exception the servicer did not turn into a refusal
    unlogged    refusals (a non-OK status) without their row in the coordinator's `refusals` table
    forged      lines of the coordinator's text log begun by a newline inside a message field

and prints a table, writes bench/results/fuzz.json; the fast subset in tests/test_fuzz_wire.py
runs the same campaign with a few dozen messages per RPC.
"""
from __future__ import annotations

import re
import sqlite3
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from hypothesis import HealthCheck, Phase, given, settings

from bench.fuzz_messages import Context, boundary_sweep, raw_strategy, request_strategy
from kt_core.wire import convert, transport
from kt_core.wire import federation_pb2 as pb

DESCRIPTION = "hostile wire messages and raw bytes, every RPC, against a real mTLS coordinator"
PER_RPC = 5_000          # structured messages per RPC, and as many raw byte strings
QUICK_PER_RPC = 40        # --quick: a smoke test of the campaign, seconds
CALL_TIMEOUT_S = 10.0
STREAM_WAIT_S = 0.3       # an assignment stream that says nothing this long was accepted and is held open

# (service, method, request type, request streams, response streams, identity)
RPCS = [
    ("ParticipantService", "Join", pb.JoinRequest, False, False, "site-b"),
    ("ParticipantService", "Assignments", pb.AssignmentStreamRequest, False, True, "site-b"),
    ("ParticipantService", "DownloadState", pb.StateRequest, False, True, "site-a"),
    ("ParticipantService", "Upload", pb.UploadChunk, True, False, "site-a"),
    ("ParticipantService", "Leave", pb.LeaveRequest, False, False, "site-b"),
    ("ParticipantService", "Decline", pb.DeclineRequest, False, False, "site-a"),
    ("ParticipantService", "SubmitSecAgg", pb.SecAggSubmission, True, False, "site-a"),
    ("ParticipantService", "DownloadBackbone", pb.BackboneRequest, False, True, "site-a"),
    ("OperatorService", "StartRun", pb.StartRunRequest, False, False, "operator"),
    ("OperatorService", "GetRunStatus", pb.RunStatusRequest, False, False, "operator"),
    # as a participant: an operator's StopRun with an empty run id would end the run under test
    ("OperatorService", "StopRun", pb.StopRunRequest, False, False, "site-b"),
]
SITES = ["site-x", "site-a", "site-b"]
PEERS = {"site-a": "site-a", "site-b": "site-b", "operator": "operator", "oversize": "site-a"}   # channel -> CN
_HELD = re.compile(r"\(and (\d+) more refusals of ")


@dataclass
class Tally:
    sent: int = 0
    ok: int = 0
    refused: int = 0
    open_streams: int = 0
    crashes: int = 0
    hangs: int = 0
    unknown: int = 0
    logged: int = 0          # rows the coordinator added to its refusals table meanwhile
    unlogged: int = 0
    forged_lines: int = 0    # lines of the coordinator's text log that a message's newline started
    codes: Counter = field(default_factory=Counter)
    samples: list = field(default_factory=list)       # a few UNKNOWN/INTERNAL/hang details


# ---------------------------------------------------------------- the target

class Target:
    """A coordinator process (tests' LocalFederation) and the fuzzer's channels to it."""

    def __init__(self, workdir: Path, pki: Path):
        from tests.conftest import LocalFederation, fast_config

        workdir.mkdir(parents=True, exist_ok=True)
        self.fed = LocalFederation(workdir, pki)
        config = fast_config(rounds=50, min_sites=2, timeout=3600, sites=SITES)
        # into [federation] (the first section, whose first `seed` line this is): no rate limit, since
        # the campaign measures handling, not the limiter (which would refuse almost every call)
        config = config.replace("seed = 3\n", "seed = 3\nrpc_rate_per_site = 0.0\n"
                                "gather_timeout_s = 0.5\n", 1)
        self.fed.start_coordinator(self.fed.write_config(config))
        self.fed.wait_serving()
        self.ctx = Context()
        self.channels = {name: transport.open_channel(self.fed.address, transport.TLSFiles.from_pki(pki, name))
                         for name in ("site-x", "site-a", "site-b", "operator")}
        # a client that sends what the coordinator must refuse for its size (its own limit is the server's)
        ca, cert, key = transport.TLSFiles.from_pki(pki, "site-a").read()
        options = [o for o in transport.CHANNEL_OPTIONS if o[0] != "grpc.max_send_message_length"]
        self.channels["oversize"] = grpc.secure_channel(
            self.fed.address, grpc.ssl_channel_credentials(ca, key, cert),
            options=options + [("grpc.max_send_message_length", 4 * transport.MAX_MESSAGE_BYTES)])
        self._streams = []
        self._hold_round()

    def _hold_round(self) -> None:
        """site-x and site-a join and hold their assignment streams: round 1 opens and stays open."""
        from kt_core.wire.federation_pb2_grpc import ParticipantServiceStub

        tasks = {}
        for name in ("site-x", "site-a"):
            stub = ParticipantServiceStub(self.channels[name])
            reply = stub.Join(pb.JoinRequest(header=convert.header(site_id=name)), timeout=30)
            self.ctx.run_id, self.ctx.backbone = reply.header.run_id, reply.backbone_sha256
            stream = stub.Assignments(pb.AssignmentStreamRequest(header=convert.header(self.ctx.run_id, site_id=name)))
            self._streams.append(stream)
            tasks[name] = threading.Event()
            threading.Thread(target=self._follow, args=(stream, tasks[name]), daemon=True).start()
        for event in tasks.values():
            if not event.wait(60):
                raise RuntimeError(f"no round assignment reached the fuzzer's sites\n{self.fed.tail_logs()}")

    def _follow(self, stream, got) -> None:
        try:
            for task in stream:
                if task.WhichOneof("kind") == "round":
                    r = task.round
                    self.ctx.round, self.ctx.attempt_id, self.ctx.digest = r.header.round, r.attempt_id, r.global_state_digest
                    got.set()
        except grpc.RpcError:
            pass

    def alive(self) -> bool:
        return self.fed.coordinator is not None and self.fed.coordinator.poll() is None

    def refusals(self, peer: str, since: float) -> int:
        """How many of `peer`'s refusals since `since` the coordinator accounted for: a recorded row
        each, plus those its record budget counted into a later row ("and N more refusals")."""
        with sqlite3.connect(f"file:{self.fed.workdir / 'coordinator' / 'coordinator.sqlite3'}?mode=ro",
                             uri=True, timeout=30) as db:
            reasons = [r for (r,) in db.execute("SELECT reason FROM refusals WHERE peer = ? AND at >= ?",
                                                (peer, since))]
        return len(reasons) + sum(int(m.group(1)) for r in reasons for m in [_HELD.search(r)] if m)

    def flush(self, service: str, identity: str, tally: "Tally") -> None:
        """Refuse one more call of the peer's on the same service (each service keeps its own record
        budget), until one is recorded: that row carries the count of the refusals the budget held
        back ("and N more"), so they are accounted for."""
        if service == "OperatorService":   # refused for its version, or for a participant's role
            method, request = "GetRunStatus", pb.RunStatusRequest(header=pb.Header(protocol_version=0))
        else:
            method = "Leave"
            request = pb.LeaveRequest(header=convert.header(self.ctx.run_id, self.ctx.round, "not-the-caller"))
        for attempt in range(20):
            if attempt:
                time.sleep(0.3)   # the budget held this one back too: let it refill
            since = time.time()
            call(self, service, method, request, False, False, identity, False, tally)
            if self._recorded_since(identity, since, f"{service}.{method}"):
                return

    def _recorded_since(self, identity: str, since: float, method: str, wait_s: float = 0.3) -> bool:
        """Whether a refusal of `method` from the peer was recorded since `since`, polling briefly:
        the row is written just after the status went out."""
        deadline = time.monotonic() + wait_s
        while True:
            with sqlite3.connect(f"file:{self.fed.workdir / 'coordinator' / 'coordinator.sqlite3'}?mode=ro",
                                 uri=True, timeout=30) as db:
                if db.execute("SELECT COUNT(*) FROM refusals WHERE peer = ? AND at >= ? AND method = ?",
                              (PEERS[identity], since, method)).fetchone()[0]:
                    return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)

    def forged_lines(self) -> int:
        path = self.fed.workdir / "logs" / "coordinator.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return sum(line.startswith(("FORGED", "2026-01-01 00:00:00 INFO forged")) for line in text.splitlines())

    def close(self) -> None:
        for stream in self._streams:
            stream.cancel()
        for channel in self.channels.values():
            channel.close()
        self.fed.close()


def call(target: Target, service: str, method: str, payload, request_streams: bool, response_streams: bool,
         identity: str, raw: bool, tally: Tally, stream_wait_s: float = STREAM_WAIT_S) -> None:
    """One call; its outcome goes into `tally`. An open assignment stream is awaited `stream_wait_s`."""
    path = f"/ktfed.v1.{service}/{method}"
    channel = target.channels[identity]
    serialize = None if raw else (lambda m: m.SerializeToString())
    make = {(False, False): channel.unary_unary, (True, False): channel.stream_unary,
            (False, True): channel.unary_stream, (True, True): channel.stream_stream}[(request_streams, response_streams)]
    rpc = make(path, request_serializer=serialize, response_deserializer=None)
    request = iter(payload if isinstance(payload, list) else [payload]) if request_streams else \
        (payload[0] if isinstance(payload, list) else payload)
    tally.sent += 1
    try:
        if response_streams:
            stream = rpc(request, timeout=stream_wait_s if method == "Assignments" else CALL_TIMEOUT_S)
            for _ in stream:
                if method == "Assignments":       # an accepted assignment stream: it is open, that is all we need
                    tally.open_streams += 1
                    stream.cancel()
                    return
        else:
            rpc(request, timeout=CALL_TIMEOUT_S)
        tally.ok += 1
    except grpc.RpcError as err:
        code = err.code()
        tally.codes[code.name] += 1
        if code == grpc.StatusCode.CANCELLED and method == "Assignments":
            return
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            if method == "Assignments":            # held open with nothing to push: not a hang
                tally.open_streams += 1
                return
            tally.hangs += 1
            _sample(tally, f"hang: {payload!r:.300}")
        elif code in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL):
            tally.unknown += 1
            _sample(tally, f"{code.name}: {err.details()!r:.300} for {payload!r:.300}")
        else:
            tally.refused += 1
    if not target.alive():
        tally.crashes += 1


def _sample(tally: Tally, text: str) -> None:
    if len(tally.samples) < 5:
        tally.samples.append(text)


def fuzz_rpc(target: Target, rpc, n: int, raw: bool, seed: int = 0) -> Tally:
    service, method, request_cls, request_streams, response_streams, identity = rpc
    tally = Tally()
    since, forged = time.time(), target.forged_lines()
    strategy = (raw_strategy(request_cls, target.ctx, identity) if raw
                else request_strategy(request_cls, request_streams, target.ctx, identity))

    @settings(max_examples=n, deadline=None, database=None, phases=[Phase.generate], derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(payload=strategy)
    def campaign(payload):
        if target.alive():
            call(target, service, method, payload, request_streams, response_streams, identity, raw, tally)

    if not raw:
        for message in boundary_sweep(request_cls, target.ctx, identity):
            if target.alive():
                call(target, service, method, [message] if request_streams else message, request_streams,
                     response_streams, identity, raw, tally)
    campaign()
    target.flush(service, identity, tally)
    time.sleep(0.2)     # the last refusals' rows are written after the status went out
    tally.logged = target.refusals(PEERS[identity], since)
    tally.unlogged = max(0, tally.refused - tally.logged)
    tally.forged_lines = target.forged_lines() - forged
    return tally


def oversize(target: Target, rpc) -> Tally:
    """One message over the coordinator's size limit on this method: refused inside gRPC, which
    must still be logged and recorded like any other refusal (an operator method is refused for
    the caller's role first: identity comes before size)."""
    service, method, _cls, request_streams, response_streams, _identity = rpc
    tally = Tally()
    since = time.time()
    # the message takes longer to send than an assignment stream is awaited (it is refused once it arrived)
    call(target, service, method, bytes(transport.MAX_MESSAGE_BYTES + 1024), request_streams, response_streams,
         "oversize", True, tally, stream_wait_s=CALL_TIMEOUT_S)
    target.flush(service, "oversize", tally)
    time.sleep(0.2)
    tally.logged = target.refusals(PEERS["oversize"], since)
    tally.unlogged = max(0, tally.refused - tally.logged)
    return tally


def campaign(workdir: Path, per_rpc: int, pki: Path | None = None, progress=print) -> list[dict]:
    from ktfed.launcher import make_pki

    if pki is None:
        pki = workdir / "pki"
        make_pki(pki, SITES)
    target = Target(workdir / "fed", pki)
    rows = []
    try:
        for rpc in RPCS:
            for raw in (False, True):
                t0 = time.monotonic()
                tally = fuzz_rpc(target, rpc, per_rpc, raw)
                rows.append(row_of(rpc[1] + (" (raw bytes)" if raw else ""), tally, time.monotonic() - t0))
                progress(f"  {rows[-1]['rpc']}: {tally.sent} sent, {tally.unknown} UNKNOWN/INTERNAL, "
                         f"{tally.hangs} hangs, {tally.unlogged} unlogged, {tally.crashes} crashes")
                if not target.alive():
                    progress("  the coordinator died: campaign stopped")
                    return rows
            t0 = time.monotonic()
            rows.append(row_of(rpc[1] + " (over the size limit)", oversize(target, rpc), time.monotonic() - t0))
    finally:
        target.close()
    return rows


def row_of(name: str, tally: Tally, seconds: float) -> dict:
    return {"rpc": name, "sent": tally.sent, "ok": tally.ok, "refused": tally.refused,
            "open_streams": tally.open_streams, "crashes": tally.crashes, "hangs": tally.hangs,
            "unknown_internal": tally.unknown, "unlogged_refusals": tally.unlogged,
            "forged_log_lines": tally.forged_lines, "codes": dict(tally.codes),
            "samples": tally.samples, "seconds": round(seconds, 1)}


def format_table(rows: list[dict]) -> str:
    from bench.common import table

    keys = ["sent", "ok", "refused", "open_streams", "crashes", "hangs", "unknown_internal", "unlogged_refusals",
            "forged_log_lines"]
    body = [[r["rpc"], *[str(r[k]) for k in keys], str(r["seconds"])] for r in rows]
    total = ["total", *[str(sum(r[k] for r in rows)) for k in keys], f"{sum(r['seconds'] for r in rows):.1f}"]
    return table(["rpc", *keys, "s"], body + [total], title="fuzz campaign against a real mTLS coordinator")


def run(opts) -> dict:
    import tempfile

    per_rpc = QUICK_PER_RPC if opts.quick else PER_RPC
    with tempfile.TemporaryDirectory(prefix="ktfed-fuzz-") as tmp:
        rows = campaign(Path(tmp), per_rpc)
    print(format_table(rows))
    return {"per_rpc": per_rpc, "rows": rows,
            "totals": {k: sum(r[k] for r in rows) for k in ("sent", "crashes", "hangs", "unknown_internal",
                                                             "unlogged_refusals", "forged_log_lines")}}

