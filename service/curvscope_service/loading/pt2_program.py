"""Check the program of a torch.export archive before torch deserialises it.

The program (``models/model.json``) is JSON that torch's deserialiser turns into code:
- symbolic shape strings (``expr_str``) go to ``sympy.sympify``, i.e. Python ``eval``;
- node targets are resolved with ``getattr`` anywhere under ``torch``, ``operator`` or ``math``;
- names, input specs and node metadata are pasted into the Python source generated for the graph;
- ``guards_code`` is ``exec``'d by ``ExportedProgram.module()``.

``check_program`` allow-lists every one of these on the parsed JSON and drops the guard code
(normal in dynamic-shape exports, never needed to evaluate the model: curvscope checks shapes).
The same parsed object is what torch deserialises: nothing re-parses the text.
"""

from __future__ import annotations

import ast
import builtins
import re
from typing import Any

import sympy

from curvscope_service.errors import InvalidInput
from curvscope_service.loading.json_text import parse_json

REEXPORT = "re-export the model with torch.export.save (see docs/formats.md)"

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
_OP_TARGET = re.compile(r"torch\.ops\.(aten|prims)\.([A-Za-z0-9_]+)\.[A-Za-z0-9_]+")
# aten operators whose names are dunders (masks combined in attention code); any other dunder in a
# target could walk torch's attributes (__class__, __dict__...), so only these, and only as an op name
_DUNDER_OPS = {"__and__", "__or__", "__xor__", "__lshift__", "__rshift__"}

# Names a symbolic shape expression may call (sympy and torch.utils._sympy.functions); torch
# writes expressions with sympy.srepr, so arithmetic appears as Add/Mul/Pow and comparisons by class.
_SYMPY_FUNCTIONS = {
    "Add", "Mul", "Pow", "Equality", "Unequality", "StrictLessThan", "LessThan", "StrictGreaterThan", "GreaterThan",
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
# Infix operators sympify evaluates at once on numbers; bit operators and shifts (sympify reads ^
# as a power) could build numbers of any size, and torch never writes them.
_ARITHMETIC = (ast.Add, ast.Sub, ast.Mult, ast.Div, ast.FloorDiv, ast.Mod, ast.Pow)
_MAX_EXPR_CHARS = 2000
_MAX_EXPONENT = 64
_MAX_SPEC_BYTES = 1 << 20


def check_program(program: Any) -> dict[str, Any]:
    """The program with its guard code dropped, or InvalidInput if it would run anything but aten operators."""
    if not isinstance(program, dict):
        raise InvalidInput(f"torch.export archive has a corrupt model program (not a JSON object); {REEXPORT}")
    # guards re-check input shapes with generated Python; curvscope checks shapes itself
    program = {**program, "guards_code": []}
    _walk(program, key="", in_metadata=False)
    return program


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
    match = _OP_TARGET.fullmatch(target)
    if match and ("__" not in target or (match.group(2) in _DUNDER_OPS and target.count("__") == 2)):
        return
    if target in _OPERATOR_TARGETS:
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
        return parse_json(text, what="torch.export archive's input spec", max_bytes=_MAX_SPEC_BYTES)

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
            elif node.func.id == "Pow":
                if len(node.args) != 2:
                    raise refuse("power")
                _check_power(node.args[0], node.args[1], refuse)
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
        elif isinstance(node, ast.BinOp):
            if not isinstance(node.op, _ARITHMETIC):
                raise refuse(f"operator {type(node.op).__name__}")
            if isinstance(node.op, ast.Pow):
                _check_power(node.left, node.right, refuse)


def _check_power(base: ast.AST, exponent: ast.AST, refuse) -> None:
    # a power of a shape symbol stays symbolic; a power of numbers is computed by sympify at once
    has_symbol = any(
        (isinstance(n, ast.Name) and _is_symbol_name(n.id)) or (isinstance(n, ast.Call) and getattr(n.func, "id", "") == "Symbol")
        for n in ast.walk(base)
    )
    if not has_symbol or not (_small_integer(exponent) or _half(exponent)):
        raise refuse("power")


def _small_integer(node: ast.AST) -> bool:
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        node = node.operand
    if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "Integer" and len(node.args) == 1:
        node = node.args[0]
    return isinstance(node, ast.Constant) and type(node.value) is int and abs(node.value) <= _MAX_EXPONENT


def _half(node: ast.AST) -> bool:
    # Rational(1, 2) or Rational(-1, 2): how srepr writes a square root
    return (
        isinstance(node, ast.Call) and getattr(node.func, "id", "") == "Rational" and len(node.args) == 2
        and all(_small_integer(arg) for arg in node.args) and ast.literal_eval(node.args[1]) == 2
    )


def _check_symbol_call(node: ast.Call, refuse) -> None:
    if len(node.args) != 1 or not isinstance(node.args[0], ast.Constant) or not isinstance(node.args[0].value, str):
        raise refuse("Symbol arguments")
    for kw in node.keywords:
        if kw.arg is None or not kw.arg.isidentifier() or not isinstance(kw.value, ast.Constant) or type(kw.value.value) is not bool:
            raise refuse("Symbol assumptions")


def _is_symbol_name(name: str) -> bool:
    # shape symbols look like s0, u3, zuf1; none of them may shadow a builtin or a sympy name
    return bool(_SYMBOL.fullmatch(name)) and not hasattr(builtins, name) and not hasattr(sympy, name)
