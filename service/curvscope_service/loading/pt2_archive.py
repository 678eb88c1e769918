"""Read a torch.export archive (``.pt2``) with one reader of ours; torch never sees the file.

``torch.export.load`` is not safe on untrusted files: it unpickles (weights marked
``use_pickle``, custom and opaque objects, legacy ``.pt`` files, and the sample inputs, falling
back to ``weights_only=False`` when the restricted load fails), and its zip reader matches member
names differently from Python's ``zipfile``, so a scan with one parser and a load with the other
disagree about which bytes are which. Here the archive is read once, with ``zipfile``:

- names are checked (one archive folder, no absolute or ``..`` paths, no duplicates, no two names
  that differ only in case) and every member must be on an allow-list;
- only what curvscope evaluates is read: the program JSON, the weights and constants configs and
  the raw tensor files they name. The sample inputs (a nested pickle archive) and extra files are
  never decompressed; anything that would need an unpickler is refused;
- every declared size (member bytes, decompressed total, tensor counts, ranks, elements) is capped
  before anything is allocated;
- tensors are built from the raw bytes here, and torch's deserialiser gets those tensors and the
  parsed, checked program (see ``pt2_program``), never bytes to parse again.
"""

from __future__ import annotations

import math
import re
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch._export.serde.schema import Layout, ScalarType
from torch.export.pt2_archive import constants as pt2

from curvscope_service.errors import InvalidInput, ResourceExhausted
from curvscope_service.loading.json_text import parse_json
from curvscope_service.loading.messages import NEVER_UNPICKLE, one_line
from curvscope_service.loading.pt2_program import REEXPORT, check_program

MODEL = "model"  # the program torch.export.save writes; other programs in an archive are ignored

# Caps, each far above what torch.export.save writes for real models (a BERT-base program is
# ~3 MB of JSON with ~200 weights; a 7B-parameter LLM has ~300 weight tensors) and far below what
# would hurt the server. Why these numbers: docs/service.md, "What an uploader can do".
MAX_MEMBERS = 100_000
MAX_PROGRAM_BYTES = 256 << 20
MAX_CONFIG_BYTES = 64 << 20
MAX_TENSORS = 50_000
MAX_RANK = 16
# A deflated member may inflate; the archive as a whole may not inflate past this ratio.
MAX_INFLATION = 4
_INFLATION_SLACK = 1 << 20

_ALLOWED_COMPRESSION = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED)
_ENCRYPTED_FLAG = 0x1
_MAX_INDEX = 1 << 62  # sizes, strides, offsets: what as_strided takes without overflowing
_PAYLOAD_FILE = re.compile(r"[A-Za-z0-9_.\-]+")
_MODEL_NAME = re.compile(r"[A-Za-z0-9_]+")
# weight and constant names become module attribute paths
_FQN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,999}")
_NAME_CHARS = re.compile(r"[A-Za-z0-9_.\-/]+")
_ROOT = re.compile(r"[^\x00-\x1f\x7f/\\:]+")
# Members torch writes that curvscope never reads.
_IGNORED_FIXED = {pt2.ARCHIVE_VERSION_PATH, "byteorder", ".data/version", ".data/serialization_id"}
_IGNORED_DIRS = (pt2.SAMPLE_INPUTS_DIR, pt2.EXTRA_DIR)
_MODEL_FILE = tuple(pt2.MODELS_FILENAME_FORMAT.split("{}"))  # "models/", ".json"

# The dtypes a checkpoint may carry, from the schema's enum (a table, not torch's lookup, so an
# unknown number is refused by name).
_DTYPES = {
    ScalarType.BYTE: torch.uint8, ScalarType.CHAR: torch.int8, ScalarType.SHORT: torch.int16,
    ScalarType.INT: torch.int32, ScalarType.LONG: torch.int64, ScalarType.HALF: torch.float16,
    ScalarType.FLOAT: torch.float32, ScalarType.DOUBLE: torch.float64, ScalarType.BOOL: torch.bool,
    ScalarType.BFLOAT16: torch.bfloat16,
}


@dataclass
class ArchiveContents:
    """What torch's deserialiser needs, all produced by this reader."""

    program: dict[str, Any]  # parsed and checked, guard code dropped
    state_dict: dict[str, torch.Tensor]
    constants: dict[str, torch.Tensor]


def read_archive(path: Path, *, max_parameters: int) -> ArchiveContents:
    """Read and check ``path``; raise InvalidInput (or ResourceExhausted) naming the first problem.
    The parameters the weights config declares are counted against ``max_parameters`` before any is read."""
    size = path.stat().st_size
    try:
        with zipfile.ZipFile(path) as archive:
            reader = _Reader(archive, budget=MAX_INFLATION * size + _INFLATION_SLACK, max_parameters=max_parameters)
            return reader.contents()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, ValueError, NotImplementedError) as e:
        raise InvalidInput(f"model is a corrupt or truncated zip archive ({one_line(e)}); {REEXPORT}") from None


class _Reader:
    def __init__(self, archive: zipfile.ZipFile, *, budget: int, max_parameters: int):
        self._archive = archive
        self._max_parameters = max_parameters
        self._budget = budget  # bytes this archive may still decompress
        self._members = self._check_names(archive.infolist())

    def contents(self) -> ArchiveContents:
        if pt2.ARCHIVE_FORMAT_PATH not in self._members:
            if "data.pkl" in self._members:  # torch.save writes <folder>/data.pkl
                raise InvalidInput(NEVER_UNPICKLE)
            raise InvalidInput(f"model is a zip file but not a torch.export archive (no '{pt2.ARCHIVE_FORMAT_PATH}' member); {REEXPORT}")
        for name in self._members:
            _check_allowed(name)
        format_name = self._read(pt2.ARCHIVE_FORMAT_PATH, limit=64)
        if format_name != pt2.ARCHIVE_FORMAT_VALUE.encode():
            raise InvalidInput(f"model is a zip file but not a torch.export archive; {REEXPORT}")
        if "byteorder" in self._members and self._read("byteorder", limit=64) != sys.byteorder.encode():
            raise InvalidInput(f"torch.export archive's tensors are not {sys.byteorder}-endian, the byte order this server reads; {REEXPORT}")
        program_file = pt2.MODELS_FILENAME_FORMAT.format(MODEL)
        if program_file not in self._members:
            raise InvalidInput(f"torch.export archive has no '{program_file}'; {REEXPORT}")
        program = check_program(self._json(program_file, "model program", MAX_PROGRAM_BYTES))
        state_dict = self._tensors(pt2.WEIGHTS_CONFIG_FILENAME_FORMAT.format(MODEL), pt2.WEIGHTS_DIR, "weight")
        constants = self._tensors(pt2.CONSTANTS_CONFIG_FILENAME_FORMAT.format(MODEL), pt2.CONSTANTS_DIR, "constant")
        return ArchiveContents(program=program, state_dict=state_dict, constants=constants)

    # --- names --------------------------------------------------------------------------------

    def _check_names(self, infos: list[zipfile.ZipInfo]) -> dict[str, zipfile.ZipInfo]:
        if not infos:
            raise InvalidInput(f"model is an empty zip archive; {REEXPORT}")
        if len(infos) > MAX_MEMBERS:
            raise InvalidInput(f"torch.export archive has {len(infos)} members; the limit is {MAX_MEMBERS}")
        root = infos[0].filename.split("/", 1)[0]
        members: dict[str, zipfile.ZipInfo] = {}
        folded: set[str] = set()
        for info in infos:
            name = info.filename
            shown = repr(name[:80])
            parts = name.split("/")
            # the folder is the saved file's name; below it, only the names torch.export.save writes
            if not _ROOT.fullmatch(parts[0]) or not _NAME_CHARS.fullmatch("/".join(parts[1:]) or "/") or any(
                part in ("", ".", "..") for part in parts
            ):
                raise InvalidInput(f"torch.export archive has a member named {shown}; {REEXPORT}")
            if len(parts) < 2 or parts[0] != root:
                raise InvalidInput(f"torch.export archive member {shown} is outside the archive folder '{root}/'; {REEXPORT}")
            if name.lower() in folded:  # other zip readers match names case-insensitively
                raise InvalidInput(f"torch.export archive has duplicate member {shown}; {REEXPORT}")
            folded.add(name.lower())
            if info.flag_bits & _ENCRYPTED_FLAG or info.compress_type not in _ALLOWED_COMPRESSION:
                raise InvalidInput(f"torch.export archive member {shown} is encrypted or compressed in an unsupported way; {REEXPORT}")
            members[name[len(root) + 1 :]] = info
        return members

    # --- bounded reads ------------------------------------------------------------------------

    def _read(self, name: str, *, limit: int) -> bytearray:
        info = self._members.get(name)
        if info is None:
            raise InvalidInput(f"torch.export archive lacks '{name}' (truncated or not from torch.export.save); {REEXPORT}")
        if info.file_size > limit:
            raise InvalidInput(f"torch.export archive member '{name}' declares {info.file_size} bytes; the limit is {limit}")
        if info.file_size > self._budget:
            raise InvalidInput(
                f"torch.export archive unpacks to more than {MAX_INFLATION}x its size at '{name}': refusing a zip bomb"
            )
        self._budget -= info.file_size
        # zipfile stops at the declared size and checks the CRC: at most file_size bytes, one copy
        buffer = bytearray(info.file_size)
        with self._archive.open(info) as member:
            view = memoryview(buffer)
            filled = 0
            while filled < len(buffer):
                count = member.readinto(view[filled:])
                if not count:
                    raise InvalidInput(f"torch.export archive member '{name}' is truncated; {REEXPORT}")
                filled += count
            if member.read(1):
                raise InvalidInput(f"torch.export archive member '{name}' is longer than it declares; {REEXPORT}")
        return buffer

    def _json(self, name: str, what: str, limit: int) -> Any:
        return parse_json(bytes(self._read(name, limit=limit)), what=f"torch.export archive's {what} '{name}'", max_bytes=limit)

    # --- tensors ------------------------------------------------------------------------------

    def _tensors(self, config_file: str, directory: str, kind: str) -> dict[str, torch.Tensor]:
        config = self._json(config_file, f"{kind}s config", MAX_CONFIG_BYTES)
        entries = config.get("config") if isinstance(config, dict) else None
        if not isinstance(entries, dict):
            raise InvalidInput(f"torch.export archive has a corrupt {kind}s config '{config_file}'; {REEXPORT}")
        if len(entries) > MAX_TENSORS:
            raise InvalidInput(f"torch.export archive declares {len(entries)} {kind}s; the limit is {MAX_TENSORS}")
        specs = [_TensorSpec.parse(fqn, entry, kind) for fqn, entry in entries.items()]
        parameters = sum(math.prod(spec.sizes) for spec in specs if spec.is_param)
        if parameters > self._max_parameters:
            raise ResourceExhausted(
                f"the model declares {parameters} parameters, over the limit of {self._max_parameters}; "
                "use a smaller model or a server with a higher --max-parameters"
            )
        storages: dict[str, torch.Tensor] = {}  # file -> flat tensor; entries naming one file share it (tied weights)
        tensors: dict[str, torch.Tensor] = {}
        for spec in specs:
            if spec.path_name not in storages:
                storages[spec.path_name] = self._storage(directory + spec.path_name, spec)
            tensor = spec.view(storages[spec.path_name])
            tensors[spec.fqn] = torch.nn.Parameter(tensor, requires_grad=spec.requires_grad) if spec.is_param else tensor
        return tensors

    def _storage(self, name: str, spec: _TensorSpec) -> torch.Tensor:
        info = self._members.get(name)
        if info is None:
            raise InvalidInput(f"torch.export archive lacks '{name}', which {spec.kind} '{spec.fqn}' names; {REEXPORT}")
        element_size = torch.empty((), dtype=spec.dtype).element_size()
        if info.file_size % element_size:
            raise InvalidInput(f"torch.export archive member '{name}' is not a whole number of {spec.dtype} elements")
        if info.file_size == 0:
            return torch.empty(0, dtype=spec.dtype)
        raw = self._read(name, limit=info.file_size)
        if spec.dtype == torch.bool and raw.translate(None, b"\x00\x01"):
            raise InvalidInput(f"torch.export archive member '{name}' holds booleans other than 0 and 1")
        return torch.frombuffer(raw, dtype=spec.dtype)  # shares the bytearray: no second copy


def _check_allowed(name: str) -> None:
    prefix, suffix = _MODEL_FILE
    if name == pt2.ARCHIVE_FORMAT_PATH or name in _IGNORED_FIXED or name.startswith(_IGNORED_DIRS):
        return
    if name.startswith(prefix) and name.endswith(suffix) and _MODEL_NAME.fullmatch(name[len(prefix) : -len(suffix)]):
        return
    for directory in (pt2.WEIGHTS_DIR, pt2.CONSTANTS_DIR):
        if name.startswith(directory) and _PAYLOAD_FILE.fullmatch(name[len(directory) :]):
            return
    raise InvalidInput(
        f"torch.export archive member '{name[:80]}' is not supported (AOTInductor and other compiled payloads are refused); {REEXPORT}"
    )


@dataclass
class _TensorSpec:
    fqn: str
    kind: str
    path_name: str
    dtype: torch.dtype
    sizes: tuple[int, ...]
    strides: tuple[int, ...]
    offset: int
    requires_grad: bool
    is_param: bool

    @classmethod
    def parse(cls, fqn: str, entry: Any, kind: str) -> _TensorSpec:
        def refuse(why: str) -> InvalidInput:
            return InvalidInput(f"torch.export archive: {kind} '{fqn[:80]}' {why}; {REEXPORT}")

        if not _FQN.fullmatch(fqn):
            raise InvalidInput(f"torch.export archive: a {kind} is named {fqn[:80]!r}, not a dotted name; {REEXPORT}")
        if not isinstance(entry, dict) or not isinstance(entry.get("path_name"), str):
            raise refuse("has a malformed entry")
        path_name = entry["path_name"]
        if entry.get("use_pickle") is not False:
            raise refuse("is stored as a pickle; curvscope never unpickles; save tensors of standard dtypes and layout")
        if not _PAYLOAD_FILE.fullmatch(path_name) or (kind == "constant" and not path_name.startswith(pt2.TENSOR_CONSTANT_FILENAME_PREFIX)):
            raise refuse("is not a plain tensor (custom and opaque objects are pickled; curvscope only loads tensors)")
        meta = entry.get("tensor_meta")
        if not isinstance(meta, dict):
            raise refuse("has no tensor description")
        dtype = _DTYPES.get(meta.get("dtype")) if type(meta.get("dtype")) is int else None
        if dtype is None:
            raise refuse(f"has an unsupported dtype {str(meta.get('dtype'))[:20]}")
        if meta.get("layout") != Layout.Strided:
            raise refuse("is not a dense (strided) tensor")
        sizes, strides = _ints(meta.get("sizes"), refuse, "sizes"), _ints(meta.get("strides"), refuse, "strides")
        offset = _ints([meta.get("storage_offset")], refuse, "storage offset")[0]
        if len(sizes) != len(strides) or len(sizes) > MAX_RANK:
            raise refuse(f"has {len(sizes)} sizes and {len(strides)} strides (at most {MAX_RANK} dimensions)")
        return cls(
            fqn=fqn, kind=kind, path_name=path_name, dtype=dtype, sizes=sizes, strides=strides, offset=offset,
            requires_grad=meta.get("requires_grad") is True, is_param=entry.get("is_param") is True,
        )

    def view(self, storage: torch.Tensor) -> torch.Tensor:
        """The strided view of ``storage`` this entry describes, after checking it lies inside."""
        if storage.dtype != self.dtype:
            raise InvalidInput(f"torch.export archive: {self.kind} '{self.fqn[:80]}' reads '{self.path_name}' as {self.dtype}, another entry as {storage.dtype}")
        numel = math.prod(self.sizes)
        last = self.offset + sum((size - 1) * stride for size, stride in zip(self.sizes, self.strides))
        if numel and last >= storage.numel():
            raise InvalidInput(
                f"torch.export archive: {self.kind} '{self.fqn[:80]}' of shape {list(self.sizes)} reaches element {last} "
                f"of a {storage.numel()}-element file; {REEXPORT}"
            )
        return torch.as_strided(storage, self.sizes, self.strides, self.offset)


def _ints(values: Any, refuse, what: str) -> tuple[int, ...]:
    # symbolic sizes ('as_expr') never describe stored weights
    if not isinstance(values, list) or not all(
        isinstance(v, dict) and set(v) == {"as_int"} and type(v["as_int"]) is int and 0 <= v["as_int"] < _MAX_INDEX for v in values
    ):
        raise refuse(f"has malformed {what} (non-negative integers expected)")
    return tuple(v["as_int"] for v in values)

