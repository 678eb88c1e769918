"""Gate verdicts as Markdown: for pull-request comments and GitHub's job summary."""

from __future__ import annotations

from ._sizes import memory_line
from .gate import ERROR, FAIL, PASS, WARN, GateResult, format_change, format_value

ICONS = {PASS: "✅", WARN: "⚠️", FAIL: "❌", ERROR: "⛔"}


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def gate_markdown(result: GateResult) -> str:
    counts = result.counts()
    lines = [f"## {ICONS[result.status]} curvscope gate: {result.status.upper()}", ""]
    report = result.report or {}
    if "model" in report:
        model = report["model"]
        line = f"Model `{model['sha256'][:12]}` ({model['format']}, {model['num_parameters']:,} parameters)"
        if "data" in report:
            line += f" on `{report['data']['sha256'][:12]}` ({report['data']['num_samples']:,} samples)"
        if result.baseline is not None:
            line += f", baseline model `{result.baseline.get('model', {}).get('sha256', '')[:12]}`"
        lines += [line + ".", ""]
        memory = memory_line(report.get("run"))
        if memory:
            lines += [f"Memory: {memory}.", ""]
    lines += [f"{counts[FAIL]} failed, {counts[ERROR]} not measured, {counts[WARN]} warnings, "
              f"{counts[PASS]} passed (policy `{result.policy}`).", ""]
    lines += ["| | check | path | value | baseline | change | detail |", "|---|---|---|---:|---:|---:|---|"]
    for v in result.verdicts:
        lines.append("| " + " | ".join(_cell(cell) for cell in (
            ICONS[v.status], v.check, f"`{v.path}`", format_value(v.value), format_value(v.baseline),
            format_change(v), v.detail or v.bounds)) + " |")
    if result.failed_analyses:
        lines += ["", "Failed analyses:", ""]
        lines += [f"- `{name}`: {_cell(error)}" for name, error in result.failed_analyses.items()]
    return "\n".join(lines) + "\n"
