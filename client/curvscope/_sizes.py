"""Byte counts as people write them, for --memory-budget (CLI and server) and its environment
variable: 8000000000, 8GB, 8 GiB, 512M, 1.5g."""

from __future__ import annotations

import re

UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
         "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}
PATTERN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?)?b?\s*$", re.IGNORECASE)


def parse_bytes(text: str) -> int:
    """A byte count from "8GB", "8 GiB", "512M" or a plain integer; 0 = no ceiling of one's own.
    Raises ValueError with the accepted forms."""
    match = PATTERN.match(str(text))
    if not match:
        raise ValueError(f"{text!r} is not a byte count; write e.g. 8000000000, 8GB, 8GiB or 512MiB")
    number, unit = match.groups()
    return int(float(number) * UNITS[(unit or "").lower()])


def format_bytes(count: float) -> str:
    """Bytes for a person: "9.1 GB", "420 MB"."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= size:
            return f"{count / size:.3g} {unit}"
    return f"{int(count)} B"


def memory_line(run: dict | None) -> str | None:
    """The report's run section in one line: planned and measured peak, the ceiling and its
    source, the plan's choices; None without one (an older server)."""
    if not run:
        return None
    def number(key: str) -> float:
        try:
            return float(run.get(key) or 0)
        except (TypeError, ValueError):
            return 0.0
    line = (f"peak {format_bytes(number('measured_peak_bytes'))} measured, {format_bytes(number('planned_peak_bytes'))} "
            f"planned (ceiling {format_bytes(number('memory_budget_bytes'))}, {run.get('memory_budget_source') or '-'})")
    # The whole model's choices; the per-block ones are in the JSON.
    choices = {key: value for key, value in (run.get("choices") or {}).items() if "[" not in key}
    if choices:
        line += "; " + ", ".join(f"{key} {value}" for key, value in choices.items())
    return line
