"""Our safetensors reader: tensors built from the checked header alone, hostile headers refused
with a message and within bounded memory, and no other parser ever handed the user's bytes."""

from __future__ import annotations

import json
import struct
import sys

import pytest
import safetensors
import safetensors.torch
import torch
from safetensors.torch import save_file

from curvscope_service.errors import InvalidInput
from curvscope_service.loading import load_data, load_model, save_sequential
from curvscope_service.loading.safetensors_file import (
    MAX_HEADER_BYTES,
    MAX_NAME_LENGTH,
    MAX_RANK,
    MAX_TENSORS,
    SafetensorsReader,
    read_header,
)
from hostile_files import peak_growth, raw_safetensors
from loading_fixtures import mlp

_LIBRARY_DTYPES = [
    torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.complex64,
    torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool,
    torch.uint64, torch.uint32, torch.uint16,
    torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e4m3fnuz, torch.float8_e5m2fnuz,
]


def load_tensors(path) -> tuple:
    """Every tensor of ``path`` through our reader."""
    with SafetensorsReader(path) as reader:
        return reader.header, {name: reader.read(name) for name in reader.header.tensors}


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().reshape(-1).view(torch.uint8)


def _sample(dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    # random bytes reinterpreted: every bit pattern must come back unchanged (bools stay 0/1)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, dtype=torch.bool)
    nbytes = torch.Size(shape).numel() * dtype.itemsize
    return torch.randint(0, 256, (nbytes,), dtype=torch.uint8).view(dtype).reshape(shape)


def test_every_dtype_reads_back_bit_for_bit(tmp_path):
    torch.manual_seed(0)
    tensors = {str(dtype): _sample(dtype, (3, 5)) for dtype in _LIBRARY_DTYPES}
    tensors["scalar"] = torch.tensor(2.5)
    tensors["empty"] = torch.zeros(0, 7)
    path = tmp_path / "all.safetensors"
    save_file(tensors, str(path), metadata={"note": "x"})
    header, loaded = load_tensors(path)
    assert header.metadata == {"note": "x"} and set(loaded) == set(tensors)
    for name, expected in tensors.items():
        got = loaded[name]
        assert (got.dtype, got.shape) == (expected.dtype, expected.shape), name
        assert torch.equal(_bits(got), _bits(expected)), name


def test_e8m0_written_by_hand(tmp_path):
    # the library cannot write F8_E8M0, torch can hold it: a power-of-two scale per byte
    path = raw_safetensors(tmp_path / "e8.safetensors",
                           {"s": {"dtype": "F8_E8M0", "shape": [3], "data_offsets": [0, 3]}}, bytes([126, 127, 130]))
    assert load_tensors(path)[1]["s"].float().tolist() == [0.5, 1.0, 8.0]


def test_tensors_own_their_memory(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"w": torch.arange(6.0)}, str(path))
    with SafetensorsReader(path) as reader:
        first = reader.read("w")
        first.add_(1)  # writable, and not a view of anything shared
        assert torch.equal(reader.read("w"), torch.arange(6.0))


def test_read_into_checks_the_shape_and_casts(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"w": torch.arange(6.0).reshape(2, 3), "next": torch.ones(4)}, str(path))
    with SafetensorsReader(path) as reader:
        with pytest.raises(ValueError, match="shape"):
            reader.read_into("w", torch.empty(8))  # would read into the next tensor's bytes
        direct, cast = torch.empty(2, 3), torch.empty(2, 3, dtype=torch.float64)
        reader.read_into("w", direct)
        reader.read_into("w", cast)
    assert torch.equal(direct, torch.arange(6.0).reshape(2, 3)) and torch.equal(cast, direct.double())


def test_big_endian_host_gets_the_bytes_swapped(tmp_path, monkeypatch):
    path = tmp_path / "w.safetensors"
    values = torch.tensor([1.0, -2.5, 3e38], dtype=torch.float32)
    save_file({"w": values}, str(path))
    monkeypatch.setattr(sys, "byteorder", "big")
    got = load_tensors(path)[1]["w"]
    # a big-endian host's memory holds each value's bytes in reverse order of the file's
    assert torch.equal(_bits(got), _bits(values).view(-1, 4).flip(-1).reshape(-1))


def test_no_other_parser_sees_the_bytes(tmp_path, monkeypatch):
    model_path = tmp_path / "m.safetensors"
    config = {"layers": [{"type": "linear", "in_features": 4, "out_features": 8}, {"type": "tanh"},
                         {"type": "linear", "in_features": 8, "out_features": 3}]}
    original = mlp()
    save_sequential(model_path, config, original.state_dict())
    data_path = tmp_path / "d.safetensors"
    save_file({"inputs": torch.randn(5, 4), "targets": torch.zeros(5, dtype=torch.int64)}, str(data_path))

    def forbidden(*args, **kwargs):
        raise AssertionError("the safetensors library was handed a user's file")

    for owner, name in [(safetensors.torch, "load_file"), (safetensors.torch, "load"), (safetensors, "safe_open"),
                        (safetensors.torch, "safe_open")]:
        monkeypatch.setattr(owner, name, forbidden, raising=False)
    model = load_model(model_path)
    x = torch.randn(2, 4)
    torch.testing.assert_close(model.module(x), original(x))
    assert load_data(data_path).num_samples == 5


@pytest.mark.parametrize(("dtype", "fragment"), [
    (["F32"], "unknown dtype ['F32']"),
    ({"name": "F32"}, "unknown dtype {'name': 'F32'}"),
    (None, "unknown dtype None"),
    ("F4", "dtype F4, which torch cannot hold"),
    ("F6_E2M3", "dtype F6_E2M3, which torch cannot hold"),
])
def test_dtype_that_is_not_a_known_name(tmp_path, refuses, dtype, fragment):
    # a list or object used to reach a dict lookup and fail as TypeError (INTERNAL)
    path = raw_safetensors(tmp_path / "d.safetensors", {"x": {"dtype": dtype, "shape": [1], "data_offsets": [0, 4]}},
                           bytes(4))
    with refuses(InvalidInput, "'x'", fragment):
        read_header(path)


def test_bool_bytes_other_than_0_and_1(tmp_path, refuses):
    path = raw_safetensors(tmp_path / "b.safetensors", {"m": {"dtype": "BOOL", "shape": [3], "data_offsets": [0, 3]}},
                           bytes([0, 1, 7]))
    with refuses(InvalidInput, "BOOL tensor 'm'", "0 and 1"):
        load_tensors(path)


@pytest.mark.parametrize("metadata", [{"architecture": ["sequential"]}, {"config": {"layers": []}}, [], ""])
def test_metadata_values_are_strings_only(tmp_path, refuses, metadata):
    path = raw_safetensors(tmp_path / "m.safetensors", {"__metadata__": metadata})
    with refuses(InvalidInput, "__metadata__ must map strings to strings"):
        read_header(path)


def test_rank_cap(tmp_path, refuses):
    shape = [1] * (MAX_RANK + 1)
    path = raw_safetensors(tmp_path / "r.safetensors", {"x": {"dtype": "F32", "shape": shape, "data_offsets": [0, 4]}},
                           bytes(4))
    with refuses(InvalidInput, "'x'", f"{MAX_RANK + 1} dimensions", f"limit is {MAX_RANK}"):
        read_header(path)


def test_name_length_cap(tmp_path, refuses):
    name = "w" * (MAX_NAME_LENGTH + 1)
    path = raw_safetensors(tmp_path / "n.safetensors", {name: {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}},
                           bytes(4))
    with refuses(InvalidInput, f"{MAX_NAME_LENGTH + 1} characters long", f"limit is {MAX_NAME_LENGTH}"):
        read_header(path)


def test_empty_tensor_with_absurd_dimensions(tmp_path, refuses):
    # zero bytes, but sizes and strides that overflow 64 bits
    path = raw_safetensors(tmp_path / "e.safetensors",
                           {"x": {"dtype": "F32", "shape": [0, 2**62, 2**62], "data_offsets": [0, 0]}})
    with refuses(InvalidInput, "'x'", "elements"):
        read_header(path)


@pytest.mark.parametrize(("entries", "data", "fragment"), [
    ({"a": [0, 4], "b": [8, 12]}, 12, "4 bytes after tensor 'a' belong to no tensor"),
    ({"a": [4, 8]}, 8, "4 bytes at the start of the data region belong to no tensor"),
    ({"a": [0, 4]}, 12, "the last 8 bytes of the data region belong to no tensor"),
])
def test_data_region_is_exactly_the_tensors(tmp_path, refuses, entries, data, fragment):
    header = {name: {"dtype": "F32", "shape": [1], "data_offsets": span} for name, span in entries.items()}
    path = raw_safetensors(tmp_path / "h.safetensors", header, bytes(data))
    with refuses(InvalidInput, fragment):
        read_header(path)


def test_duplicate_key_leaves_a_hole(tmp_path, refuses):
    # the JSON parser keeps the last of two equal keys; the first one's bytes are then unindexed
    text = ('{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, '
            '"w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}')
    path = raw_safetensors(tmp_path / "dup.safetensors", text, bytes(8))
    with refuses(InvalidInput, "belong to no tensor"):
        read_header(path)


def test_header_that_is_not_utf8(tmp_path, refuses):
    text = json.dumps({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode("utf-16")
    path = raw_safetensors(tmp_path / "u16.safetensors", text, bytes(4))
    with refuses(InvalidInput, "not UTF-8"):
        read_header(path)


def test_deeply_nested_header(tmp_path, refuses):
    path = raw_safetensors(tmp_path / "deep.safetensors", '{"x": ' + "[" * 200_000 + "]" * 200_000 + "}")
    with refuses(InvalidInput, "invalid JSON", "nests JSON deeper"):
        read_header(path)


def test_header_over_the_byte_cap_is_not_read(tmp_path, refuses):
    path = tmp_path / "big.safetensors"
    size = MAX_HEADER_BYTES + 1
    with path.open("wb") as f:
        f.write(struct.pack("<Q", size))
        f.truncate(8 + size)  # sparse: the refusal must come from the length alone
    with refuses(InvalidInput, f"header of {size} bytes", f"limit is {MAX_HEADER_BYTES}"):
        read_header(path)


def test_tensor_count_cap_in_bounded_memory(tmp_path):
    # 400,000 empty tensors took a server from 418 MB to 1.1 GB; one over the cap is refused
    header = {f"t{i}": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]} for i in range(MAX_TENSORS + 1)}
    path = raw_safetensors(tmp_path / "many.safetensors", header)
    result = peak_growth(f"load_data({str(path)!r})")
    assert result["outcome"].startswith("InvalidInput") and f"declares {MAX_TENSORS + 1} tensors" in result["outcome"]
    assert result["growth_mb"] < 150, result


def test_worst_json_at_the_byte_cap_in_bounded_memory(tmp_path):
    # the costliest JSON per byte (empty lists, ~40x once parsed and depth-checked) filling the whole cap
    body = ",".join(["[]"] * ((MAX_HEADER_BYTES - 16) // 3))
    path = raw_safetensors(tmp_path / "lists.safetensors", '{"x": [' + body + "]}")
    assert path.stat().st_size - 8 <= MAX_HEADER_BYTES
    result = peak_growth(f"load_data({str(path)!r})")
    assert result["outcome"].startswith("InvalidInput") and "malformed header entry" in result["outcome"]
    assert result["growth_mb"] < 250, result
