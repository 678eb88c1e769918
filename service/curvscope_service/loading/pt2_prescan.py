"""Refuse a torch.export archive that would run code when torch loads it.

``torch.export.load`` is not safe on untrusted files. In torch 2.13 it
- unpickles weights/constants whose payload config says ``use_pickle``, custom objects
  (``custom_obj_*``) and opaque objects (``opaque_obj_*``), and legacy ``data/weights/<model>.pt``
  and ``data/constants/<model>.pt`` files;
- falls back to ``torch.load`` with ``weights_only=False`` when the sample inputs do not load with
  ``weights_only=True``, and, after a RuntimeError, to the pre-2.8 zip layout (a top-level
  ``version`` file and ``serialized_*.pt`` pickles);
- evaluates symbolic shape strings (``expr_str``) with ``sympy.sympify``, i.e. Python ``eval``;
- ``exec``s the archive's ``guards_code`` in ``ExportedProgram.module()``;
- generates Python source for the graph from names stored in the archive, and resolves node
  targets with ``getattr`` anywhere under ``torch``, ``operator`` or ``math``;
- loads AOTInductor shared libraries from ``data/aotinductor/``.

So before torch sees the file we read it with the same zip reader torch uses and check every
one of these against an allow-list. Anything unusual is refused; a plain ``torch.export.save``
of a model made of aten operators passes.
"""

from __future__ import annotations

import ast
import builtins
import io
import json
import pickletools
import re
import zipfile
from pathlib import Path
from typing import Any

import sympy
import torch
from torch.export.pt2_archive import constants as pt2

from curvscope_service.errors import InvalidInput
from curvscope_service.loading.messages import one_line

REEXPORT = "re-export the model with torch.export.save (see docs/formats.md)"

# Archive members torch reads besides the per-model files below.
_FIXED_MEMBERS = {pt2.ARCHIVE_FORMAT_PATH, pt2.ARCHIVE_VERSION_PATH, "byteorder", ".data/version", ".data/serialization_id"}
_MODEL_NAME = re.compile(r"[A-Za-z0-9_]+")
_PAYLOAD_FILE = re.compile(r"[A-Za-z0-9_.\-]+")
# Strings that end up in generated Python code or attribute paths.
_PLAIN = re.compile(r"[A-Za-z0-9_.+\-]*")
_SYMBOL = re.compile(r"[a-z]+[0-9]+")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")  # everything but \t and \n

# Node targets: aten/prims operators, and the symbolic-int helpers export emits.
_OPERATOR_TARGETS = {
    f"_operator.{name}"
    for name in (
        "add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "neg", "pos", "abs",
        "eq", "ne", "lt", "le", "gt", "ge", "and_", "or_", "not_", "getitem",
    )
} | {"math.trunc", "math.floor", "math.ceil", "math.sqrt"} | {
    f"torch.{name}" for name in ("sym_int", "sym_float", "sym_max", "sym_min", "sym_not", "sym_ite", "sym_sqrt", "sym_sum")
}
_OP_TARGET = re.compile(r"torch\.ops\.(aten|prims)\.[A-Za-z0-9_]+\.[A-Za-z0-9_]+")

# Names a symbolic shape expression may call (sympy and torch.utils._sympy.functions).
_SYMPY_FUNCTIONS = {
    "Symbol", "Integer", "Rational", "Float", "Max", "Min", "Mod", "floor", "ceiling", "Abs",
    "sqrt", "Eq", "Ne", "Lt", "Le", "Gt", "Ge", "And", "Or", "Not", "Piecewise",
    "FloorDiv", "ModularIndexing", "Where", "PythonMod", "CleanDiv", "CeilToInt", "FloorToInt",
    "CeilDiv", "LShift", "RShift", "PowByNatural", "FloatPow", "FloatTrueDiv", "IntTrueDiv",
    "IsNonOverlappingAndDenseIndicator", "TruncToFloat", "TruncToInt", "RoundToInt",
    "RoundDecimal", "ToFloat", "Identity",
}
_SYMPY_CONSTANTS = {"oo", "zoo", "nan", "true", "false", "pi", "E"}
_AST_NODES = (
    ast.Expression, ast.BinOp, ast.UnaryOp, ast.BoolOp, ast.Compare, ast.Call, ast.Name,
    ast.Constant, ast.Load, ast.keyword, ast.operator, ast.unaryop, ast.boolop, ast.cmpop,
)
_MAX_EXPR_CHARS = 2000


def prescan(path: Path) -> None:
    """Raise InvalidInput unless ``path`` is a torch.export archive that loads without running code."""
    members = _check_zip_layout(path)
    if pt2.ARCHIVE_FORMAT_PATH not in members:
        raise InvalidInput(f"model is a zip file but not a torch.export archive (no '{pt2.ARCHIVE_FORMAT_PATH}' member); {REEXPORT}")
    try:
        reader = torch._C.PyTorchFileReader(str(path))
        names = set(reader.get_all_records())
    except RuntimeError as e:
        raise InvalidInput(f"model is not a readable torch.export archive: {one_line(e)}; {REEXPORT}") from None

    def read(name: str) -> bytes:
        if name not in names:
            raise InvalidInput(f"torch.export archive lacks '{name}' (truncated or not from torch.export.save); {REEXPORT}")
        try:
            return reader.get_record(name)
        except RuntimeError as e:
            raise InvalidInput(f"torch.export archive member '{name}' is unreadable: {one_line(e)}") from None

    if read(pt2.ARCHIVE_FORMAT_PATH).decode(errors="replace") != pt2.ARCHIVE_FORMAT_VALUE:
        raise InvalidInput(f"model is a zip file but not a torch.export archive; {REEXPORT}")
    models = _model_names(names)
    if "model" not in models:
        raise InvalidInput(f"torch.export archive has no '{pt2.MODELS_FILENAME_FORMAT.format('model')}'; {REEXPORT}")
    _check_members(names, models)
    for model in models:
        _check_payload_config(read, pt2.WEIGHTS_CONFIG_FILENAME_FORMAT.format(model), "weights", constants=False)
        _check_payload_config(read, pt2.CONSTANTS_CONFIG_FILENAME_FORMAT.format(model), "constants", constants=True)
        _check_sample_inputs(read(pt2.SAMPLE_INPUTS_FILENAME_FORMAT.format(model)))
        _check_program(read(pt2.MODELS_FILENAME_FORMAT.format(model)))


def _check_zip_layout(path: Path) -> set[str]:
    """Member names relative to the archive folder, after checking the zip's layout."""
    # Python's zipfile is what torch's pre-2.8 fallback reads; make sure that path finds nothing.
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
            size = path.stat().st_size
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise InvalidInput(f"model is a corrupt or truncated zip archive ({one_line(e)}); {REEXPORT}") from None
    if not infos:
        raise InvalidInput(f"model is an empty zip archive; {REEXPORT}")
    root = infos[0].filename.split("/", 1)[0]
    seen: set[str] = set()
    for info in infos:
        name = info.filename
        if not name.startswith(root + "/"):
            raise InvalidInput(f"torch.export archive member '{name}' is outside the archive folder '{root}/'; {REEXPORT}")
        if name.lower() in seen:  # torch's zip reader matches names case-insensitively
            raise InvalidInput(f"torch.export archive has duplicate member '{name}'; {REEXPORT}")
        seen.add(name.lower())
    total = sum(info.file_size for info in infos)
    if total > 4 * size + (1 << 20):
        raise InvalidInput(f"torch.export archive unpacks to {total} bytes from {size}: refusing a zip bomb")
    return {info.filename[len(root) + 1 :] for info in infos}


def _model_names(names: set[str]) -> set[str]:
    prefix, suffix = pt2.MODELS_FILENAME_FORMAT.split("{}")
    models = set()
    for name in names:
        if name.startswith(prefix):
            model = name[len(prefix) : -len(suffix)] if name.endswith(suffix) else ""
            if not _MODEL_NAME.fullmatch(model):
                raise InvalidInput(f"torch.export archive has an unexpected member '{name}'; {REEXPORT}")
            models.add(model)
    return models


def _check_members(names: set[str], models: set[str]) -> None:
    for model in models:
        for legacy in (f"{pt2.WEIGHTS_DIR}{model}.pt", f"{pt2.CONSTANTS_DIR}{model}.pt"):
            if legacy in names:
                raise InvalidInput(f"torch.export archive uses the legacy pickled file '{legacy}'; curvscope never unpickles; {REEXPORT}")
    for name in names:
        allowed = (
            name in _FIXED_MEMBERS
            or name.startswith((pt2.MODELS_DIR, pt2.WEIGHTS_DIR, pt2.CONSTANTS_DIR, pt2.SAMPLE_INPUTS_DIR, pt2.EXTRA_DIR))
        )
        if not allowed:
            raise InvalidInput(
                f"torch.export archive member '{name}' is not supported (AOTInductor and other compiled payloads are refused); {REEXPORT}"
            )


def _check_payload_config(read, name: str, what: str, *, constants: bool) -> None:
    try:
        config = json.loads(read(name))
        entries = config["config"]
        if not isinstance(entries, dict):
            raise TypeError("'config' is not an object")
    except (ValueError, KeyError, TypeError) as e:
        raise InvalidInput(f"torch.export archive has a corrupt {what} config '{name}' ({one_line(e)}); {REEXPORT}") from None
    for fqn, meta in entries.items():
        if not isinstance(meta, dict) or not isinstance(meta.get("path_name"), str):
            raise InvalidInput(f"torch.export archive: {what} entry '{fqn}' is malformed; {REEXPORT}")
        if meta.get("use_pickle"):
            raise InvalidInput(
                f"torch.export archive stores {what} entry '{fqn}' as a pickle; curvscope never unpickles; "
                "save tensors of standard dtypes and layout with torch.export.save"
            )
        path_name = meta["path_name"]
        if not _PAYLOAD_FILE.fullmatch(path_name):
            raise InvalidInput(f"torch.export archive: {what} entry '{fqn}' has an invalid file name; {REEXPORT}")
        if constants and not path_name.startswith(pt2.TENSOR_CONSTANT_FILENAME_PREFIX):
            raise InvalidInput(
                f"torch.export archive constant '{fqn}' is a custom or opaque object (pickled); "
                "curvscope only loads tensor constants"
            )


def _check_sample_inputs(payload: bytes) -> None:
    # torch.load(weights_only=True) is what torch.export.load runs on this payload (and on failure
    # it falls back to a full unpickle). We never unpickle it ourselves: its pickle is read as a
    # list of opcodes, without executing anything, and must only rebuild plain tensors in tuples,
    # lists and dicts, so torch's restricted loader succeeds at its first attempt.
    if not payload:
        return
    try:
        with zipfile.ZipFile(io.BytesIO(payload)) as zf:
            pickles = [name for name in zf.namelist() if name.endswith(".pkl")]
            if len(pickles) != 1 or not pickles[0].endswith("/data.pkl"):
                raise ValueError(f"expected one data.pkl, found {pickles}")
            program = zf.read(pickles[0])
        _check_tensor_pickle(program)
    except (zipfile.BadZipFile, ValueError, EOFError, OSError) as e:
        raise InvalidInput(
            f"torch.export archive's sample inputs are not plain tensors ({one_line(e)}); curvscope never unpickles; {REEXPORT}"
        ) from None


# What torch.save writes for tensors nested in tuples, lists and dicts, and nothing more.
_TENSOR_PICKLE_GLOBALS = {
    ("torch._utils", "_rebuild_tensor_v2"),
    ("collections", "OrderedDict"),
} | {
    ("torch", f"{kind}Storage")
    for kind in ("Float", "Double", "Half", "BFloat16", "Long", "Int", "Short", "Char", "Byte", "Bool")
}
# Opcodes that call or construct something other than through REDUCE on an allowed global.
_CALLING_OPCODES = {"INST", "OBJ", "NEWOBJ", "NEWOBJ_EX", "BUILD", "EXT1", "EXT2", "EXT4"}
_STRING_OPCODES = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE"}


def _check_tensor_pickle(program: bytes) -> None:
    """Raise ValueError unless the pickle only imports ``_TENSOR_PICKLE_GLOBALS``; never executes it."""
    # STACK_GLOBAL takes its module and name from the stack: follow which stack tops and memo
    # entries are strings (torch.save reuses 'torch' from the memo), and refuse anything unresolved.
    memo: dict[int, str | None] = {}
    strings: list[str] = []  # the run of strings on top of the stack
    for opcode, argument, _ in pickletools.genops(program):
        name = opcode.name
        top = strings[-1] if strings else None
        if name in _STRING_OPCODES:
            strings.append(str(argument))
        elif name in ("GET", "BINGET", "LONG_BINGET"):
            value = memo.get(int(argument))
            strings = [*strings, value] if value is not None else []
        elif name == "MEMOIZE":
            memo[len(memo)] = top
        elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
            memo[int(argument)] = top
        elif name == "GLOBAL":
            module, _, attribute = str(argument).partition(" ")
            if (module, attribute) not in _TENSOR_PICKLE_GLOBALS:
                raise ValueError(f"it imports {module}.{attribute}")
            strings = []
        elif name == "STACK_GLOBAL":
            if len(strings) < 2 or tuple(strings[-2:]) not in _TENSOR_PICKLE_GLOBALS:
                shown = ".".join(strings[-2:]) if len(strings) >= 2 else "a name the scan cannot resolve"
                raise ValueError(f"it imports {shown}")
            strings = []
        elif name in _CALLING_OPCODES:
            raise ValueError(f"it uses the {name} opcode")
        else:
            strings = []


def _check_program(payload: bytes) -> None:
    try:
        program = json.loads(payload)
    except ValueError as e:
        raise InvalidInput(f"torch.export archive has a corrupt model program ({one_line(e)}); {REEXPORT}") from None
    if not isinstance(program, dict):
        raise InvalidInput(f"torch.export archive has a corrupt model program; {REEXPORT}")
    if program.get("guards_code"):
        raise InvalidInput(f"torch.export archive carries guard code, which torch would execute; {REEXPORT}")
    _walk(program, key="", in_metadata=False)


def _walk(value: Any, *, key: str, in_metadata: bool) -> None:
    if isinstance(value, dict):
        if isinstance(value.get("target"), str) and "inputs" in value and "outputs" in value:
            _check_target(value["target"])
        for k, v in value.items():
            if not isinstance(k, str) or (not in_metadata and not _PLAIN.fullmatch(k)):
                raise InvalidInput(f"torch.export archive program has an unexpected field {k!r}; {REEXPORT}")
            _walk(v, key=k, in_metadata=in_metadata or k == "metadata")
    elif isinstance(value, list):
        for v in value:
            _walk(v, key=key, in_metadata=in_metadata)
    elif isinstance(value, str):
        _check_string(value, key=key, in_metadata=in_metadata)


def _check_string(value: str, *, key: str, in_metadata: bool) -> None:
    if key == "expr_str":
        _check_expression(value)
    elif key == "as_operator":
        _check_target(value)
    elif key in ("in_spec", "out_spec"):
        _check_treespec(value)
    elif in_metadata:
        # metadata is copied into comments of generated code: no line breaks outside stack traces,
        # no escapes that would decode to one in the JSON-in-JSON fields
        bad = _CONTROL.search(value) or (key != "stack_trace" and ("\n" in value or "\\" in value))
        if bad:
            raise InvalidInput(f"torch.export archive has control characters in node metadata '{key}'; {REEXPORT}")
    elif key in ("as_string", "as_strings"):
        if _CONTROL.search(value):
            raise InvalidInput(f"torch.export archive has control characters in a string argument; {REEXPORT}")
    elif not _PLAIN.fullmatch(value):
        raise InvalidInput(f"torch.export archive has an invalid name {value[:60]!r} in '{key}'; {REEXPORT}")


def _check_target(target: str) -> None:
    if (_OP_TARGET.fullmatch(target) and "__" not in target) or target in _OPERATOR_TARGETS:
        return
    raise InvalidInput(f"torch.export archive calls '{target[:80]}', which curvscope does not run (only aten operators); {REEXPORT}")


def _check_treespec(value: str) -> None:
    # dict keys in the input spec are pasted into the generated forward()
    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)
        elif isinstance(node, str):
            if node[:1] in ("[", "{", '"'):
                walk(_json(node))
            elif not _PLAIN.fullmatch(node):
                raise InvalidInput(f"torch.export archive has an invalid input name {node[:60]!r}; {REEXPORT}")

    def _json(text: str) -> Any:
        try:
            return json.loads(text)
        except ValueError:
            raise InvalidInput(f"torch.export archive has a corrupt input spec; {REEXPORT}") from None

    walk(_json(value))


def _check_expression(text: str) -> None:
    # sympify() evals its input: accept only arithmetic over known functions and shape symbols
    def refuse(why: str) -> InvalidInput:
        return InvalidInput(f"torch.export archive has a symbolic shape {text[:60]!r} that is not plain arithmetic ({why}); {REEXPORT}")

    if len(text) > _MAX_EXPR_CHARS or _CONTROL.search(text) or "\n" in text:
        raise refuse("too long or control characters")
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError:
        raise refuse("not an expression") from None
    for node in ast.walk(tree):
        if not isinstance(node, _AST_NODES):
            raise refuse(type(node).__name__)
        if isinstance(node, ast.Call):
            if not isinstance(node.func, ast.Name) or node.func.id not in _SYMPY_FUNCTIONS:
                raise refuse("unknown function")
            if node.func.id == "Symbol":
                _check_symbol_call(node, refuse)
            elif node.keywords:
                raise refuse("keyword arguments")
        elif isinstance(node, ast.Name):
            if not (node.id in _SYMPY_FUNCTIONS or node.id in _SYMPY_CONSTANTS or _is_symbol_name(node.id)):
                raise refuse(f"name {node.id!r}")
        elif isinstance(node, ast.Constant):
            if isinstance(node.value, str):
                if not _is_symbol_name(node.value):
                    raise refuse("string")
            elif not isinstance(node.value, (bool, int, float)) or (
                isinstance(node.value, int) and abs(node.value) >= 2**63
            ):
                raise refuse("constant")
        elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.Pow):
            if not (isinstance(node.right, ast.Constant) and type(node.right.value) is int and abs(node.right.value) <= 64):
                raise refuse("power")


def _check_symbol_call(node: ast.Call, refuse) -> None:
    if len(node.args) != 1 or not isinstance(node.args[0], ast.Constant) or not isinstance(node.args[0].value, str):
        raise refuse("Symbol arguments")
    for kw in node.keywords:
        if kw.arg is None or not kw.arg.isidentifier() or not isinstance(kw.value, ast.Constant) or type(kw.value.value) is not bool:
            raise refuse("Symbol assumptions")


def _is_symbol_name(name: str) -> bool:
    # shape symbols look like s0, u3, zuf1; none of them may shadow a builtin or a sympy name
    return bool(_SYMBOL.fullmatch(name)) and not hasattr(builtins, name) and not hasattr(sympy, name)
