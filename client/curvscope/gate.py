"""The checkpoint quality gate: run a policy's analyses, judge every check, summarise.

Verdicts: ``pass``, ``warn``, ``fail``, and ``error`` when the value could not be measured (its
analysis failed on the server or the report lacks it). The gate fails (exit 1) on any fail or
error; warnings pass. One request carries every analysis; when it fails for a reason that may
belong to one analysis alone, each analysis is asked for on its own so the others still count.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from google.protobuf import json_format

from .client import CurvscopeError
from ._proto.curvscope.v1 import curvscope_pb2 as pb
from .policy import Bounds, Check, Policy, format_path, resolve
from .report import Report, json_ready

GATE_SCHEMA = "curvscope.gate/v1"
PASS, WARN, FAIL, ERROR = "pass", "warn", "fail", "error"
SEVERITY = {PASS: 0, WARN: 1, FAIL: 2, ERROR: 2}
# Errors that may come from one analysis alone (a spec it refuses, a size limit, a bug, a solver
# process killed mid-solve): worth asking for the analyses one by one, which also retries the one
# that was aborted. Anything else (unreachable, auth, deadline) stops the gate.
ISOLATABLE = {"INVALID_ARGUMENT", "UNIMPLEMENTED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "OUT_OF_RANGE",
              "INTERNAL", "UNKNOWN", "ABORTED"}

Runner = Callable[[pb.AnalyzeRequest], dict[str, Any]]


class ReportError(ValueError):
    """A report or baseline file that cannot be read as a curvscope report."""


@dataclass
class Verdict:
    check: str
    path: str
    status: str
    value: Any = None
    baseline: Any = None
    change: float | None = None
    relative_change: float | None = None
    reasons: list[str] = field(default_factory=list)
    bounds: str = ""
    analysis: str | None = None
    description: str = ""

    @property
    def detail(self) -> str:
        return "; ".join(self.reasons)


@dataclass
class GateResult:
    verdicts: list[Verdict]
    report: dict[str, Any] | None
    baseline: dict[str, Any] | None = None
    failed_analyses: dict[str, str] = field(default_factory=dict)
    policy: str = ""

    @property
    def status(self) -> str:
        worst = max((SEVERITY[v.status] for v in self.verdicts), default=0)
        return {0: PASS, 1: WARN, 2: FAIL}[worst]

    @property
    def exit_code(self) -> int:
        return 1 if self.status == FAIL else 0

    def counts(self) -> dict[str, int]:
        return {status: sum(v.status == status for v in self.verdicts) for status in (PASS, WARN, FAIL, ERROR)}

    def summary(self) -> str:
        counts = self.counts()
        parts = [f"{counts[FAIL]} failed", f"{counts[ERROR]} not measured", f"{counts[WARN]} warnings",
                 f"{counts[PASS]} passed"]
        return f"curvscope gate: {self.status.upper()} ({', '.join(parts)})"

    def to_dict(self) -> dict[str, Any]:
        """JSON data; non-finite numbers as protobuf's JSON writes them ("NaN", "Infinity")."""
        return json_ready({
            "schema": GATE_SCHEMA, "status": self.status, "exit_code": self.exit_code, "policy": self.policy,
            "counts": self.counts(), "failed_analyses": self.failed_analyses,
            "verdicts": [asdict(verdict) for verdict in self.verdicts],
            "report": self.report,
            "baseline": None if self.baseline is None else {
                "model": self.baseline.get("model"), "data": self.baseline.get("data")},
        })


# -- reports ----------------------------------------------------------------------------------
def normalize_report(data: Any, source: str = "report") -> dict[str, Any]:
    """A report dict (or a gate --json output holding one) checked against the API message:
    unknown keys are refused, and absent scalars of present results are filled in."""
    if isinstance(data, dict) and data.get("schema") == GATE_SCHEMA:
        data = data.get("report")
    if not isinstance(data, dict) or data.get("schema") != "curvscope.report/v1":
        raise ReportError(f"{source} is not a curvscope report (schema curvscope.report/v1) or gate output")
    try:
        return Report.from_dict(data).to_dict()
    except json_format.ParseError as error:
        raise ReportError(f"{source} does not match the report format: {error}") from None


def load_report(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except OSError as error:
        raise ReportError(f"cannot read {path}: {error.strerror}") from None
    except json.JSONDecodeError as error:
        raise ReportError(f"{path} is not JSON: {error}") from None
    return normalize_report(data, str(path))


def run_policy(policy: Policy, runner: Runner) -> tuple[dict[str, Any], dict[str, str]]:
    """(merged report, {analysis: "CODE: message"} of those that failed).

    ``runner`` sends a request (model and data filled in by the caller) and returns the report
    dict, raising ``CurvscopeError`` on failure."""
    names = list(policy.analyses)
    try:
        return runner(policy.analyze_request(names)), {}
    except CurvscopeError as error:
        if error.code not in ISOLATABLE or len(names) < 2:
            raise
    reports, failures, first_error = [], {}, None
    for name in names:
        try:
            reports.append(runner(policy.analyze_request([name])))
        except CurvscopeError as error:
            if error.code not in ISOLATABLE:
                raise
            first_error = first_error or error
            failures[name] = f"{error.code}: {error.message}"
    if not reports:
        raise first_error  # every analysis failed: most likely the model or the data, not one analysis
    return _merge(reports), failures


def _merge(reports: list[dict[str, Any]]) -> dict[str, Any]:
    merged = json.loads(json.dumps(reports[0]))
    for other in reports[1:]:
        merged["results"].update(other.get("results", {}))
        for block, results in other.get("per_layer", {}).items():
            merged.setdefault("per_layer", {}).setdefault(block, {}).update(results)
        merged["seconds"] = merged.get("seconds", 0.0) + other.get("seconds", 0.0)
    return merged


# -- verdicts ---------------------------------------------------------------------------------
def evaluate(policy: Policy, report: dict[str, Any], baseline: dict[str, Any] | None = None,
             failed_analyses: dict[str, str] | None = None) -> GateResult:
    failed_analyses = failed_analyses or {}
    verdicts: list[Verdict] = []
    for check in policy.checks:
        found = list(resolve(report, check.segments))
        if not found:
            verdicts.append(_unmeasured(check, report, failed_analyses))
            continue
        for segments, value in found:
            previous = None
            if baseline is not None:
                previous = next((v for _, v in resolve(baseline, segments)), None)
            verdicts.append(_judge(check, format_path(segments), value, previous, policy.missing_baseline,
                                   baseline is not None, _stderr(check, report, segments)))
    return GateResult(verdicts=verdicts, report=report, baseline=baseline, failed_analyses=failed_analyses,
                      policy=policy.source)


def _unmeasured(check: Check, report: dict[str, Any], failed: dict[str, str]) -> Verdict:
    if check.analysis in failed:
        reason = f"the {check.analysis} analysis failed: {failed[check.analysis]}"
    elif check.analysis and check.analysis not in report.get("results", {}) and check.segments[0] == ("key", "results"):
        reason = f"the report has no {check.analysis} results"
    else:
        reason = "the report has no value at this path"
    return Verdict(check=check.name, path=check.path, status=ERROR, reasons=[reason], bounds=check.describe(),
                   analysis=check.analysis, description=check.description)


def _stderr(check: Check, report: dict[str, Any], segments: tuple) -> tuple[str, Any] | None:
    """(path, value) of the standard error the check names for this value (value _MISSING when
    the report lacks it); None when the check names none."""
    path = check.stderr_path(segments)
    if path is None:
        return None
    return format_path(path), next((value for _, value in resolve(report, path)), _MISSING)


# A standard error the check names but the report lacks (an older server, a trimmed report).
_MISSING = object()


def _judge(check: Check, path: str, value: Any, previous: Any, missing_baseline: str, has_baseline: bool,
           stderr: tuple[str, Any] | None = None) -> Verdict:
    verdict = Verdict(check=check.name, path=path, status=PASS, value=value, baseline=previous,
                      bounds=check.describe(), analysis=check.analysis, description=check.description)
    numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
    band = 0.0
    if stderr is not None and numeric:
        where, error = stderr
        if error is _MISSING or not isinstance(error, (int, float)) or isinstance(error, bool) \
                or not error >= 0 or math.isinf(error):
            # A check that asked for error bars is not judged without them.
            verdict.status = ERROR
            verdict.reasons = [f"the report has no standard error at {where}" if error is _MISSING
                               else f"the standard error at {where} is {error}, not a number >= 0"]
            return verdict
        band = check.sigmas * error
    if numeric and isinstance(previous, (int, float)) and not isinstance(previous, bool):
        verdict.change = value - previous
        if previous != 0:
            verdict.relative_change = verdict.change / abs(previous)
        elif verdict.change != 0:
            verdict.relative_change = math.copysign(math.inf, verdict.change)
        else:
            verdict.relative_change = 0.0
    # Each level's crossed bounds and, with error bars, a bound inside them (borderline); the most
    # severe of these, in this order, decides.
    candidates = []
    for level in ("fail", "warn"):
        reasons = _violations(getattr(check, level), value, verdict, numeric, band)
        if reasons:
            candidates.append((FAIL if level == "fail" else WARN, reasons))
        near = _borderline(getattr(check, level), value, band) if numeric and band > 0 else ""
        if near:
            status = check.borderline if level == "fail" else min(check.borderline, WARN, key=SEVERITY.get)
            candidates.append((status, [f"borderline ({status}): {near}, within {check.sigmas:g} standard errors "
                                        f"(+- {band:.3g})"]))
    if candidates:
        worst = max(SEVERITY[status] for status, _ in candidates)
        verdict.status, verdict.reasons = next((s, r) for s, r in candidates if SEVERITY[s] == worst)
    if check.has_change and verdict.change is None and not (numeric and math.isnan(value)):
        note = ("no baseline given" if not has_baseline else "the baseline has no value here") + \
               ": change bounds not checked"
        if missing_baseline == "fail":
            verdict.status = FAIL
        elif missing_baseline == "warn" and verdict.status == PASS:
            verdict.status = WARN
        verdict.reasons.append(note)
    return verdict


def _borderline(bounds: Bounds, value: float, band: float) -> str:
    """The first of min / max that lies within value +- band; "" when neither does."""
    if bounds.max is not None and value - band <= bounds.max < value + band:
        return f"max {bounds.max:g} lies in [{value - band:.6g}, {value + band:.6g}]"
    if bounds.min is not None and value - band < bounds.min <= value + band:
        return f"min {bounds.min:g} lies in [{value - band:.6g}, {value + band:.6g}]"
    return ""


def _violations(bounds: Bounds, value: Any, verdict: Verdict, numeric: bool, band: float = 0.0) -> list[str]:
    """The bounds the value crosses; with error bars (band = k stderr), only those it crosses by
    more than the band."""
    reasons = []
    if bounds.equals is not None and value != bounds.equals:
        expected = str(bounds.equals).lower() if isinstance(bounds.equals, bool) else bounds.equals
        shown = str(value).lower() if isinstance(value, bool) else value
        reasons.append(f"is {shown}, expected {expected}")
    if not numeric:
        return reasons
    if math.isnan(value) and (bounds.min is not None or bounds.max is not None or bounds.has_change):
        return ["is NaN"]  # NaN compares false to everything: it would pass every bound
    plus = f" + {band:.3g}" if band else ""
    minus = f" - {band:.3g}" if band else ""
    if bounds.min is not None and value + band < bounds.min:
        reasons.append(f"{value:.6g}{plus} < min {bounds.min:g}")
    if bounds.max is not None and value - band > bounds.max:
        reasons.append(f"{value:.6g}{minus} > max {bounds.max:g}")
    change, relative = verdict.change, verdict.relative_change
    if change is not None:
        if bounds.max_increase is not None and relative > bounds.max_increase:
            reasons.append(f"rose {_percent(relative)} > {100 * bounds.max_increase:g}%")
        if bounds.max_decrease is not None and -relative > bounds.max_decrease:
            reasons.append(f"fell {_percent(-relative)} > {100 * bounds.max_decrease:g}%")
        if bounds.max_increase_abs is not None and change > bounds.max_increase_abs:
            reasons.append(f"rose by {change:.6g} > {bounds.max_increase_abs:g}")
        if bounds.max_decrease_abs is not None and -change > bounds.max_decrease_abs:
            reasons.append(f"fell by {-change:.6g} > {bounds.max_decrease_abs:g}")
    return reasons


def _percent(fraction: float) -> str:
    return "an unbounded amount (baseline 0)" if math.isinf(fraction) else f"{100 * fraction:.3g}%"


# -- rendering ------------------------------------------------------------------------------------
def format_value(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def format_change(verdict: Verdict) -> str:
    if verdict.change is None:
        return "-"
    relative = verdict.relative_change
    relative_text = "" if relative is None or math.isinf(relative) else f" ({100 * relative:+.3g}%)"
    return f"{verdict.change:+.4g}{relative_text}"


def verdict_rows(result: GateResult) -> list[list[str]]:
    return [[v.status.upper(), v.check, v.path, format_value(v.value), format_value(v.baseline), format_change(v),
             v.detail or v.bounds] for v in result.verdicts]


HEADER = ["verdict", "check", "path", "value", "baseline", "change", "detail"]


def render_table(result: GateResult) -> str:
    rows = [HEADER] + verdict_rows(result)
    widths = [max(len(row[i]) for row in rows) for i in range(len(HEADER) - 1)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1] for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths) + "  " + "-" * 6)
    for analysis, error in result.failed_analyses.items():
        lines.append(f"analysis {analysis} failed: {error}")
    lines.append(result.summary())
    return "\n".join(line.rstrip() for line in lines)


def github_annotations(result: GateResult) -> list[str]:
    """Workflow commands that GitHub Actions shows on the run's summary page."""
    lines = []
    for v in result.verdicts:
        if v.status == PASS:
            continue
        kind = "warning" if v.status == WARN else "error"
        title = _escape_property(f"curvscope gate: {v.check}")
        message = _escape_data(f"{v.status.upper()} {v.path} = {format_value(v.value)}: {v.detail}")
        lines.append(f"::{kind} title={title}::{message}")
    return lines


def _escape_data(text: str) -> str:
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def _escape_property(text: str) -> str:
    return _escape_data(text).replace(":", "%3A").replace(",", "%2C")
