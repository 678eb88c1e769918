"""Validate a safetensors file's header before any library touches its data.

A safetensors file is an 8-byte little-endian header length, a JSON header and a data region.
Checking the header ourselves turns a truncated or hostile file into a message that names the
bad tensor, instead of an allocation of 10**24 bytes or a Rust panic.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
import safetensors.torch

from curvscope_service.errors import InvalidInput
from curvscope_service.loading.messages import one_line

MAX_HEADER_BYTES = 100 * 1024 * 1024

# dtype name in the header -> bytes per element (the dtypes safetensors.torch can load)
_ITEMSIZE = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "C64": 8,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
    "U64": 8, "U32": 4, "U16": 2,
    "F8_E4M3": 1, "F8_E4M3FNUZ": 1, "F8_E5M2": 1, "F8_E5M2FNUZ": 1,
}


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass(frozen=True)
class SafetensorsHeader:
    metadata: dict[str, str]
    tensors: dict[str, TensorEntry]


def read_header(path: Path, *, what: str = "file") -> SafetensorsHeader:
    """Parse and check the header of ``path``; raise InvalidInput naming the first problem."""
    size = path.stat().st_size
    with path.open("rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise InvalidInput(
                f"{what} is not a safetensors file: {size} bytes is too short for the 8-byte header length"
            )
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > MAX_HEADER_BYTES or header_len > size - 8:
            raise InvalidInput(
                f"{what} is not a valid safetensors file: header length {header_len} does not fit "
                f"in a {size}-byte file (truncated or not safetensors)"
            )
        raw = f.read(header_len)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InvalidInput(f"{what} has a corrupt safetensors header (invalid JSON: {one_line(e)})") from None
    if not isinstance(header, dict):
        raise InvalidInput(f"{what} has a corrupt safetensors header: expected a JSON object")

    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise InvalidInput(f"{what}: safetensors __metadata__ must map strings to strings")

    data_size = size - 8 - header_len
    tensors = {name: _check_entry(name, spec, data_size, what) for name, spec in header.items()}
    _check_no_overlap(tensors.values(), what)
    return SafetensorsHeader(metadata=metadata, tensors=tensors)


def _check_entry(name: str, spec: object, data_size: int, what: str) -> TensorEntry:
    if not isinstance(spec, dict):
        raise InvalidInput(f"{what}: tensor '{name}' has a malformed header entry")
    dtype, shape, offsets = spec.get("dtype"), spec.get("shape"), spec.get("data_offsets")
    if dtype not in _ITEMSIZE:
        raise InvalidInput(
            f"{what}: tensor '{name}' has unknown dtype {dtype!r}; use one of {', '.join(sorted(_ITEMSIZE))}"
        )
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise InvalidInput(f"{what}: tensor '{name}' has shape {shape!r}; dimensions must be non-negative integers")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(type(o) is int for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise InvalidInput(f"{what}: tensor '{name}' has malformed data_offsets {offsets!r}")
    begin, end = offsets
    nbytes = math.prod(shape) * _ITEMSIZE[dtype]
    if nbytes != end - begin:
        raise InvalidInput(
            f"{what}: tensor '{name}' declares shape {shape} of {dtype} ({nbytes} bytes) "
            f"but its byte range holds {end - begin} bytes"
        )
    if end > data_size:
        raise InvalidInput(
            f"{what}: tensor '{name}' ends at byte {end} of a {data_size}-byte data region (file truncated?)"
        )
    return TensorEntry(name=name, dtype=dtype, shape=tuple(shape), begin=begin, end=end)


def _check_no_overlap(entries, what: str) -> None:
    previous = None
    for entry in sorted(entries, key=lambda e: (e.begin, e.end)):
        if previous is not None and entry.begin < previous.end:
            raise InvalidInput(f"{what}: tensors '{previous.name}' and '{entry.name}' overlap in the data region")
        previous = entry


def load_tensors(path: Path, *, what: str = "file", device: torch.device | str = "cpu") -> tuple[SafetensorsHeader, dict[str, torch.Tensor]]:
    """Check the header, then load every tensor of a safetensors file."""
    header = read_header(path, what=what)
    try:
        tensors = safetensors.torch.load_file(str(path), device=str(device))
    except Exception as e:  # safetensors raises its own SafetensorError, or a Rust panic
        raise InvalidInput(f"{what} could not be read as safetensors: {one_line(e)}") from None
    return header, tensors
