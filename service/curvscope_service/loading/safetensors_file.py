"""Our one reader of safetensors files: the header is checked, then tensors are built from it.

A safetensors file is an 8-byte little-endian header length, a UTF-8 JSON header and a data
region. Every size the header declares is checked against the file and against the caps below
before anything is allocated, and each tensor is read from exactly the byte range its checked
entry names. No other parser (the ``safetensors`` library included) ever sees a user's file, so
nothing can read those bytes differently from this scan. A truncated or hostile file becomes a
one-line message that names the bad tensor.
"""

from __future__ import annotations

import math
import os
import struct
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from curvscope_service.errors import InvalidInput
from curvscope_service.loading.json_text import parse_json
from curvscope_service.loading.messages import brief

# The library's own limit was 100 MiB. Parsing and depth-checking JSON costs up to ~40x its size
# in Python objects (measured: 8 MiB of '[[],[],...]' grew the process by 333 MB), so 100 MiB
# could cost 4 GB before any check ran. 4 MiB (~170 MB at worst) holds MAX_TENSORS entries with
# 130-character names (2.1 MB measured) next to a config at its 1 MiB cap.
MAX_HEADER_BYTES = 4 << 20
# Real single files hold far fewer: GPT-2 ~150 tensors, a 7B Llama 291, ResNet-152 ~930, the
# small mixture-of-experts models 3-5k (OLMoE-1B-7B's 16 layers x 64 experts x 3 matrices alone
# are 3,072). Each entry costs ~2 KB once parsed and checked, so this bounds that to ~35 MB
# (400,000 empty tensors took a server from 418 MB to 1.1 GB).
MAX_TENSORS = 16_384
# Conv3d weights and video batches have 5 dimensions; nothing real needs more than 8.
MAX_RANK = 8
# A non-empty tensor cannot declare more elements than the file holds bytes; an empty one could
# declare [0, 10**30] and overflow torch's 64-bit sizes and strides. Its dimensions, zeros read as
# ones, must multiply to at most this (2**40 elements, 256x what a 4 GiB upload can hold).
MAX_ELEMENTS = 1 << 40
# Names are module paths ("model.layers.31.mlp.down_proj.weight", rarely over 100 characters);
# they appear in messages and logs, which a megabyte-long name would flood.
MAX_NAME_LENGTH = 256

# dtype name in the header -> torch dtype. Every dtype of the format that torch can hold byte for
# byte; the packed 4- and 6-bit floats have no such torch dtype and are refused by name.
_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16, "U8": torch.uint8,
    "BOOL": torch.bool, "C64": torch.complex64,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "F8_E4M3FNUZ": torch.float8_e4m3fnuz, "F8_E5M2FNUZ": torch.float8_e5m2fnuz,
    "F8_E8M0": torch.float8_e8m0fnu,
}
_UNSUPPORTED_DTYPES = ("F4", "F6_E2M3", "F6_E3M2")


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


class SafetensorsReader:
    """One open safetensors file: its checked header, and its tensors read one at a time.

    The header and every tensor come through the same open file, so what is read is what was
    checked; a file that shrinks meanwhile is refused, never read short.
    """

    def __init__(self, path: Path, *, what: str = "file") -> None:
        self.what = what
        self._file: BinaryIO = Path(path).open("rb")
        try:
            self.header, self._data_start = _parse_header(self._file, what)
        except BaseException:
            self._file.close()
            raise

    def __enter__(self) -> SafetensorsReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._file.close()

    def read(self, name: str) -> torch.Tensor:
        """Tensor ``name`` on the CPU, in memory of its own (never a view of the file)."""
        entry = self.header.tensors[name]
        out = torch.empty(entry.shape, dtype=_DTYPES[entry.dtype])
        self._fill(entry, out)
        return out

    def read_into(self, name: str, out: torch.Tensor) -> None:
        """Copy tensor ``name`` into ``out`` (same shape, cast to its dtype and device).

        A contiguous CPU ``out`` of the file's dtype is read into directly: loading a model then
        costs the model, not the model plus a copy of its largest tensor.
        """
        entry = self.header.tensors[name]
        if tuple(out.shape) != entry.shape:
            # never read past the entry's byte range, nor let copy_ broadcast
            raise ValueError(f"tensor '{name}' has shape {list(entry.shape)}, not {list(out.shape)}")
        if out.device.type == "cpu" and out.dtype == _DTYPES[entry.dtype] and out.is_contiguous():
            self._fill(entry, out)
        else:
            out.copy_(self.read(name))

    def _fill(self, entry: TensorEntry, out: torch.Tensor) -> None:
        raw = out.reshape(-1).view(torch.uint8)  # out's own bytes
        self._file.seek(self._data_start + entry.begin)
        view, filled = memoryview(raw.numpy()), 0
        while filled < len(view):
            got = self._file.readinto(view[filled:])
            if not got:
                raise InvalidInput(
                    f"{self.what}: tensor '{entry.name}' ends past the end of the file (it changed while being read)"
                )
            filled += got
        if out.dtype == torch.bool and bool((raw > 1).any()):
            # torch's bool kernels assume 0 or 1; other bytes give values that are neither
            raise InvalidInput(f"{self.what}: BOOL tensor '{entry.name}' holds bytes other than 0 and 1")
        itemsize = out.dtype.itemsize
        if sys.byteorder != "little" and itemsize > 1:
            raw.copy_(raw.view(-1, itemsize).flip(-1).reshape(-1))  # the file is little-endian


def read_header(path: Path, *, what: str = "file") -> SafetensorsHeader:
    """Parse and check the header of ``path``; raise InvalidInput naming the first problem."""
    with SafetensorsReader(path, what=what) as reader:
        return reader.header


def _parse_header(f: BinaryIO, what: str) -> tuple[SafetensorsHeader, int]:
    size = os.fstat(f.fileno()).st_size
    prefix = f.read(8)
    if len(prefix) < 8:
        raise InvalidInput(
            f"{what} is not a safetensors file: {size} bytes is too short for the 8-byte header length"
        )
    (header_len,) = struct.unpack("<Q", prefix)
    if header_len > size - 8:
        raise InvalidInput(
            f"{what} is not a valid safetensors file: header length {header_len} does not fit "
            f"in a {size}-byte file (truncated or not safetensors)"
        )
    if header_len > MAX_HEADER_BYTES:
        raise InvalidInput(
            f"{what} has a safetensors header of {header_len} bytes; the limit is {MAX_HEADER_BYTES} "
            f"(about {MAX_TENSORS} tensors)"
        )
    raw = f.read(header_len)
    try:
        text = raw.decode("utf-8")  # the format says UTF-8; json.loads(bytes) would also take UTF-16/32
    except UnicodeDecodeError:
        raise InvalidInput(f"{what} has a corrupt safetensors header (not UTF-8 text)") from None
    try:
        header = parse_json(text, what="its text", max_bytes=MAX_HEADER_BYTES)
    except InvalidInput as e:
        raise InvalidInput(f"{what} has a corrupt safetensors header, invalid JSON: {e}") from None
    if not isinstance(header, dict):
        raise InvalidInput(f"{what} has a corrupt safetensors header: expected a JSON object")

    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise InvalidInput(f"{what}: safetensors __metadata__ must map strings to strings")
    if len(header) > MAX_TENSORS:
        raise InvalidInput(f"{what} declares {len(header)} tensors; the limit is {MAX_TENSORS} per file")

    data_size = size - 8 - header_len
    tensors = {name: _check_entry(name, spec, data_size, what) for name, spec in header.items()}
    _check_tiling(tensors.values(), data_size, what)
    return SafetensorsHeader(metadata=metadata, tensors=tensors), 8 + header_len


def _check_entry(name: str, spec: object, data_size: int, what: str) -> TensorEntry:
    if len(name) > MAX_NAME_LENGTH:
        raise InvalidInput(
            f"{what}: tensor name {brief(name)} is {len(name)} characters long; the limit is {MAX_NAME_LENGTH}"
        )
    if not isinstance(spec, dict):
        raise InvalidInput(f"{what}: tensor '{name}' has a malformed header entry")
    dtype, shape, offsets = spec.get("dtype"), spec.get("shape"), spec.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in _DTYPES:
        if dtype in _UNSUPPORTED_DTYPES:
            raise InvalidInput(
                f"{what}: tensor '{name}' has dtype {dtype}, which torch cannot hold; store it as F32, F16 or BF16"
            )
        raise InvalidInput(
            f"{what}: tensor '{name}' has unknown dtype {brief(dtype)}; use one of {', '.join(sorted(_DTYPES))}"
        )
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise InvalidInput(
            f"{what}: tensor '{name}' has shape {brief(shape)}; dimensions must be non-negative integers"
        )
    if len(shape) > MAX_RANK:
        raise InvalidInput(f"{what}: tensor '{name}' has {len(shape)} dimensions; the limit is {MAX_RANK}")
    if math.prod(max(d, 1) for d in shape) > MAX_ELEMENTS:
        raise InvalidInput(f"{what}: tensor '{name}' declares shape {shape}, over {MAX_ELEMENTS} elements")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(type(o) is int for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise InvalidInput(f"{what}: tensor '{name}' has malformed data_offsets {brief(offsets)}")
    begin, end = offsets
    nbytes = math.prod(shape) * _DTYPES[dtype].itemsize
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


def _check_tiling(entries: Iterable[TensorEntry], data_size: int, what: str) -> None:
    # The format requires the tensors to cover the data region exactly: no overlap, no hole, nothing
    # after the last one. Unindexed bytes are where a polyglot file hides its payload, and a JSON
    # key given twice (the parser keeps the last) leaves its first range unindexed.
    previous, cursor = None, 0
    for entry in sorted(entries, key=lambda e: (e.begin, e.end)):
        if entry.begin < cursor:
            raise InvalidInput(f"{what}: tensors '{previous.name}' and '{entry.name}' overlap in the data region")
        if entry.begin > cursor:
            after = f"after tensor '{previous.name}'" if previous is not None else "at the start of the data region"
            raise InvalidInput(
                f"{what}: {entry.begin - cursor} bytes {after} belong to no tensor "
                "(a safetensors data region holds its tensors and nothing else)"
            )
        previous, cursor = entry, entry.end
    if cursor != data_size:
        raise InvalidInput(
            f"{what}: the last {data_size - cursor} bytes of the data region belong to no tensor "
            "(a safetensors data region holds its tensors and nothing else)"
        )
