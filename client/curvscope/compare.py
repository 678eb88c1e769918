"""Two reports side by side: every scalar value both (or either) hold, with the change."""

from __future__ import annotations

import math
from typing import Any, Iterator

from .gate import format_value
from .policy import format_path

# Curves and quadrature rules: plotted, not tabulated.
SKIPPED = {"grid", "density", "density_stderr", "nodes", "weights"}
MAX_LIST = 10


def flatten(data: Any, prefix: tuple = ()) -> Iterator[tuple[str, Any]]:
    """(dotted path, scalar) for every value of a report; long curves are left out."""
    if isinstance(data, dict):
        for key, value in data.items():
            if key not in SKIPPED:
                yield from flatten(value, prefix + (("key", key),))
    elif isinstance(data, list):
        for index, item in enumerate(data[:MAX_LIST]):
            yield from flatten(item, prefix + (("index", index),))
    else:
        yield format_path(prefix), data


def compare_rows(a: dict[str, Any], b: dict[str, Any]) -> list[list[str]]:
    left, right = dict(flatten(a)), dict(flatten(b))
    paths = list(left) + [path for path in right if path not in left]
    rows = []
    for path in paths:
        va, vb = left.get(path), right.get(path)
        rows.append([path, format_value(va), format_value(vb), _change(va, vb)])
    return rows


def _change(a: Any, b: Any) -> str:
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (a, b))
    if not numbers:
        return "" if a == b else "changed"
    delta = b - a
    if delta == 0:
        return "="
    relative = f" ({100 * delta / abs(a):+.3g}%)" if a != 0 and math.isfinite(delta / a) else ""
    return f"{delta:+.4g}{relative}"


def render_compare(a: dict[str, Any], b: dict[str, Any], names: tuple[str, str] = ("A", "B"),
                   changed_only: bool = False) -> str:
    rows = [row for row in compare_rows(a, b) if not changed_only or row[3] not in ("", "=")]
    header = ["value", names[0], names[1], "change"]
    table = [header] + rows
    widths = [max(len(row[i]) for row in table) for i in range(4)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in table]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def compare_markdown(a: dict[str, Any], b: dict[str, Any], names: tuple[str, str] = ("A", "B")) -> str:
    lines = [f"| value | {names[0]} | {names[1]} | change |", "|---|---:|---:|---:|"]
    lines += [f"| `{path}` | {va} | {vb} | {change} |" for path, va, vb, change in compare_rows(a, b)]
    return "\n".join(lines) + "\n"
