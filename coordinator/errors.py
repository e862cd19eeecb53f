"""Refusals: a request the coordinator will not act on, and the codes that say why.

The codes are gRPC's status vocabulary (a refusal becomes that status at the servicer edge), but
this is the only coordinator module besides the servicers and the server bootstrap that names
grpc: the round engine, admission's policy and the SecAgg driver raise `Refusal(Code.X, ...)`.
"""
from __future__ import annotations

import grpc

from kt_core import codec
from security.secagg import SecAggError

# the status codes a refusal carries (the names gRPC gives them)
Code = grpc.StatusCode


class Refusal(Exception):
    """A request the coordinator will not act on; `code` becomes the gRPC status."""

    def __init__(self, code: Code, message: str):
        super().__init__(message)
        self.code = code


class DuplicateSubmission(SecAggError):
    """A second answer to the same SecAgg step from one participant."""


class OutOfPhase(SecAggError):
    """An answer to a SecAgg step that is not open (early, late, or replayed from an earlier step)."""


def secagg_refusal(err: SecAggError) -> Refusal:
    """What a failed secure aggregation step answers the site that caused it."""
    if isinstance(err, DuplicateSubmission):
        return Refusal(Code.ALREADY_EXISTS, f"secure aggregation: {err} (replay)")
    if isinstance(err, OutOfPhase):
        return Refusal(Code.FAILED_PRECONDITION, f"secure aggregation: {err}")
    return Refusal(Code.INVALID_ARGUMENT, f"secure aggregation: {err}")


# what an upload that fails the wire checks (kt_core.codec.WireError.reason) is answered
_WIRE_CODES = {
    "chunk_too_large": Code.RESOURCE_EXHAUSTED,
    "exceeds_declared": Code.RESOURCE_EXHAUSTED,
    "size_limit": Code.RESOURCE_EXHAUSTED,
    "digest_mismatch": Code.DATA_LOSS,
}


def wire_refusal(err: codec.WireError) -> Refusal:
    return Refusal(_WIRE_CODES.get(err.reason, Code.INVALID_ARGUMENT), str(err))
