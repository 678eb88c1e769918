"""The safetensors header is checked before the library reads any data."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from curvscope_service.errors import InvalidInput
from curvscope_service.loading.safetensors_file import read_header


def _raw(path, header: dict, data: bytes = b"") -> None:
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)


def test_valid_header(tmp_path):
    path = tmp_path / "ok.safetensors"
    save_file({"w": torch.zeros(2, 3), "b": torch.zeros(3, dtype=torch.int64)}, str(path), metadata={"k": "v"})
    header = read_header(path)
    assert header.metadata == {"k": "v"}
    assert header.tensors["w"].shape == (2, 3) and header.tensors["b"].dtype == "I64"


def test_truncated_file_names_the_tensor(tmp_path, refuses):
    path = tmp_path / "t.safetensors"
    save_file({"weight": torch.zeros(64, 64)}, str(path))
    path.write_bytes(path.read_bytes()[:-100])
    with refuses(InvalidInput, "'weight'", "truncated"):
        read_header(path)


def test_truncated_inside_the_header(tmp_path, refuses):
    path = tmp_path / "t.safetensors"
    save_file({"weight": torch.zeros(4)}, str(path))
    path.write_bytes(path.read_bytes()[:20])
    with refuses(InvalidInput, "header length"):
        read_header(path)


def test_absurd_shape_names_the_tensor(tmp_path, refuses):
    path = tmp_path / "a.safetensors"
    _raw(path, {"huge": {"dtype": "F32", "shape": [10**12, 10**12], "data_offsets": [0, 16]}}, bytes(16))
    with refuses(InvalidInput, "'huge'", "[1000000000000, 1000000000000]"):
        read_header(path)


@pytest.mark.parametrize(
    ("entry", "fragment"),
    [
        ({"dtype": "F33", "shape": [1], "data_offsets": [0, 4]}, "unknown dtype"),
        ({"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}, "non-negative"),
        ({"dtype": "F32", "shape": [1.5], "data_offsets": [0, 4]}, "non-negative"),
        ({"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}, "data_offsets"),
        ({"dtype": "F32", "shape": [1], "data_offsets": [0, 8]}, "holds 8 bytes"),
        ({"dtype": "F32", "shape": [1], "data_offsets": [8, 12]}, "data region"),
        ("not an entry", "malformed"),
    ],
)
def test_bad_entries(tmp_path, refuses, entry, fragment):
    path = tmp_path / "bad.safetensors"
    _raw(path, {"x": entry}, bytes(8))
    with refuses(InvalidInput, "'x'", fragment):
        read_header(path)


def test_overlapping_tensors(tmp_path, refuses):
    path = tmp_path / "o.safetensors"
    _raw(path, {
        "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
    }, bytes(12))
    with refuses(InvalidInput, "overlap", "'a'", "'b'"):
        read_header(path)


def test_header_length_beyond_the_file(tmp_path, refuses):
    path = tmp_path / "l.safetensors"
    path.write_bytes(struct.pack("<Q", 10**15) + b"{}")
    with refuses(InvalidInput, "header length"):
        read_header(path)


def test_header_not_json(tmp_path, refuses):
    path = tmp_path / "j.safetensors"
    path.write_bytes(struct.pack("<Q", 5) + b"{nope")
    with refuses(InvalidInput, "invalid JSON"):
        read_header(path)


def test_metadata_must_be_strings(tmp_path, refuses):
    path = tmp_path / "m.safetensors"
    _raw(path, {"__metadata__": {"config": {"layers": []}}})
    with refuses(InvalidInput, "__metadata__"):
        read_header(path)
