"""A pure in-memory round driver: every client and the server in one process, with dropouts.

Used by the tests and reusable by a simulation mode. Every message crosses as bytes
(to_bytes -> from_bytes) unless `via_bytes=False`, so the wire encoding is exercised too.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Mapping, Optional

import numpy as np

from . import quantize
from .client import SecAggClient
from .config import SecAggProtocolSettings
from .server import AggregateResult, SecAggServer
from .protocol import STEPS
from .errors import SecAggError


@dataclass
class RoundTrace:
    server: SecAggServer
    clients: dict[str, SecAggClient]
    result: Optional[AggregateResult] = None
    bytes_up: dict[str, int] = field(default_factory=dict)    # client -> server, per step
    bytes_down: dict[str, int] = field(default_factory=dict)  # server -> clients, per step
    refusals: dict[str, str] = field(default_factory=dict)   # client -> why it refused (on_refusal="drop")


def _wire(msg, via_bytes: bool, trace: RoundTrace, step: str, up: bool):
    data = msg.to_bytes()
    counter = trace.bytes_up if up else trace.bytes_down
    counter[step] = counter.get(step, 0) + len(data)
    return type(msg).from_bytes(data) if via_bytes else msg


def run_round(inputs: Mapping[str, np.ndarray], settings: SecAggProtocolSettings, *, run_id: str = "sim",
              round_no: int = 0, dropouts: Mapping[str, str] = (), state_hash: bytes | None = None,
              state_hashes: Mapping[str, bytes] = (), signers: Mapping = (), verify_keys: Mapping = (),
              graph_seed: bytes | None = None, via_bytes: bool = True,
              on_refusal: str = "raise") -> RoundTrace:
    """Run one round over `inputs` (participant -> encoded uint32 vector, all the same length).

    `dropouts`: participant -> the step it never performs (nor any later one), one of STEPS:
    "advertise", "share_keys", "masked_input" (dropped after sharing keys), "consistency" or
    "unmask" (dropped after sending its masked input). `state_hashes` overrides the global-state
    hash per participant (to simulate a server that sent one site a different model).
    A client's refusal propagates as SecAggError with on_refusal="raise"; with "drop" it is
    recorded in `trace.refusals` and the client counts as dropped from that step on (as a real
    participant that aborts would). A server refusal always propagates. The exception carries the
    trace as its `trace` attribute; on success `trace.result` is set.
    """
    if on_refusal not in ("raise", "drop"):
        raise SecAggError("on_refusal must be 'raise' or 'drop'")
    dropouts = dict(dropouts)
    for u, step in dropouts.items():
        if step not in STEPS:
            raise SecAggError(f"unknown dropout step {step!r} for {u!r} (one of {STEPS})")
    roster = sorted(inputs)
    lengths = {np.asarray(v).shape[0] for v in inputs.values()}
    if len(lengths) != 1:
        raise SecAggError("all inputs must have the same length")
    default_hash = state_hash or hashlib.sha256(b"global state").digest()
    hashes = dict(state_hashes)
    signers, verify_keys = dict(signers), dict(verify_keys)
    server = SecAggServer(run_id, round_no, roster, settings, lengths.pop(),
                          verify_keys=verify_keys or None, graph_seed=graph_seed)
    clients = {u: SecAggClient(u, run_id, round_no, roster, settings, hashes.get(u, default_hash),
                               signer=signers.get(u), verify_keys=verify_keys or None, graph_seed=graph_seed)
               for u in roster}
    trace = RoundTrace(server, clients)

    def alive(u: str, step: str) -> bool:
        return u not in dropouts or STEPS.index(step) < STEPS.index(dropouts[u])

    def call(u: str, step: str, fn, *args):
        """The client's reply, or None if it refused and refusals count as dropouts."""
        try:
            return _wire(fn(*args), via_bytes, trace, step, True)
        except SecAggError as err:
            if on_refusal == "raise":
                raise
            trace.refusals[u] = str(err)
            dropouts[u] = step
            return None

    try:
        for u, c in clients.items():
            if alive(u, "advertise"):
                server.receive_advertisement(_wire(c.advertise(), via_bytes, trace, "advertise", True))
        for u, msg in server.close_advertise().items():
            msg = _wire(msg, via_bytes, trace, "advertise", False)
            if alive(u, "share_keys") and (out := call(u, "share_keys", clients[u].share_keys, msg)):
                server.receive_shares(out)
        for u, msg in server.close_share_keys().items():
            msg = _wire(msg, via_bytes, trace, "share_keys", False)
            if alive(u, "masked_input") and (out := call(u, "masked_input", clients[u].masked_input, msg, inputs[u])):
                server.receive_masked_input(out)
        survivors = server.close_masked_input()
        for u in survivors.survivors:
            msg = _wire(survivors, via_bytes, trace, "masked_input", False)
            if alive(u, "consistency") and (out := call(u, "consistency", clients[u].acknowledge, msg)):
                server.receive_ack(out)
        for u, msg in server.close_consistency().items():
            msg = _wire(msg, via_bytes, trace, "consistency", False)
            if alive(u, "unmask") and (out := call(u, "unmask", clients[u].unmask, msg)):
                server.receive_unmask(out)
        trace.result = server.finish()
    except SecAggError as err:
        err.trace = trace
        raise
    return trace


def simulate(updates: Mapping[str, np.ndarray], counts: Mapping[str, int], settings: SecAggProtocolSettings,
             *, rng: np.random.Generator | None = None, **kwargs) -> tuple[np.ndarray, int, RoundTrace]:
    """Encode float updates and counts, run a round, and decode: (float sum, total count, trace)."""
    n = len(updates)
    inputs = {u: quantize.encode_input(x, counts[u], float(settings.clip_norm), settings.bits, n, rng)
              for u, x in updates.items()}
    trace = run_round(inputs, settings, **kwargs)
    total, count = quantize.decode_sum(trace.result.total, settings.bits)
    return total, count, trace
