"""The bulk messages' wire bytes without the protobuf runtime's copies of each chunk.

A tensor chunk is up to 4 MiB, and the coordinator carries one per transfer in flight. Through the
generated classes a received chunk exists three times at once (gRPC's bytes, the parsed message's
arena, the `bytes` that reading `.data` makes) and a sent one three times as well (the chunk read
from disk, the message's arena, the serialized bytes). With several transfers in flight that is
most of the coordinator's memory (bench/scale.py). These two functions handle exactly the
messages `{chunk: TensorChunk{name, offset, data}}` (field 2 of UploadChunk and StateChunk alike):

- `encode_chunk_message` writes them as `SerializeToString` would, byte for byte, with one copy
  of the data;
- `parse_chunk_message` reads them with no copy: the data is a view into the received bytes.

Anything else (a header, unknown or repeated fields, anything malformed) is not for the fast path:
`parse_chunk_message` returns None and the caller parses it with the generated class, which
applies protobuf's full rules and reports malformed input. So the fast path never accepts a
message the generated parser would read differently.
"""
from __future__ import annotations

from dataclasses import dataclass

CHUNK_FIELD = 2              # UploadChunk.chunk and StateChunk.chunk
_LEN = 2                     # wire type: length-delimited
_VARINT = 0
_TAG_CHUNK = (CHUNK_FIELD << 3) | _LEN
_TAG_NAME, _TAG_OFFSET, _TAG_DATA = (1 << 3) | _LEN, (2 << 3) | _VARINT, (3 << 3) | _LEN
_MAX_VARINT_BYTES = 10


@dataclass(frozen=True)
class ChunkView:
    """A received TensorChunk; `data` is a read-only view into the message's bytes."""

    name: str
    offset: int
    data: memoryview


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def encode_chunk_message(name: str, offset: int, data: bytes) -> bytes:
    """The serialized `{chunk: {name, offset, data}}`, identical to the generated class's output
    (proto3 leaves out fields holding their default)."""
    if offset < 0 or offset >= 1 << 64:
        raise ValueError(f"offset {offset} is not a uint64")
    inner = bytearray()
    if name:
        encoded = name.encode("utf-8")
        inner += bytes([_TAG_NAME]) + _varint(len(encoded)) + encoded
    if offset:
        inner += bytes([_TAG_OFFSET]) + _varint(offset)
    head = bytes(inner)
    if len(data):
        head += bytes([_TAG_DATA]) + _varint(len(data))
    size = len(head) + len(data)
    return b"".join((bytes([_TAG_CHUNK]), _varint(size), head, data))


def _read_varint(buf: memoryview, pos: int, end: int) -> tuple[int, int] | None:
    value, shift = 0, 0
    for i in range(_MAX_VARINT_BYTES):
        if pos + i >= end:
            return None
        byte = buf[pos + i]
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return (value, pos + i + 1) if value < 1 << 64 else None
        shift += 7
    return None


def parse_chunk_message(raw: bytes) -> ChunkView | None:
    """The chunk of a serialized UploadChunk/StateChunk that holds exactly one `chunk` field with
    each of name, offset and data at most once; None for anything else (see the module doc)."""
    buf = memoryview(raw)
    end = len(buf)
    if end == 0 or buf[0] != _TAG_CHUNK:
        return None
    got = _read_varint(buf, 1, end)
    if got is None or got[0] != end - got[1]:
        return None                      # more than the one field, or a truncated one
    pos = got[1]
    fields: dict[int, object] = {}
    while pos < end:
        tag = buf[pos]
        pos += 1
        if tag in fields or tag not in (_TAG_NAME, _TAG_OFFSET, _TAG_DATA):
            return None
        got = _read_varint(buf, pos, end)
        if got is None:
            return None
        value, pos = got
        if tag == _TAG_OFFSET:
            fields[tag] = value
            continue
        if value > end - pos:
            return None
        fields[tag] = buf[pos:pos + value]
        pos += value
    try:
        name = bytes(fields.get(_TAG_NAME, b"")).decode("utf-8")
    except UnicodeDecodeError:
        return None                      # the generated parser refuses it, with its own message
    return ChunkView(name, int(fields.get(_TAG_OFFSET, 0)), fields.get(_TAG_DATA, buf[0:0]).toreadonly())
