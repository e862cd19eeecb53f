"""The soak's other processes (bench/soak.py): lightweight sites, and the coordinator's side.

    python -m bench.soak_client --address HOST:PORT --pki DIR --log FILE site-000 site-001 ...

A client process hosts many sites, each a thread with its own gRPC channel and its own certificate
from the federation CA (mutual TLS on 127.0.0.1). A site joins, holds the assignment stream, downloads
the global state whenever its digest changes (streamed and discarded, as bench/load.py does), and
uploads `site_update(site, round)`: every shared tensor filled with one value known per (site,
round), with a sample count known per (site, round). No training, no torch. So the soak can replay
each committed round exactly from the contributors the coordinator recorded, and an update counted
twice, or acknowledged and then missing, shows. When the coordinator goes away (the soak SIGKILLs it
and restarts it on its state folder) a site reconnects with capped, jittered backoff and joins
again; when its own process is SIGKILLed, its sites are gone until the soak starts it again.

On the coordinator's side: `grpc_limits` (the flags a coordinator needs for a run of N sites) and
`RoundWatch` (how far the round in progress is, from the coordinator's log).

What each site did goes to the log file, one JSON object a line, each line one write() on an
O_APPEND descriptor, so a SIGKILL never leaves half a line before a whole one:
  {"ev": "begin", "site", "round", "attempt"}   written before the upload's first byte leaves, so
                                             every update the coordinator can have counted has one
  {"ev": "ack", "site", "round", "attempt", "digest"}   the coordinator's receipt came back
  {"ev": "refused", "site", "round", "attempt", "code", "why"}   the upload was refused
  {"ev": "finished", "site", "rounds"}     the run's verdict arrived on the assignment stream
  {"ev": "error", "site", "why"}           anything else that broke a session (it reconnects)
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import threading
import time
from contextlib import suppress
from pathlib import Path

import grpc
import numpy as np

from kt_core.wire import convert, transport
from kt_core.wire import federation_pb2 as pb
from kt_core.wire.federation_pb2_grpc import ParticipantServiceStub

from bench.load import SyntheticUpdate

JOIN_TIMEOUT_S = 30
TRANSFER_TIMEOUT_S = 120
BACKOFF_MIN_S, BACKOFF_MAX_S = 0.2, 2.0
# a refused upload worth another try within the same attempt: the coordinator's upload queue was full
RETRY_CODES = (grpc.StatusCode.RESOURCE_EXHAUSTED,)
UPLOAD_TRIES = 4
# the connection itself is gone (coordinator killed, restarting): end the session and reconnect
CONNECTION_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN,
                    grpc.StatusCode.INTERNAL)


def site_index(site: str) -> int:
    return int(site.rsplit("-", 1)[1])


def site_update(site: str, round_no: int) -> tuple[float, int]:
    """(value c, num_samples n) a site uploads for a round. c is k/64 with k in 1..61 and n in 1..7,
    so every n*c, and every sum of them over up to thousands of sites, is exact in float64 whatever
    the order the coordinator folds them in: the soak's replay of a round is bit for bit."""
    i = site_index(site)
    return (1 + (i * 37 + round_no * 11) % 61) / 64.0, 1 + (i + 3 * round_no) % 7


class EventLog:
    """Append-only JSON lines, one write() each, shared by the threads of this process."""

    def __init__(self, path: Path):
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def write(self, **event) -> None:
        os.write(self._fd, (json.dumps(event, separators=(",", ":")) + "\n").encode())

    def close(self) -> None:
        os.close(self._fd)


def read_events(paths) -> list[dict]:
    """Every event of these logs (a torn last line, which one write() a line rules out, is skipped)."""
    events = []
    for path in paths:
        for line in Path(path).read_text().splitlines():
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return events


class SoakSite(threading.Thread):
    """One site: join, hold the assignment stream, answer each round; reconnect whenever the stream breaks."""

    def __init__(self, site: str, address: str, pki: Path, events: EventLog, stop: threading.Event):
        super().__init__(name=f"soak-{site}", daemon=True)
        self.site, self.address, self.pki = site, address, pki
        self.events, self.stop = events, stop
        self.finished = False
        self._digest = ""            # the global state last downloaded
        self._rng = random.Random(site)

    def run(self) -> None:
        failures = 0
        while not self.stop.is_set() and not self.finished:
            try:
                self._session()
                failures = 0
            except grpc.RpcError as err:
                failures += 1
                if _finished_refusal(err):   # a site that was down at the end learns it at Join
                    self.events.write(ev="finished", site=self.site, rounds=-1)
                    self.finished = True
                    return
            except Exception as err:  # noqa: BLE001 - logged; the site keeps trying, as a real agent does
                failures += 1
                self.events.write(ev="error", site=self.site, why=f"{type(err).__name__}: {err}"[:300])
            if not self.finished:
                cap = min(BACKOFF_MAX_S, BACKOFF_MIN_S * 2 ** min(failures, 4))
                self.stop.wait(self._rng.uniform(BACKOFF_MIN_S / 2, cap))

    def _session(self) -> None:
        """One connection: Join, then the assignment stream until it ends (or the connection does)."""
        tls = transport.TLSFiles.from_pki(self.pki, self.site)
        with transport.open_channel(self.address, tls) as channel:
            stub = ParticipantServiceStub(channel)
            join = stub.Join(pb.JoinRequest(header=convert.header(site_id=self.site)), timeout=JOIN_TIMEOUT_S)
            run_id = join.header.run_id
            shared = [(e.name, e.dtype, tuple(e.shape)) for e in join.manifest if e.role == pb.ManifestEntry.SHARED]
            chunk = _chunk_bytes(shared, join.max_chunk_bytes)
            stream = stub.Assignments(pb.AssignmentStreamRequest(header=convert.header(run_id, site_id=self.site)))
            try:
                for assignment in stream:
                    if self.stop.is_set():
                        return
                    kind = assignment.WhichOneof("kind")
                    if kind == "finished":
                        self._finish(stub, run_id, assignment.finished)
                        return
                    if kind == "round":
                        self._round(stub, run_id, assignment.round, shared, chunk)
            except grpc.RpcError as err:
                if err.code() not in CONNECTION_CODES:
                    raise
            finally:
                stream.cancel()

    def _round(self, stub, run_id: str, assignment: pb.RoundAssignment, shared, chunk: int) -> None:
        round_no, attempt_hex = assignment.header.round, assignment.attempt_id.hex()
        if assignment.global_state_digest != self._digest:
            self._download(stub, run_id, assignment)
        value, samples = site_update(self.site, round_no)
        update = SyntheticUpdate(shared, value, chunk)
        for attempt in range(UPLOAD_TRIES):
            head = pb.UploadHeader(header=convert.header(run_id, round_no, self.site), attempt_id=assignment.attempt_id,
                                   base_state_digest=assignment.global_state_digest, num_samples=samples)
            self.events.write(ev="begin", site=self.site, round=round_no, attempt=attempt_hex)
            try:
                receipt = stub.Upload(update.messages(head), timeout=TRANSFER_TIMEOUT_S)
            except grpc.RpcError as err:
                self.events.write(ev="refused", site=self.site, round=round_no, attempt=attempt_hex,
                                  code=err.code().name, why=(err.details() or "")[:300])
                if err.code() in CONNECTION_CODES:
                    raise
                if err.code() in RETRY_CODES and attempt + 1 < UPLOAD_TRIES:
                    time.sleep(0.5)
                    continue
                return
            self.events.write(ev="ack", site=self.site, round=round_no, attempt=attempt_hex, digest=receipt.update_digest)
            return

    def _download(self, stub, run_id: str, assignment: pb.RoundAssignment) -> None:
        request = pb.StateRequest(header=convert.header(run_id, assignment.header.round, self.site),
                                  global_state_digest=assignment.global_state_digest)
        for message in stub.DownloadState(request, timeout=TRANSFER_TIMEOUT_S):
            if message.HasField("header") and message.header.global_state_digest != assignment.global_state_digest:
                raise RuntimeError(f"downloaded state {message.header.global_state_digest[:16]} is not the assignment's")
        self._digest = assignment.global_state_digest

    def _finish(self, stub, run_id: str, finished: pb.RunFinished) -> None:
        self.events.write(ev="finished", site=self.site, rounds=finished.header.round)
        self.finished = True
        try:
            stub.Leave(pb.LeaveRequest(header=convert.header(run_id, site_id=self.site),
                                       reason="soak done"), timeout=10)
        except grpc.RpcError:
            pass   # the verdict is what matters; a coordinator that already went is fine


def _finished_refusal(err: grpc.RpcError) -> bool:
    return err.code() == grpc.StatusCode.FAILED_PRECONDITION and " is finished" in (err.details() or "")


def _chunk_bytes(shared, max_chunk: int) -> int:
    """The upload's chunk: the largest tensor, at most the coordinator's limit (a small model's
    update then costs one small buffer per tensor, not a 1 MiB one)."""
    largest = max((int(np.prod(shape, dtype=np.int64)) * np.dtype(dt).itemsize for _, dt, shape in shared),
                  default=1024)
    return max(1024, min(max_chunk, largest))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak_client", description=__doc__.split("\n")[0])
    parser.add_argument("--address", required=True)
    parser.add_argument("--pki", required=True, type=Path)
    parser.add_argument("--log", required=True, type=Path, help="JSON-lines event log (appended)")
    parser.add_argument("sites", nargs="+")
    args = parser.parse_args(argv)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    events = EventLog(args.log)
    sites = [SoakSite(s, args.address, args.pki, events, stop) for s in args.sites]
    for s in sites:
        s.start()
    # every site ends on its own once the run's verdict came; SIGTERM ends them all
    while any(s.is_alive() for s in sites) and not stop.wait(0.5):
        pass
    stop.set()
    deadline = time.monotonic() + 2.0   # daemon threads: a site stuck in a call does not hold the exit
    for s in sites:
        s.join(max(0.0, deadline - time.monotonic()))
    events.close()
    return 0 if all(s.finished for s in sites) else 1


class RoundWatch:
    """How many updates the round in progress has received so far, from the new lines of the
    coordinator's log (what coordinator/rounds.py logs: "round N started with", "round N: update
    from", "completed in", "aborted: "); 0 between rounds and while the coordinator starts."""

    RESET = (b" started with ", b" completed in ", b" aborted: ", b"coordinator listening")

    def __init__(self, path: Path):
        self.path, self.offset, self.updates = path, 0, 0

    def poll(self) -> int:
        with suppress(FileNotFoundError), open(self.path, "rb") as fh:
            fh.seek(self.offset)
            data = fh.read()
            data = data[:data.rfind(b"\n") + 1]       # whole lines only; the rest comes next time
            self.offset += len(data)
            for line in data.splitlines():
                if any(marker in line for marker in self.RESET):
                    self.updates = 0
                elif b": update from " in line:
                    self.updates += 1
        return self.updates


# what the coordinator's defaults are sized for (coordinator/server.py, FederationSettings.max_sites)
STOCK_SITES = 100


def grpc_limits(sites: int) -> tuple[int, int]:
    """(threads, calls in progress) a coordinator needs for `sites`, as it checks them itself
    (coordinator.limits.ServerCapacity): an assignment stream per site and room, a stream and a transfer
    per site and room."""
    from coordinator.limits import RESERVE_CALLS, RESERVE_THREADS

    return sites + RESERVE_THREADS, 2 * sites + RESERVE_CALLS


if __name__ == "__main__":
    sys.exit(main())
