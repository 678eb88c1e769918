"""Upload chunks read without a copy: the same meaning as the generated parser for any bytes, a
view of the received buffer for a data chunk, and the server's Upload using it."""

from __future__ import annotations

import hashlib

import pytest
from google.protobuf.message import DecodeError
from hypothesis import given, settings
from hypothesis import strategies as st

from curvscope import Client
from curvscope._proto.curvscope.v1 import curvscope_pb2 as pb
from curvscope_service import upload_wire
from curvscope_service.config import ServerConfig
from curvscope_service.in_process import InProcessServer
from curvscope_service.upload_wire import DataChunk, parse_upload_chunk


def _meaning(parse, raw: bytes):
    """(payload kind, data bytes, header) or the parse error's type."""
    try:
        chunk = parse(raw)
    except DecodeError:
        return DecodeError
    kind = chunk.WhichOneof("payload")
    if kind == "data":
        return kind, bytes(chunk.data), None
    return kind, b"", chunk.header.SerializeToString() if kind == "header" else None


@settings(max_examples=300, deadline=None)
@given(st.one_of(
    st.binary(max_size=64),
    st.builds(lambda d: pb.UploadChunk(data=d).SerializeToString(), st.binary(max_size=300)),
    st.builds(lambda d, tail: pb.UploadChunk(data=d).SerializeToString() + tail, st.binary(max_size=40),
              st.binary(min_size=1, max_size=20)),
    st.builds(lambda d: pb.UploadChunk(data=d).SerializeToString()[:-1], st.binary(min_size=1, max_size=40)),
    st.builds(lambda s, n: pb.UploadChunk(header=pb.UploadHeader(sha256=s, size_bytes=n)).SerializeToString(),
              st.text(max_size=70), st.integers(0, 2**63)),
))
def test_any_bytes_mean_what_the_generated_parser_says(raw):
    assert _meaning(parse_upload_chunk, raw) == _meaning(pb.UploadChunk.FromString, raw)


@pytest.mark.parametrize("size", [0, 1, 127, 128, 1 << 20])
def test_a_data_chunk_is_a_view_of_the_received_bytes(size):
    payload = bytes(range(256)) * (size // 256) + bytes(size % 256)
    raw = pb.UploadChunk(data=payload).SerializeToString()
    chunk = parse_upload_chunk(raw)
    assert isinstance(chunk, DataChunk) and isinstance(chunk.data, memoryview)
    assert chunk.data.obj is raw and chunk.data == payload
    assert chunk.WhichOneof("payload") == "data" and chunk.WhichOneof("other") is None


def test_the_servers_upload_reads_chunks_without_a_copy(tmp_path, monkeypatch):
    seen = []

    def counting(raw: bytes):
        chunk = parse_upload_chunk(raw)
        seen.append(type(chunk))
        return chunk

    monkeypatch.setattr(upload_wire, "parse_upload_chunk", counting)
    body = hashlib.sha256(b"seed").digest() * (3 * 2**15 + 5)  # 3 MiB + 160 bytes
    path = tmp_path / "blob.bin"
    path.write_bytes(body)
    with InProcessServer(ServerConfig(store=tmp_path / "store")) as server, Client(server.target) as client:
        digest = client.upload(path, chunk_bytes=1 << 20)
        stored = (tmp_path / "store" / "blobs" / "sha256" / digest[:2] / digest).read_bytes()
    assert digest == hashlib.sha256(body).hexdigest() and stored == body
    assert seen == [pb.UploadChunk] + [DataChunk] * 4  # the header, then four data chunks
