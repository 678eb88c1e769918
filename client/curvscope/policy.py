"""Gate policies: which analyses to run and which report values to check, read from TOML.

A check names a report value by a dotted path (``results.hessian_eigen.largest[0]``,
``per_layer.*.sharpness.value``, ``results.weight_spectra.layers[*].alpha``) and bounds it at two
levels, ``fail`` and ``warn``: absolute bounds (``min``, ``max``, ``equals``) and bounds on the
change against a baseline report (``max_increase`` / ``max_decrease`` as fractions of the
baseline, ``max_increase_abs`` / ``max_decrease_abs`` in the value's units). A check of an
estimated value may name its standard error (``stderr = "PATH"``, ``sigmas = k``): ``min`` and
``max`` are then judged on value +- k stderr, a bound inside that band being ``borderline``.
Paths are checked against the report's message types when the policy is read, so a typo fails
before any work.
"""

from __future__ import annotations

import math
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor

from ._proto.curvscope.v1 import curvscope_pb2 as pb
from ._sizes import parse_bytes
from .client import TASKS

ABSOLUTE_BOUNDS = ("min", "max")
CHANGE_BOUNDS = ("max_increase", "max_decrease", "max_increase_abs", "max_decrease_abs")
LEVELS = ("fail", "warn")
MISSING_BASELINE = ("pass", "warn", "fail")
BORDERLINE = ("pass", "warn", "fail")
DEFAULT_SIGMAS = 2.0
REQUEST_KEYS = {"loss", "task", "curvature", "precision", "seed", "per_layer", "micro_batch_size", "max_samples", "timeout",
                "memory_budget"}
CURVATURES = {"hessian": pb.CURVATURE_HESSIAN, "ggn": pb.CURVATURE_GGN, "fisher": pb.CURVATURE_FISHER,
              "empirical_fisher": pb.CURVATURE_EMPIRICAL_FISHER}
PRECISIONS = {"float32": pb.PRECISION_FLOAT32, "float64": pb.PRECISION_FLOAT64}
_NUMERIC = {FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_INT32,
            FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_UINT64,
            FieldDescriptor.TYPE_SINT32, FieldDescriptor.TYPE_SINT64, FieldDescriptor.TYPE_FIXED32,
            FieldDescriptor.TYPE_FIXED64, FieldDescriptor.TYPE_SFIXED32, FieldDescriptor.TYPE_SFIXED64}


class PolicyError(ValueError):
    """The policy cannot be used as written; the message says where and how to fix it."""


# -- paths ------------------------------------------------------------------------------------
# A segment is ("key", name), ("any_key",), ("index", i) or ("any_index",).
Segment = tuple
_KEY = re.compile(r'\*|"((?:[^"\\]|\\.)*)"|[A-Za-z0-9_][A-Za-z0-9_\-]*')
_INDEX = re.compile(r"\[(\*|-?\d+)\]")
_PLAIN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_\-]*")


def parse_path(text: str) -> tuple[Segment, ...]:
    """``a.b[0]."x.y".*[*]`` -> segments; quote keys that hold dots (layer names)."""
    segments: list[Segment] = []
    position = 0
    while True:
        match = _KEY.match(text, position)
        if not match:
            raise PolicyError(f"path {text!r}: expected a field name, '*' or a quoted key at character {position + 1}")
        if match.group(0) == "*":
            segments.append(("any_key",))
        elif match.group(0).startswith('"'):
            segments.append(("key", re.sub(r"\\(.)", r"\1", match.group(1))))
        else:
            segments.append(("key", match.group(0)))
        position = match.end()
        while index := _INDEX.match(text, position):
            segments.append(("any_index",) if index.group(1) == "*" else ("index", int(index.group(1))))
            position = index.end()
        if position == len(text):
            return tuple(segments)
        if text[position] != ".":
            raise PolicyError(f"path {text!r}: unexpected {text[position]!r} at character {position + 1}")
        position += 1


def format_path(segments: tuple[Segment, ...]) -> str:
    out = ""
    for segment in segments:
        if segment[0] == "key":
            name = segment[1]
            name = name if _PLAIN.fullmatch(name) else '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'
            out += ("." if out else "") + name
        elif segment[0] == "any_key":
            out += ".*" if out else "*"
        elif segment[0] == "index":
            out += f"[{segment[1]}]"
        else:
            out += "[*]"
    return out


def resolve(data: Any, segments: tuple[Segment, ...], prefix: tuple[Segment, ...] = ()) -> Iterator[tuple[tuple[Segment, ...], Any]]:
    """Every (concrete path, value) the path reaches in JSON data; wildcards expand, in order."""
    if not segments:
        yield prefix, data
        return
    head, rest = segments[0], segments[1:]
    if head[0] == "key" and isinstance(data, dict) and head[1] in data:
        yield from resolve(data[head[1]], rest, prefix + (head,))
    elif head[0] == "any_key" and isinstance(data, dict):
        for key in data:
            yield from resolve(data[key], rest, prefix + (("key", key),))
    elif head[0] == "index" and isinstance(data, list) and -len(data) <= head[1] < len(data):
        index = head[1] % len(data)
        yield from resolve(data[index], rest, prefix + (("index", index),))
    elif head[0] == "any_index" and isinstance(data, list):
        for index, item in enumerate(data):
            yield from resolve(item, rest, prefix + (("index", index),))


def _leaf_field(segments: tuple[Segment, ...], text: str) -> FieldDescriptor:
    """Walk the report's message types along the path; the scalar field it ends at."""
    state: tuple[str, Any] = ("message", pb.Report.DESCRIPTOR)
    where = "the report"
    for segment in segments:
        kind, target = state
        if kind == "message":
            descriptor: Descriptor = target
            if segment[0] != "key":
                raise PolicyError(f"path {text!r}: {where} is a message, name one of its fields: "
                                  f"{', '.join(f.name for f in descriptor.fields)}")
            found = descriptor.fields_by_name.get(segment[1])
            if found is None:
                raise PolicyError(f"path {text!r}: {where} has no field {segment[1]!r}; its fields are "
                                  f"{', '.join(f.name for f in descriptor.fields)}")
            state, where = _state_of(found), segment[1]
        elif kind == "map":
            if segment[0] not in ("key", "any_key"):
                raise PolicyError(f"path {text!r}: {where} is keyed by name; use .NAME, .\"NAME\" or .*")
            state, where = _single(target), f"{where} entry"
        elif kind == "repeated":
            if segment[0] not in ("index", "any_index"):
                raise PolicyError(f"path {text!r}: {where} is a list; pick an element like {where}[0] or {where}[*]")
            state, where = _single(target), f"{where} element"
        else:
            raise PolicyError(f"path {text!r}: {where} is a single value and has no part {format_path((segment,))!r}")
    kind, target = state
    if kind == "repeated":
        raise PolicyError(f"path {text!r}: {where} is a list; pick an element like {where}[0] or {where}[*]")
    if kind != "scalar":
        raise PolicyError(f"path {text!r}: {where} is not a single value; name one of its fields")
    return target


def _state_of(found: FieldDescriptor) -> tuple[str, Any]:
    if found.message_type is not None and found.message_type.GetOptions().map_entry:
        return ("map", found.message_type.fields_by_name["value"])
    if found.is_repeated:
        return ("repeated", found)
    return _single(found)


def _single(found: FieldDescriptor) -> tuple[str, Any]:
    return ("message", found.message_type) if found.type == FieldDescriptor.TYPE_MESSAGE else ("scalar", found)


# -- checks -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Bounds:
    """One level's bounds; ``None`` = not set."""

    min: float | None = None
    max: float | None = None
    equals: bool | str | None = None
    max_increase: float | None = None
    max_decrease: float | None = None
    max_increase_abs: float | None = None
    max_decrease_abs: float | None = None

    @property
    def has_change(self) -> bool:
        return any(getattr(self, name) is not None for name in CHANGE_BOUNDS)

    def describe(self) -> str:
        parts = []
        if self.min is not None:
            parts.append(f">= {self.min:g}")
        if self.max is not None:
            parts.append(f"<= {self.max:g}")
        if self.equals is not None:
            parts.append(f"== {str(self.equals).lower() if isinstance(self.equals, bool) else self.equals}")
        if self.max_increase is not None:
            parts.append(f"up <= {100 * self.max_increase:g}%")
        if self.max_decrease is not None:
            parts.append(f"down <= {100 * self.max_decrease:g}%")
        if self.max_increase_abs is not None:
            parts.append(f"up <= {self.max_increase_abs:g}")
        if self.max_decrease_abs is not None:
            parts.append(f"down <= {self.max_decrease_abs:g}")
        return ", ".join(parts)


@dataclass(frozen=True)
class Check:
    name: str
    path: str
    segments: tuple[Segment, ...]
    fail: Bounds
    warn: Bounds
    description: str = ""
    # The value's standard error (a path; wildcards take the value's own keys and indices), how
    # many of them make the band around the value, and the verdict of a bound inside the band.
    stderr: tuple[Segment, ...] | None = None
    sigmas: float = DEFAULT_SIGMAS
    borderline: str = "warn"

    @property
    def analysis(self) -> str | None:
        """The analysis (report key) whose result this check reads; None for report metadata."""
        keys = self.segments
        if keys[0] == ("key", "results") and len(keys) > 1:
            return keys[1][1]
        if keys[0] == ("key", "per_layer") and len(keys) > 2:
            return keys[2][1]
        return None

    @property
    def has_change(self) -> bool:
        return self.fail.has_change or self.warn.has_change

    def describe(self) -> str:
        text = "; ".join(f"{level} {text}" for level in LEVELS if (text := getattr(self, level).describe()))
        if self.stderr is not None:
            text += f" (on value +- {self.sigmas:g} x {format_path(self.stderr)})"
        return text

    def stderr_path(self, concrete: tuple[Segment, ...]) -> tuple[Segment, ...] | None:
        """The standard error's path for one expansion of the value's path: its wildcards take,
        in order, the keys and indices the value's wildcards took."""
        if self.stderr is None:
            return None
        taken = iter(c for pattern, c in zip(self.segments, concrete) if pattern[0] in ("any_key", "any_index"))
        return tuple(next(taken, segment) if segment[0] in ("any_key", "any_index") else segment
                     for segment in self.stderr)


@dataclass
class Policy:
    checks: list[Check]
    analyses: dict[str, dict[str, Any]] = field(default_factory=dict)
    request: dict[str, Any] = field(default_factory=dict)
    missing_baseline: str = "warn"
    source: str = "policy"

    def analysis_spec(self, name: str) -> pb.AnalysisSpec:
        return json_format.ParseDict({name: self.analyses[name]}, pb.AnalysisSpec())

    def analyze_request(self, names: list[str] | None = None) -> pb.AnalyzeRequest:
        """The request (without model and data) for these analyses (default: all of them)."""
        options = self.request
        return pb.AnalyzeRequest(
            loss=options.get("loss", "cross_entropy"),
            analyses=[self.analysis_spec(name) for name in (names or list(self.analyses))],
            options=pb.AnalysisOptions(
                curvature=CURVATURES[options.get("curvature", "hessian")],
                precision=PRECISIONS[options.get("precision", "float32")],
                seed=options.get("seed", 0), per_layer=options.get("per_layer", False),
                micro_batch_size=options.get("micro_batch_size", 0), max_samples=options.get("max_samples", 0),
                task=options.get("task", ""), memory_budget_bytes=parse_bytes(options.get("memory_budget", 0))),
        )


def load_policy(path: str | Path) -> Policy:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise PolicyError(f"cannot read the policy {path}: {error.strerror}") from None
    return parse_policy(text, source=str(path))


def parse_policy(text: str, source: str = "policy") -> Policy:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise PolicyError(f"{source} is not valid TOML: {error}") from None
    _known(data, {"request", "analyses", "gate", "checks"}, source)
    request = _table(data, "request", source)
    _known(request, REQUEST_KEYS, f"{source} [request]")
    _choice(request.get("curvature", "hessian"), CURVATURES, f"{source} [request] curvature")
    _choice(request.get("precision", "float32"), PRECISIONS, f"{source} [request] precision")
    if "task" in request:
        _choice(request["task"], TASKS, f"{source} [request] task")
    for key in ("seed", "micro_batch_size", "max_samples"):
        if not isinstance(request.get(key, 0), int) or request.get(key, 0) < 0:
            raise PolicyError(f"{source} [request] {key} must be a whole number >= 0")
    if not isinstance(request.get("per_layer", False), bool):
        raise PolicyError(f"{source} [request] per_layer must be true or false")
    timeout = request.get("timeout")
    if timeout is not None and (not _is_number(timeout) or timeout <= 0):
        raise PolicyError(f"{source} [request] timeout must be a number of seconds > 0")
    budget = request.get("memory_budget", 0)
    try:
        if isinstance(budget, bool) or not isinstance(budget, (int, str)):
            raise ValueError(f"{budget!r} is not a byte count; write e.g. 8000000000 or \"8GB\"")
        parse_bytes(budget)
    except ValueError as error:
        raise PolicyError(f"{source} [request] memory_budget: {error}") from None

    analyses = _table(data, "analyses", source)
    for name, spec in analyses.items():
        if not isinstance(spec, dict):
            raise PolicyError(f"{source} [analyses.{name}] must be a table (empty for the defaults)")
        try:
            json_format.ParseDict({name: spec}, pb.AnalysisSpec())
        except json_format.ParseError as error:
            raise PolicyError(f"{source} [analyses.{name}]: {error}") from None

    gate = _table(data, "gate", source)
    _known(gate, {"missing_baseline"}, f"{source} [gate]")
    missing_baseline = _choice(gate.get("missing_baseline", "warn"), MISSING_BASELINE, f"{source} [gate] missing_baseline")

    raw_checks = data.get("checks", [])
    if not isinstance(raw_checks, list) or not raw_checks:
        raise PolicyError(f"{source} has no checks: add at least one [[checks]] table with a path and bounds")
    checks = [_check(raw, number, source) for number, raw in enumerate(raw_checks, 1)]
    names = [check.name for check in checks]
    if len(set(names)) != len(names):
        raise PolicyError(f"{source}: check names must be unique ({', '.join(sorted({n for n in names if names.count(n) > 1}))} repeat)")
    for check in checks:
        if check.segments[0] == ("key", "per_layer") and not request.get("per_layer", False):
            # With --report the values come from the file, but a server run would never produce them.
            raise PolicyError(f"{source} check {check.name!r} reads per_layer values: set per_layer = true in [request]")
        if check.analysis and check.analysis not in analyses:
            raise PolicyError(f"{source} check {check.name!r} reads {check.analysis} results: add an "
                              f"[analyses.{check.analysis}] table so the gate asks for them")
    return Policy(checks=checks, analyses=analyses, request=request, missing_baseline=missing_baseline, source=source)


def _check(raw: Any, number: int, source: str) -> Check:
    where = f"{source} check #{number}"
    if not isinstance(raw, dict):
        raise PolicyError(f"{where} must be a table")
    _known(raw, {"name", "path", "description", "stderr", "sigmas", "borderline", *LEVELS}, where)
    if not isinstance(raw.get("path"), str):
        raise PolicyError(f"{where} needs a path, e.g. path = \"results.hessian_eigen.largest[0]\"")
    segments = parse_path(raw["path"])
    leaf = _leaf_field(segments, raw["path"])
    name = raw.get("name", raw["path"])
    where = f"{source} check {name!r}"
    levels = {}
    for level in LEVELS:
        table = raw.get(level, {})
        if not isinstance(table, dict):
            raise PolicyError(f"{where}: {level} must be a table of bounds, e.g. {level} = {{ max = 10.0 }}")
        _known(table, {*ABSOLUTE_BOUNDS, "equals", *CHANGE_BOUNDS}, f"{where} {level}")
        levels[level] = _bounds(table, leaf, f"{where} {level}")
    if not any(raw.get(level) for level in LEVELS):
        raise PolicyError(f"{where} has no bounds: give it fail = {{ ... }} and/or warn = {{ ... }}")
    stderr, sigmas, borderline = _uncertainty(raw, segments, leaf, where)
    return Check(name=str(name), path=raw["path"], segments=segments, fail=levels["fail"], warn=levels["warn"],
                 description=str(raw.get("description", "")), stderr=stderr, sigmas=sigmas, borderline=borderline)


def _uncertainty(raw: dict[str, Any], segments: tuple[Segment, ...], leaf: FieldDescriptor,
                 where: str) -> tuple[tuple[Segment, ...] | None, float, str]:
    """A check's ``stderr`` path, ``sigmas`` and ``borderline`` verdict, checked."""
    if "stderr" not in raw:
        if "sigmas" in raw or "borderline" in raw:
            raise PolicyError(f"{where}: sigmas and borderline need stderr = \"PATH\", the path of the value's "
                              f"standard error (e.g. results.hessian_density.negative_mass_stderr)")
        return None, DEFAULT_SIGMAS, "warn"
    if leaf.type not in _NUMERIC:
        raise PolicyError(f"{where}: stderr applies to a number, and {leaf.name} is not one")
    if not isinstance(raw["stderr"], str):
        raise PolicyError(f"{where}: stderr must be the path of the value's standard error, e.g. "
                          f"\"results.hessian_density.negative_mass_stderr\"")
    stderr = parse_path(raw["stderr"])
    if _leaf_field(stderr, raw["stderr"]).type not in _NUMERIC:
        raise PolicyError(f"{where}: stderr {raw['stderr']!r} is not a number")
    wild = lambda path: sum(s[0] in ("any_key", "any_index") for s in path)  # noqa: E731
    if wild(stderr) > wild(segments):
        raise PolicyError(f"{where}: stderr {raw['stderr']!r} has more wildcards than the path; each of its "
                          f"wildcards takes the key or index of one of the path's")
    sigmas = raw.get("sigmas", DEFAULT_SIGMAS)
    if not _is_number(sigmas) or not (0 <= sigmas < math.inf):
        raise PolicyError(f"{where}: sigmas must be a number of standard errors >= 0, not {sigmas!r}")
    borderline = _choice(raw.get("borderline", "warn"), BORDERLINE, f"{where} borderline")
    return stderr, float(sigmas), borderline


def _bounds(table: dict[str, Any], leaf: FieldDescriptor, where: str) -> Bounds:
    numeric = leaf.type in _NUMERIC
    for key, value in table.items():
        if key == "equals":
            if numeric:
                raise PolicyError(f"{where}: {leaf.name} is a number; bound it with min/max, not equals")
            expected = bool if leaf.type == FieldDescriptor.TYPE_BOOL else str
            if not isinstance(value, expected):
                raise PolicyError(f"{where}: equals for {leaf.name} must be a {'boolean' if expected is bool else 'string'}")
        else:
            if not numeric:
                raise PolicyError(f"{where}: {leaf.name} is not a number; only equals applies to it")
            if not _is_number(value) or not math.isfinite(value):
                raise PolicyError(f"{where}: {key} must be a finite number, not {value!r}")
            if key in CHANGE_BOUNDS and value < 0:
                raise PolicyError(f"{where}: {key} is a size of change and must be >= 0")
    if table.get("min") is not None and table.get("max") is not None and table["min"] > table["max"]:
        raise PolicyError(f"{where}: min {table['min']} is above max {table['max']}")
    return Bounds(**{key: (float(value) if _is_number(value) else value) for key, value in table.items()})


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _table(data: dict[str, Any], key: str, source: str) -> dict[str, Any]:
    value = data.get(key, {})
    if not isinstance(value, dict):
        raise PolicyError(f"{source}: {key} must be a table ([{key}])")
    return value


def _known(table: dict[str, Any], allowed: set[str] | tuple, where: str) -> None:
    unknown = sorted(set(table) - set(allowed))
    if unknown:
        raise PolicyError(f"{where}: unknown key{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; "
                          f"allowed: {', '.join(sorted(allowed))}")


def _choice(value: Any, allowed: Any, where: str) -> str:
    if value not in allowed:
        raise PolicyError(f"{where} must be one of {', '.join(allowed)}, not {value!r}")
    return value


STARTER_POLICY = '''\
# curvscope gate policy: what to measure on a checkpoint and when to fail the pipeline.
#
#   curvscope gate --policy curvscope.toml model.pt2 --data batch.safetensors \\
#       --baseline main-gate.json --junit gate.xml --markdown gate.md --json gate.json
#
# Exit codes: 0 every check passed (warnings allowed), 1 a check failed or a value could not be
# measured, 2 usage or input error (this file, a missing model), 3 the server could not be
# reached or failed. The --json output of a run on your main branch is a good --baseline.

# How to analyse. loss: cross_entropy or mse; curvature: hessian, ggn, fisher or empirical_fisher.
[request]
loss = "cross_entropy"
curvature = "hessian"
seed = 0              # same seed, same numbers: keep it fixed so changes mean something
per_layer = false     # true adds per_layer.<block>.* values (paths like per_layer.*.hessian_eigen.largest[0])
# max_samples = 512   # analyse at most this many samples of the batch (0 = all)
# task = "causal-lm"  # a language model: labels shifted by one (default: inferred from the shapes)
# timeout = 600       # seconds before the server gives up
# memory_budget = "8GB"  # plan the analyses within this much memory (lowers the server's ceiling)

# Which analyses to run: one table per report key, holding that analysis's spec fields
# (see the Results and *Spec messages of the curvscope.v1 API). An empty table = the defaults.
[analyses.hessian_eigen]
top_k = 3             # the 3 largest eigenvalues; largest[0] is the sharpness a = lambda_max
bottom_k = 1          # the smallest eigenvalue: clearly negative means a saddle, not a minimum

# [analyses.non_uniformity]  # sharpness a and non-uniformity s with the SGD stability verdict
# learning_rate = 0.1
# batch_size = 32
# [analyses.lipschitz]       # the interval [lower, upper] of the network's Lipschitz constant
# [analyses.hessian_trace]   # average curvature

# What happens to change bounds when the baseline lacks the value (or no --baseline was given):
# "pass" ignores them, "warn" (default) warns, "fail" fails the gate.
[gate]
missing_baseline = "warn"

# Checks. path: a dotted path into the report ([0] an element, [*] or .* every one of them).
# fail = {...} and warn = {...} take: min, max (absolute), equals (true/false or text),
# max_increase, max_decrease (fractions of the baseline: 0.2 = 20 %),
# max_increase_abs, max_decrease_abs (in the value's own units).
[[checks]]
name = "sharpness"
path = "results.hessian_eigen.largest[0]"
description = "Sharper minima generalise worse and need smaller learning rates (GD is stable iff a <= 2/lr)."
fail = { max = 1000.0, max_increase = 0.5 }
warn = { max_increase = 0.2 }

[[checks]]
name = "most negative eigenvalue"
path = "results.hessian_eigen.smallest[0]"
description = "A large negative eigenvalue means the checkpoint sits on a saddle, not at a minimum."
warn = { min = -1.0 }

[[checks]]
name = "eigenvalues converged"
path = "results.hessian_eigen.converged"
warn = { equals = true }

# [[checks]]
# name = "SGD stable"
# path = "results.non_uniformity.sgd_stable"
# fail = { equals = true }
# [[checks]]
# name = "Lipschitz upper bound"
# path = "results.lipschitz.upper"
# fail = { max_increase = 0.25 }
'''
