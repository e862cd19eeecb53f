"""Admission: every check a call passes before the coordinator acts on it, in one order.

Before a byte of the request is parsed (`Admission.identify`, called by the handler plumbing):
1. identity and revocation: the client certificate (coordinator.auth) and the role the call needs;
2. run membership: a participant must be one of the current run's sites, on every call (the run
   id is not named to a non-member);
3. the caller's allowance (coordinator.limits: calls open at once, calls per second; operators
   and health callers: calls open at once).
Then, as the request is read (`cut_short`), parsed (`check_fields`) and read (`Admission.participant`):
4. size and depth limits: a message over gRPC's receive limit is refused inside gRPC, and the
   plumbing records the call it ended; every integer, string and nesting depth of the message
   is bounded; the id the message claims must be the certificate's subject; the protocol version.
The round engine calls the content checks below (metrics, tensor declarations, capabilities)
before it keeps anything. Every failure is a Refusal, logged and recorded by the servicer edge.
"""
from __future__ import annotations

import math
from typing import Callable, Mapping, Sequence

from coordinator.auth import Authenticator
from coordinator.errors import Code, Refusal
from coordinator.limits import Limiter
from kt_core import codec
from kt_core.config import FederationSettings
from kt_core.wire import convert, transport

# every integer a message carries fits a JSON number (the audit log) and an SQLite INTEGER
MAX_WIRE_INT = 2 ** 53 - 1
MAX_STRING = 256                       # characters of a string field not named below
STRING_LIMITS = {"run_config_toml": 1 << 20, "reason": 4096, "name": 1024}
MAX_BYTES = {"attempt_id": 64, "sha256": 64, "audit_countersignature": 64 << 10}
MAX_MESSAGE_DEPTH = 8
MAX_METRICS = 32
MAX_METRIC_NAME = 64
MAX_ACCELERATORS = 16
MAX_ACCELERATOR_NAME = 200
MAX_VERSION_STRING = 100


def check_version(header) -> None:
    if header.protocol_version != convert.PROTOCOL_VERSION:
        raise Refusal(Code.FAILED_PRECONDITION,
                      f"protocol version {header.protocol_version} is not supported "
                      f"(this coordinator speaks {convert.PROTOCOL_VERSION})")


class Admission:
    """Steps 1-3 for the participant service; the coordinator's current run answers step 2."""

    def __init__(self, coordinator, auth: Authenticator, limits: Limiter | None = None):
        self.coordinator = coordinator
        self.auth = auth
        self.limits = limits or Limiter()

    def _federation(self) -> FederationSettings:
        engine = self.coordinator.engine
        return engine.fed if engine is not None else FederationSettings()

    def identify(self, context, role: str | None):
        """Steps 1-3, before the request is read; returns the caller. `role` None: any certificate
        of the federation's CA may call (the health service)."""
        caller = self.auth.caller(context, role)
        if role == "participant":
            # without TLS (--insecure, local debugging) nobody has an identity before the header
            # names one: membership is then checked on the header (`participant`)
            if not self.auth.insecure:
                self.check_member(caller.name)
            # every participant call counts against its caller's allowance until it ends
            self.limits.admit(caller.name, self._federation(), context.add_callback)
        else:
            # an operator or a health caller is not rate limited, but holds no more calls open
            # than a site may: no certificate can hold every worker thread
            self.limits.admit(caller.name, self._federation(), context.add_callback, rate=False,
                              holder="certificate")
        return caller

    def check_member(self, name: str) -> None:
        engine = self.coordinator.engine
        if engine is not None and name not in engine.fed.sites:
            raise Refusal(Code.PERMISSION_DENIED,
                          f"{name} is not a site of run the coordinator hosts; every call of a non-member is refused")

    def still_valid(self, context) -> None:
        """A long call's certificate, checked again: a revocation ends it (Refusal UNAUTHENTICATED)."""
        if self.auth.insecure:
            return
        self.check_member(self.auth.caller(context, "participant").name)

    def participant(self, context, header) -> str:
        """The caller's identity once the parsed header agrees with its certificate."""
        caller = self.auth.caller(context, "participant", header.site_id)
        if self.auth.insecure:
            self.check_member(caller.name)
        check_version(header)
        # the certificate of this very call: after a rotation, the site signs (audit
        # countersignatures, SecAgg's active option) with its new key
        pems = context.auth_context().get("x509_pem_cert")
        if pems and self.coordinator.engine is not None:
            self.coordinator.engine.sessions.note_certificate(caller.name, pems[0])
        return caller.name

    def join(self, site_id: str, run_id: str):
        """The run a Join asks for (empty: the current one), if the caller is one of its sites."""
        engine = self.coordinator.current()
        self.check_member(site_id)
        if run_id and run_id != engine.run_id:
            raise Refusal(Code.NOT_FOUND, f"unknown run id {run_id!r}")
        if engine.state != "running":
            raise Refusal(Code.FAILED_PRECONDITION, f"run {engine.run_id} is {engine.state}")
        return engine


# -- step 4: what a message carries ---------------------------------------------------------------

def cut_short(context, watch, received: int, stopping: Callable[[], bool]) -> Refusal | None:
    """Why a call ended before its next message reached the coordinator, as the refusal to log and
    record; None when nobody refused it (the caller's own deadline passed, or the server stops).
    gRPC refuses a message over its receive limit inside its core, before any code of ours sees
    it, and tells the server only that the call was cancelled, as it does when the peer cancels
    or its connection drops: the record names both, since the server cannot tell them apart.
    `watch` (a limits.Watch) knows when the watchdog ended it."""
    if watch is not None and watch.reason:
        return Refusal(Code.DEADLINE_EXCEEDED, watch.reason)
    left = context.time_remaining()
    if (left is not None and left <= 0) or stopping():
        return None
    what = "its request" if received == 0 else f"message {received + 1} of its request"
    return Refusal(Code.CANCELLED,
                   f"the call ended inside gRPC before {what} reached the coordinator: a message over "
                   f"{transport.MAX_MESSAGE_BYTES} bytes (gRPC refuses it itself, answering RESOURCE_EXHAUSTED), "
                   f"or a peer that cancelled or lost its connection")


def check_fields(message, where: str = "", depth: int = 0) -> None:
    """Bound every integer, string, bytes field and nesting level of a parsed message, before any
    of it is used or recorded. The refusal names the field, never echoes its value."""
    if depth > MAX_MESSAGE_DEPTH:
        raise Refusal(Code.INVALID_ARGUMENT, f"{where or 'message'}: nested deeper than {MAX_MESSAGE_DEPTH}")
    for fd, value in message.ListFields():
        name = f"{where}{fd.name}"
        if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
            key_fd, value_fd = fd.message_type.fields_by_name["key"], fd.message_type.fields_by_name["value"]
            for key in value:
                _check_scalar(key_fd, key, f"{name} key")
                _check_value(value_fd, value[key], f"{name}[…]", depth)
        elif _repeated(fd):
            for item in value:
                _check_value(fd, item, name, depth)
        else:
            _check_value(fd, value, name, depth)


def _repeated(fd) -> bool:
    # protobuf 6 names it is_repeated; older releases only have the label
    return fd.is_repeated if hasattr(fd, "is_repeated") else fd.label == fd.LABEL_REPEATED


def _check_value(fd, value, name: str, depth: int) -> None:
    if fd.message_type is not None:
        check_fields(value, name + ".", depth + 1)
    else:
        _check_scalar(fd, value, name)


def _check_scalar(fd, value, name: str) -> None:
    if isinstance(value, bool) or isinstance(value, float):
        return
    if isinstance(value, int):
        if not -MAX_WIRE_INT <= value <= MAX_WIRE_INT:
            raise Refusal(Code.INVALID_ARGUMENT, f"{name}: integer outside +-(2^53 - 1)")
    elif isinstance(value, str):
        limit = STRING_LIMITS.get(fd.name, MAX_STRING)
        if len(value) > limit:
            raise Refusal(Code.INVALID_ARGUMENT, f"{name}: {len(value)} characters, more than {limit}")
    elif isinstance(value, bytes) and fd.name in MAX_BYTES and len(value) > MAX_BYTES[fd.name]:
        raise Refusal(Code.INVALID_ARGUMENT, f"{name}: {len(value)} bytes, more than {MAX_BYTES[fd.name]}")


def check_capabilities(caps) -> None:
    """What a site reports at join, bounded before it is kept and shown."""
    if len(caps.accelerators) > MAX_ACCELERATORS or any(len(a) > MAX_ACCELERATOR_NAME for a in caps.accelerators) \
            or len(caps.software_version) > MAX_VERSION_STRING or len(caps.torch_version) > MAX_VERSION_STRING:
        raise Refusal(Code.INVALID_ARGUMENT,
                      f"capabilities: at most {MAX_ACCELERATORS} accelerators and short version strings")


def check_metrics(metrics: Mapping[str, float]) -> None:
    if len(metrics) > MAX_METRICS:
        raise Refusal(Code.INVALID_ARGUMENT, f"more than {MAX_METRICS} metrics")
    for key, value in metrics.items():
        if not key or len(key) > MAX_METRIC_NAME or not math.isfinite(value):
            raise Refusal(Code.INVALID_ARGUMENT, f"metric {key[:MAX_METRIC_NAME]!r} is invalid or not finite")


def check_specs(specs: Sequence[codec.TensorSpec], shared: Mapping[str, tuple[str, tuple[int, ...]]]) -> None:
    """An update declares exactly the manifest's shared tensors, with their dtypes and shapes."""
    names = [s.name for s in specs]
    for spec in specs:
        if spec.name not in shared:
            raise Refusal(Code.INVALID_ARGUMENT, f"tensor {spec.name!r} is not declared shared in the factor manifest")
        dtype, shape = shared[spec.name]
        if spec.dtype != dtype:
            raise Refusal(Code.INVALID_ARGUMENT,
                          f"tensor {spec.name!r}: dtype {spec.dtype} but the manifest declares {dtype}")
        if tuple(spec.shape) != tuple(shape):
            raise Refusal(Code.INVALID_ARGUMENT,
                          f"tensor {spec.name!r}: shape {list(spec.shape)} but the manifest declares {list(shape)}")
    if len(set(names)) != len(names):
        raise Refusal(Code.INVALID_ARGUMENT, "a tensor is declared twice")
    missing = sorted(set(shared) - set(names))
    if missing:
        raise Refusal(Code.INVALID_ARGUMENT, f"update lacks shared tensor {missing[0]!r}")


def check_update_header(header, shared: Mapping[str, tuple[str, tuple[int, ...]]]) -> None:
    """What an upload's header declares (sample count, metrics, tensors), before any tensor byte."""
    if header.num_samples <= 0:
        raise Refusal(Code.INVALID_ARGUMENT, "num_samples must be positive")
    check_metrics(header.metrics)
    check_specs([convert.spec_from_pb(s) for s in header.tensors], shared)
