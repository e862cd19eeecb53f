"""The bulk-chunk fast path (kt_core.wire.chunks) against the generated protobuf classes: it must
write exactly their bytes, and never read a message differently from them."""
from __future__ import annotations

import grpc
import pytest
from hypothesis import given, settings, strategies as st

from coordinator.errors import Refusal
from coordinator.service import _upload_parser
from kt_core.wire import chunks
from kt_core.wire import federation_pb2 as pb

names = st.text(max_size=40)
offsets = st.integers(min_value=0, max_value=(1 << 64) - 1)
payloads = st.binary(max_size=3000)


def _pb_chunk(cls, name, offset, data) -> bytes:
    return cls(chunk=pb.TensorChunk(name=name, offset=offset, data=data)).SerializeToString()


@settings(max_examples=300, deadline=None)
@given(names, offsets, payloads)
def test_encoding_is_byte_for_byte_the_generated_one(name, offset, data):
    encoded = chunks.encode_chunk_message(name, offset, data)
    assert encoded == _pb_chunk(pb.StateChunk, name, offset, data)
    assert encoded == _pb_chunk(pb.UploadChunk, name, offset, data)


@settings(max_examples=300, deadline=None)
@given(names, offsets, payloads)
def test_parse_reads_what_was_written_without_copying(name, offset, data):
    raw = _pb_chunk(pb.UploadChunk, name, offset, data)
    view = chunks.parse_chunk_message(raw)
    assert view is not None
    assert (view.name, view.offset, bytes(view.data)) == (name, offset, data)
    assert view.data.readonly and (not data or view.data.obj is raw)


def _agrees_with_protobuf(raw: bytes) -> None:
    view = chunks.parse_chunk_message(raw)
    if view is None:
        return
    message = pb.UploadChunk.FromString(raw)   # must not raise: the fast path took it as valid
    assert message.WhichOneof("kind") == "chunk"
    assert (message.chunk.name, message.chunk.offset, message.chunk.data) == (view.name, view.offset,
                                                                              bytes(view.data))


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=64))
def test_arbitrary_bytes_are_never_read_differently(raw):
    _agrees_with_protobuf(raw)


@settings(max_examples=500, deadline=None)
@given(names, offsets, st.binary(max_size=40), st.data())
def test_mutated_messages_are_never_read_differently(name, offset, data, draw):
    raw = bytearray(_pb_chunk(pb.UploadChunk, name, offset, data))
    for _ in range(draw.draw(st.integers(1, 3))):
        op = draw.draw(st.sampled_from(["flip", "cut", "append"]))
        if op == "flip" and raw:
            i = draw.draw(st.integers(0, len(raw) - 1))
            raw[i] = draw.draw(st.integers(0, 255))
        elif op == "cut" and raw:
            del raw[draw.draw(st.integers(0, len(raw) - 1)):]
        else:
            raw += draw.draw(st.binary(min_size=1, max_size=6))
    _agrees_with_protobuf(bytes(raw))


@pytest.mark.parametrize("raw, why", [
    (pb.UploadChunk(header=pb.UploadHeader(num_samples=3)).SerializeToString(), "a header"),
    (_pb_chunk(pb.UploadChunk, "w", 0, b"ab") + _pb_chunk(pb.UploadChunk, "w", 2, b"cd"), "two chunk fields"),
    (b"\x12\x08\x0a\x01w\x0a\x01v\x1a\x00", "the name twice (protobuf keeps the last)"),
    (b"\x12\x05\x0a\x01w\x20\x01", "an unknown field"),
    (b"\x12\x04\x0a\x02\xff\xfe", "a name that is not UTF-8"),
    (b"\x12\x05\x0a\x01w", "a length beyond the message"),
    (b"\x12\x03\x8a\x00\x00", "a tag in a long varint form"),
    (b"", "nothing"),
])
def test_anything_but_the_plain_chunk_is_left_to_protobuf(raw, why):
    assert chunks.parse_chunk_message(raw) is None, why


def test_encode_refuses_an_offset_that_is_not_uint64():
    with pytest.raises(ValueError, match="uint64"):
        chunks.encode_chunk_message("w", -1, b"x")
    with pytest.raises(ValueError, match="uint64"):
        chunks.encode_chunk_message("w", 1 << 64, b"x")


def test_upload_parser_falls_back_to_protobuf_and_refuses_what_it_refuses():
    parse = _upload_parser("Upload", pb.UploadChunk)
    # the name sent twice: valid protobuf (the last one counts), not for the fast path
    view = parse(b"\x12\x0b\x0a\x01v\x0a\x01w\x10\x05\x1a\x01z")
    assert isinstance(view, chunks.ChunkView) and (view.name, view.offset, bytes(view.data)) == ("w", 5, b"z")
    header = parse(pb.UploadChunk(header=pb.UploadHeader(num_samples=3)).SerializeToString())
    assert isinstance(header, pb.UploadChunk) and header.header.num_samples == 3
    with pytest.raises(Refusal) as err:
        parse(b"\x12\x04\x0a\x02\xff\xfe")   # a name that is not UTF-8
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and "UploadChunk" in str(err.value)
