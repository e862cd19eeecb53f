"""Secure aggregation: the server learns only the sum of the participants' updates.

Bonawitz et al. (CCS 2017) double masking with dropout recovery, SecAgg+ neighbour graphs
(Bell et al., CCS 2020) as an option, and an active-adversary option (signed advertisements and
a signed consistency check). Pure functions and state machines over bytes and numpy arrays; the
services only carry the messages.

Modules, from mechanism to protocol:
  errors      SecAggError
  primitives  X25519 + HKDF, AES-GCM with associated data, AES-CTR mask expansion, signatures
  shamir      t-of-n secret sharing of 32-byte secrets over GF(2^521 - 1)
  quantize    L2 clipping, fixed point, stochastic rounding into Z_{2^32}, capacity and error bound
  graph       SecAgg+ neighbour graphs
  config      SecAggProtocolSettings (the protocol's settings), their validation, and
              from_section: the one bridge from a run config's [secagg] section
  wire        byte framing and checked field access (no pickle)
  messages    the nine protocol messages, each with to_bytes()/from_bytes()
  protocol    derivations client and server share (roster, indices, keys, mask signs)
  client      SecAggClient, a participant's state machine
  server      SecAggServer, the server's state machine; AggregateResult
  driver      run_round / simulate: a whole round in one process, with dropouts
"""
from .client import SecAggClient
from .config import SecAggProtocolSettings
from .driver import RoundTrace, run_round, simulate
from .errors import SecAggError
from .graph import effective_degree, graph_seed, neighbours
from .messages import (ConsistencyAck, EncryptedShare, KeyAdvertisement, KeyRoster, MaskedInput,
                       ShareDelivery, ShareKeys, SurvivorList, UnmaskRequest, UnmaskShares)
from .protocol import STEPS
from .quantize import (check_capacity, clip_l2, decode_sum, dequantize, encode_input, error_bound,
                       max_count)
from .server import AggregateResult, SecAggServer

__all__ = [
    "SecAggError", "SecAggProtocolSettings", "SecAggClient", "SecAggServer", "AggregateResult",
    "run_round", "simulate", "RoundTrace", "STEPS",
    "KeyAdvertisement", "KeyRoster", "EncryptedShare", "ShareKeys", "ShareDelivery", "MaskedInput",
    "SurvivorList", "ConsistencyAck", "UnmaskRequest", "UnmaskShares",
    "neighbours", "effective_degree", "graph_seed",
    "check_capacity", "clip_l2", "dequantize", "encode_input", "decode_sum",
    "error_bound", "max_count",
]
