"""What the fuzz campaign (bench/fuzz.py) sends: hypothesis strategies over every wire message type,
drawn from the messages' own descriptors, a systematic sweep of hostile values field by field over a
valid message, and raw byte strings."""
from __future__ import annotations

import json
from dataclasses import dataclass

from google.protobuf import descriptor as _d
from hypothesis import strategies as st

from kt_core.wire import convert
from kt_core.wire import federation_pb2 as pb

BOUNDARY_UINTS = [0, 1, 2**31 - 1, 2**32 - 1, 2**32, 2**53 - 1, 2**53, 2**53 + 1, 2**60, 2**63 - 1, 2**63,
                  2**64 - 1]
HOSTILE_TEXT = ["", "\n2026-01-01 00:00:00 INFO forged: line", "a\r\nb\x1b[2J", "\u2028x", "x" * 70_000,
                "site-a", "../../etc/passwd", "\x00", "é" * 300]
HOSTILE_BYTES = [b"[" * 50_000 + b"]" * 50_000, b'{"a":' * 20_000 + b"1" + b"}" * 20_000,
                 b'{"round":' + b"9" * 5000 + b"}", b'{"format":"ktfed-audit-countersign/1","round":1152921504606846976}',
                 b"\xff\xfe", b""]


def _token(**hostile) -> bytes:
    """A countersignature token of the right shape with hostile values (a round of 2^60 ...)."""
    token = {"format": "ktfed-audit-countersign/1", "run": "r", "round": 1, "signer": "site-a",
             "signer_certificate": "0" * 64, "signer_head": {"seq": 1, "hash": "0" * 64}, "subject": "coordinator",
             "subject_head": {"seq": 1, "hash": "0" * 64}, "time": "2026-01-01T00:00:00.000000Z", "signature": "AA=="}
    return json.dumps({**token, **hostile}).encode()


HOSTILE_BYTES += [_token(round=2**60), _token(round=-1), _token(subject_head={"seq": 2**63, "hash": "0" * 64}),
                  _token(run="x" * 100_000), _token(signer_head=json.loads("[" * 40 + "1" + "]" * 40))]
HOSTILE_TOML = ["a = " + "[" * 5000 + "]" * 5000, "x." * 5000 + "y = 1", "[federation]\nseed = -1",
                "[federation]\nround_timeout_s = inf", "[federation]\nseed = 18446744073709551615",
                "[federation]\nserver_lr = nan", "[[[[", "a = {b = {c = " * 500 + "1" + "}" * 1000]


@dataclass
class Context:
    """What a valid message would carry right now (the fuzzer's hand-driven sites keep it current)."""
    run_id: str = ""
    round: int = 1
    attempt_id: bytes = b""
    digest: str = ""
    backbone: str = ""

    def header(self, site_id: str) -> pb.Header:
        return convert.header(self.run_id, self.round, site_id)



# ---------------------------------------------------------------- strategies from the descriptors

def _scalar(f: _d.FieldDescriptor, site_id: str):
    t = f.type
    if t in (f.TYPE_UINT64, f.TYPE_FIXED64):
        return st.sampled_from(BOUNDARY_UINTS) | st.integers(0, 2**64 - 1)
    if t in (f.TYPE_UINT32, f.TYPE_FIXED32):
        return st.sampled_from([0, 1, 2**31, 2**32 - 1]) | st.integers(0, 2**32 - 1)
    if t in (f.TYPE_INT64, f.TYPE_SINT64, f.TYPE_SFIXED64):
        return st.sampled_from([-(2**63), -1, 0, 2**53 + 1, 2**63 - 1]) | st.integers(-(2**63), 2**63 - 1)
    if t in (f.TYPE_INT32, f.TYPE_SINT32, f.TYPE_SFIXED32):
        return st.integers(-(2**31), 2**31 - 1)
    if t in (f.TYPE_DOUBLE, f.TYPE_FLOAT):
        return st.floats(allow_nan=True, allow_infinity=True, width=64 if t == f.TYPE_DOUBLE else 32)
    if t == f.TYPE_BOOL:
        return st.booleans()
    if t == f.TYPE_ENUM:
        return st.integers(0, 12)
    if t == f.TYPE_STRING:
        texts = st.sampled_from(HOSTILE_TEXT) | st.text(max_size=40)
        if f.name == "run_config_toml":
            return st.sampled_from(HOSTILE_TOML) | texts
        if f.name == "site_id":
            return st.just(site_id) | texts
        return texts
    if t == f.TYPE_BYTES:
        return st.sampled_from(HOSTILE_BYTES) | st.binary(max_size=64)
    raise ValueError(f"no strategy for field type {t} ({f.full_name})")


def message_strategy(descriptor: _d.Descriptor, ctx: Context, site_id: str, depth: int = 0):
    """Any message of this type: every field unset or drawn. A Header is wholly valid half of the
    time, and otherwise valid field by field, so one hostile field meets the checks behind the
    others (a round of 2^53 + 1 in the right run, from the right participant)."""
    cls = getattr(pb, descriptor.name, None)
    if descriptor.name == "Header":
        current = {"protocol_version": lambda: 1, "run_id": lambda: ctx.run_id, "round": lambda: ctx.round,
                   "site_id": lambda: site_id}
        mixed = st.fixed_dictionaries({name: st.just(None).map(lambda _, get=get: get()) | _scalar(
            descriptor.fields_by_name[name], site_id) for name, get in current.items()}).map(lambda v: _build(cls, v))
        return st.just(None).map(lambda _: ctx.header(site_id)) | mixed
    return _fields(descriptor, cls, ctx, site_id, depth)


def _fields(descriptor, cls, ctx: Context, site_id: str, depth: int):
    parts = {}
    for f in descriptor.fields:
        parts[f.name] = st.none() | _field_value(f, ctx, site_id, depth)
    return st.fixed_dictionaries(parts).map(lambda values: _build(cls, values))


def _field_value(f: _d.FieldDescriptor, ctx: Context, site_id: str, depth: int):
    if f.message_type is not None and f.message_type.GetOptions().map_entry:
        key = _scalar(f.message_type.fields_by_name["key"], site_id)
        value_field = f.message_type.fields_by_name["value"]
        value = (message_strategy(value_field.message_type, ctx, site_id, depth + 1) if value_field.message_type
                 else _scalar(value_field, site_id))
        return st.dictionaries(key, value, max_size=3)
    if f.message_type is not None:
        one = (st.none() if depth >= 3 else message_strategy(f.message_type, ctx, site_id, depth + 1))
        return st.lists(one.filter(lambda m: m is not None), max_size=3) if _repeated(f) else one
    one = _scalar(f, site_id)
    if f.name == "attempt_id":
        one = st.just(None).map(lambda _: ctx.attempt_id) | one
    elif f.name in ("global_state_digest", "base_state_digest"):
        one = st.just(None).map(lambda _: ctx.digest) | one
    return st.lists(one, max_size=4) if _repeated(f) else one


def _repeated(f: _d.FieldDescriptor) -> bool:
    return f.is_repeated


def _build(cls, values: dict):
    message = cls()
    for name, value in values.items():
        if value is None:
            continue
        try:
            field_ = getattr(message, name)
            if isinstance(value, dict):
                for k, v in value.items():
                    if hasattr(v, "CopyFrom"):
                        field_[k].CopyFrom(v)
                    else:
                        field_[k] = v
            elif isinstance(value, list):
                field_.extend(value)
            elif hasattr(value, "CopyFrom"):
                field_.CopyFrom(value)
            else:
                setattr(message, name, value)
        except (ValueError, TypeError, AttributeError):
            continue        # a value the Python class itself refuses (e.g. a float32 overflow)
    return message


def request_strategy(request_cls, streaming: bool, ctx: Context, site_id: str):
    one = message_strategy(request_cls.DESCRIPTOR, ctx, site_id)
    return st.lists(one, min_size=1, max_size=4) if streaming else one


SWEEP = {"uint64": [2**53, 2**53 + 1, 2**63, 2**64 - 1], "uint32": [2**32 - 1], "int": [-(2**31), 2**31 - 1],
         "double": [float("nan"), float("inf"), -float("inf"), 1e308], "enum": [99],
         "string": ["x" * 70_000, "a\nFORGED line", "\x00\x1b[2J"], "bytes": HOSTILE_BYTES}


def _kind(f: _d.FieldDescriptor) -> str | None:
    return {f.TYPE_UINT64: "uint64", f.TYPE_UINT32: "uint32", f.TYPE_INT64: "int", f.TYPE_INT32: "int",
            f.TYPE_DOUBLE: "double", f.TYPE_FLOAT: "double", f.TYPE_ENUM: "enum", f.TYPE_STRING: "string",
            f.TYPE_BYTES: "bytes"}.get(f.type)


def valid_base(cls, ctx: Context, site_id: str):
    """A message that passes the first checks: the current header, task and state digest."""
    message = cls()
    for f in cls.DESCRIPTOR.fields:
        if f.message_type is not None and f.message_type.name == "Header":
            getattr(message, f.name).CopyFrom(ctx.header(site_id))
        elif f.message_type is not None and f.name == "header":
            getattr(message, f.name).CopyFrom(valid_base(getattr(pb, f.message_type.name), ctx, site_id))
        elif f.name == "attempt_id":
            message.attempt_id = ctx.attempt_id
        elif f.name in ("global_state_digest", "base_state_digest"):
            setattr(message, f.name, ctx.digest)
    return message


def boundary_sweep(cls, ctx: Context, site_id: str) -> list:
    """The valid base with one scalar field at a time (nested ones too) set to each hostile value:
    the systematic half of the campaign, before the random half."""
    out = []

    def walk(message, path):
        for f in message.DESCRIPTOR.fields:
            if f.is_repeated:
                continue
            if f.message_type is not None:
                if len(path) < 3:
                    walk(getattr(message, f.name), path + [f.name])
                continue
            for value in SWEEP.get(_kind(f), ()):
                copy = valid_base(cls, ctx, site_id)
                target = copy
                for name in path:
                    target = getattr(target, name)
                try:
                    setattr(target, f.name, value)
                except (ValueError, TypeError):
                    continue
                out.append(copy)

    walk(valid_base(cls, ctx, site_id), [])
    return out


def raw_strategy(request_cls, ctx: Context, site_id: str):
    """Raw bytes on the method's path: random, or a valid message with a few bytes flipped."""
    def flipped(args):
        message, positions = args
        data = bytearray(message.SerializeToString())
        for p in positions:
            if data:
                data[p % len(data)] ^= 0xFF
        return bytes(data)

    valid = st.tuples(message_strategy(request_cls.DESCRIPTOR, ctx, site_id), st.lists(st.integers(0, 1 << 16),
                                                                                    max_size=3)).map(flipped)
    return st.binary(max_size=300) | valid
