"""Translation between protobuf messages and the plain values the rest of the code works with.

Both services use these, so a field is mapped in exactly one place.
"""
from __future__ import annotations

from typing import Iterator, Mapping

import numpy as np

import kt_core.codec as codec
from kt_core.wire import federation_pb2 as pb

PROTOCOL_VERSION = pb.PROTOCOL_VERSION_1

# Decline.code: why a site will not train a round. Sites write them, the coordinator acts on some.
DECLINE_BUDGET = "budget_exhausted"            # its privacy budget cannot take the round
DECLINE_RUN_REFUSED = "run_refused"            # its site policy refuses the whole run (check_join)
DECLINE_SITE_POLICY = "site_policy"            # ... or this round of it (roster, round number)
DECLINE_STATE_REFUSED = "global_state_refused"  # the global state is not one the run's rule allows
DECLINE_DIVERGED = "training_diverged"         # its local training diverged


def header(run_id: str = "", round: int = 0, site_id: str = "") -> pb.Header:
    return pb.Header(protocol_version=PROTOCOL_VERSION, run_id=run_id, round=round,
                     site_id=site_id)


def spec_to_pb(spec: codec.TensorSpec) -> pb.TensorSpec:
    return pb.TensorSpec(name=spec.name, dtype=spec.dtype, shape=list(spec.shape),
                         sha256=spec.sha256, nbytes=spec.nbytes)


def spec_from_pb(msg: pb.TensorSpec) -> codec.TensorSpec:
    return codec.TensorSpec(msg.name, msg.dtype, tuple(int(d) for d in msg.shape),
                            bytes(msg.sha256), int(msg.nbytes))


def tensor_chunks(encoded: list[tuple[codec.TensorSpec, bytes]], chunk_bytes: int) -> Iterator[pb.TensorChunk]:
    for spec, raw in encoded:
        for offset, data in codec.iter_chunks(raw, chunk_bytes):
            yield pb.TensorChunk(name=spec.name, offset=offset, data=data)


def upload_messages(upload_header: pb.UploadHeader, tensors: Mapping[str, np.ndarray],
                    chunk_bytes: int) -> tuple[list[codec.TensorSpec], Iterator[pb.UploadChunk]]:
    """Specs (for logging what leaves) and the message stream of one update."""
    encoded = codec.encode(tensors)
    upload_header.tensors.extend(spec_to_pb(s) for s, _ in encoded)

    def stream() -> Iterator[pb.UploadChunk]:
        yield pb.UploadChunk(header=upload_header)
        for chunk in tensor_chunks(encoded, chunk_bytes):
            yield pb.UploadChunk(chunk=chunk)

    return [s for s, _ in encoded], stream()


ROLE_TO_PB = {"shared": pb.ManifestEntry.SHARED, "private": pb.ManifestEntry.PRIVATE,
              "frozen": pb.ManifestEntry.FROZEN}
ROLE_FROM_PB = {v: k for k, v in ROLE_TO_PB.items()}

# Secure aggregation steps: one name per step across the proto, the round engine and the library.
SECAGG_STEP_TO_PB = {"advertise": pb.ADVERTISE, "share_keys": pb.SHARE_KEYS, "masked_input": pb.MASKED_INPUT,
                     "consistency": pb.CONSISTENCY, "unmask": pb.UNMASK}
SECAGG_STEP_FROM_PB = {v: k for k, v in SECAGG_STEP_TO_PB.items()}


def secagg_submission(header: pb.Header, attempt_id: bytes, step: str, payload: bytes, part_bytes: int,
                      metrics: Mapping[str, float] | None = None) -> Iterator[pb.SecAggSubmission]:
    """A SecAgg answer as a stream of parts of at most `part_bytes` each; the first one declares
    the payload's total size and carries the header."""
    yield pb.SecAggSubmission(header=header, attempt_id=attempt_id, step=SECAGG_STEP_TO_PB[step],
                              payload_bytes=len(payload), payload_part=payload[:part_bytes], metrics=metrics or {})
    for offset in range(part_bytes, len(payload), part_bytes):
        yield pb.SecAggSubmission(payload_part=payload[offset:offset + part_bytes])
