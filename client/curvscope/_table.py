"""Human-readable output of the CLI: a report table and a progress line."""

from __future__ import annotations

import sys
import threading
import time
from typing import Any, Callable, TextIO

from ._proto.curvscope.v1 import curvscope_pb2 as pb
from ._sizes import memory_line


def _fmt(value: Any, spec: str = ".6g") -> str:
    """A number in ``spec``; "-" for a missing one, and anything else (a "NaN" read from JSON) as it is."""
    if value is None:
        return "-"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return format(value, spec)
    return str(value)


def _numbers(values: list[float] | None) -> str:
    return "  ".join(_fmt(value, " .6g") for value in values or []) or "-"


def _residuals(values: list[float] | None, floor: Any) -> str:
    """Ritz residuals; those at the solver's rounding floor (``residual_floor``) are a bound, not
    a measurement, and read "<= floor, at rounding" (once, when every one is there)."""
    if not values or not isinstance(floor, (int, float)) or not floor > 0:
        return _numbers(values)
    # The floor and the residuals it clipped are the same float; a hair above is rounding too.
    at_floor = [isinstance(value, (int, float)) and value <= floor * (1 + 1e-9) for value in values]
    bound = f"<= {floor:.1e}"
    if all(at_floor):
        return f"{bound}, at rounding"
    shown = "  ".join(bound if low else _fmt(value, " .6g") for value, low in zip(values, at_floor))
    return shown + (" (<= : at rounding)" if any(at_floor) else "")


def render_report(report: dict[str, Any]) -> str:
    """The report as the terminal table. Any section or value may be missing (an older server,
    a hand-written or trimmed report): it is shown as "-" or left out, never a KeyError."""
    model = report.get("model") or {}
    lines = [f"model     {str(model.get('sha256', '-'))[:12]}  {model.get('format', '-')}, "
             f"{_fmt(model.get('num_parameters'), ',')} parameters"]
    data = report.get("data")
    if data:
        lines.append(f"data      {str(data.get('sha256', '-'))[:12]}  {_fmt(data.get('num_samples'), ',')} samples")
    loss = report.get("loss")
    if loss:
        lines.append(f"loss      {loss.get('name', '-')} = {_fmt(loss.get('value'))}")
    lines += [
        f"run       {report.get('curvature') or 'hessian'}, {report.get('precision') or 'float32'}, "
        f"seed {report.get('seed', 0)}, {report.get('device') or '-'}, {_fmt(report.get('seconds'), '.2f')} s",
    ]
    memory = memory_line(report.get("run"))
    if memory:
        lines.append(f"memory    {memory}")
    lines += _results(report.get("results") or {}, indent="")
    per_layer = report.get("per_layer") or {}
    if per_layer:
        lines.append("")
        lines.append("per layer")
        for block, results in per_layer.items():
            lines.append(f"  [{block}]")
            lines += _results(results or {}, indent="    ")
    return "\n".join(lines)


def _results(results: dict[str, Any], indent: str) -> list[str]:
    lines = []
    eigen = results.get("hessian_eigen")
    if eigen:
        state = "converged" if eigen.get("converged") else "NOT converged (raise --max-hvps or the tolerance)"
        lines.append(f"{indent}Hessian eigenvalues: {_fmt(eigen.get('hvps'), '')} HVPs, "
                     f"{_fmt(eigen.get('seconds'), '.2f')} s, tolerance {_fmt(eigen.get('tolerance', 0), '.0e')}, {state}")
        residuals = eigen.get("residuals") or {}
        floors = eigen.get("residual_floor") or {}
        for end in ("largest", "smallest"):
            if eigen.get(end):
                lines.append(f"{indent}  {end:<9} {_numbers(eigen[end])}")
                lines.append(f"{indent}  residual  {_residuals(residuals.get(end), floors.get(end))}")
    lines += _spectrum(results, indent)
    lines += _stability(results, indent)
    lines += _lipschitz(results, indent)
    for name, value in results.items():
        if name not in ("hessian_eigen", "hessian_trace", "hessian_density", "sharpness", "non_uniformity",
                        "lipschitz", "weight_spectra"):
            lines.append(f"{indent}{name}: {value}")
    return lines


def _lipschitz(results: dict[str, Any], indent: str) -> list[str]:
    """The Lipschitz interval with every bound (or why it is missing), and the weight spectra."""
    lines = []
    lip = results.get("lipschitz")
    if lip:
        lines.append(f"{indent}Lipschitz constant in [{_fmt(lip.get('lower', 0.0))}, {_fmt(lip.get('upper', 0.0))}]"
                     f"  (upper from {lip.get('method') or 'none'}, relative gap {_fmt(lip.get('relative_gap', 0.0), '.3g')})")
        for detail in lip.get("details", []):
            value = _fmt(detail["value"]) if "value" in detail else detail.get("status", "")
            extra = ", ".join(x for x in (detail.get("solver", ""), f"{_fmt(detail.get('seconds', 0.0), '.2f')} s", detail.get("note", "")) if x)
            lines.append(f"{indent}  {detail.get('method', ''):<14} {value}  ({extra})")
        if lip.get("note"):
            lines.append(f"{indent}  {lip['note']}")
    spectra = results.get("weight_spectra")
    if spectra:
        lines.append(f"{indent}weight spectra: layer, spectral norm, Frobenius norm, stable rank, alpha")
        for layer in spectra.get("layers", []):
            lines.append(f"{indent}  {layer.get('name', ''):<12} {_fmt(layer.get('spectral_norm', 0.0))}  "
                         f"{_fmt(layer.get('frobenius_norm', 0.0))}  {_fmt(layer.get('stable_rank', 0.0), '.4g')}  "
                         f"{_fmt(layer.get('alpha'), '.3g')}")
    return lines


def _spectrum(results: dict[str, Any], indent: str) -> list[str]:
    """Trace (with its standard error, and tr(H^2) when asked) and the SLQ density in brief."""
    lines = []
    trace = results.get("hessian_trace")
    if trace:
        lines.append(f"{indent}trace = {_fmt(trace.get('estimate', 0.0))} +- {_fmt(trace.get('stderr', 0.0), '.2g')}  "
                     f"({trace.get('method', '')}, {trace.get('hvps', 0)} HVPs, {_fmt(trace.get('seconds', 0.0), '.2f')} s)")
        if "frobenius_squared" in trace:
            lines.append(f"{indent}  tr(H^2) = {_fmt(trace['frobenius_squared'])} +- "
                         f"{_fmt(trace.get('frobenius_squared_stderr', 0.0), '.2g')}")
    density = results.get("hessian_density")
    if density:
        nodes = [n for n in density.get("nodes") or [] if isinstance(n, (int, float))] or [0.0]
        lines.append(f"{indent}spectral density: {density.get('hvps', 0)} HVPs, {_fmt(density.get('seconds', 0.0), '.2f')} s, "
                     f"nodes in [{min(nodes):.4g}, {max(nodes):.4g}]")
        tolerance = density.get("negative_tolerance")
        where = f" (|lambda| <= {_fmt(tolerance, '.0e')} max|lambda| is zero)" if tolerance is not None else ""
        lines.append(f"{indent}  negative mass {_percent(density.get('negative_mass'), density.get('negative_mass_stderr'))}"
                     + (f", near zero {_percent(density.get('near_zero_mass'), density.get('near_zero_mass_stderr'))}"
                        if "near_zero_mass" in density else "") + where)
    return lines


def _percent(share: Any, stderr: Any) -> str:
    """A share as a percentage, with its standard error when there is one."""
    if not isinstance(share, (int, float)):
        return f"{_fmt(share)} %"
    spread = f" +- {100 * stderr:.2f}" if isinstance(stderr, (int, float)) else ""
    return f"{100 * share:.2f}{spread} %"


def _verdict(stable: Any) -> str:
    return "stable" if stable else "UNSTABLE"


def _stability(results: dict[str, Any], indent: str) -> list[str]:
    """Sharpness (GD verdict) and non-uniformity (SGD verdict, Wu, Ma & E 2018)."""
    lines = []
    sharp = results.get("sharpness")
    if sharp:
        state = "" if sharp.get("converged", True) else ", NOT converged"
        lines.append(f"{indent}sharpness a = {_fmt(sharp.get('value'))}  ({sharp.get('source', 'lanczos')}{state})")
        rate = sharp.get("learning_rate")
        if "gd_stable" in sharp and isinstance(rate, (int, float)) and rate > 0:
            lines.append(f"{indent}  GD at lr {rate:.4g}: {_verdict(sharp['gd_stable'])} "
                         f"(a <= 2/lr = {2 / rate:.6g}, margin {_fmt(sharp.get('margin'), '.4g')})")
    nu = results.get("non_uniformity")
    if nu:
        state = "" if nu.get("converged", True) else ", NOT converged"
        error = nu.get("value_stderr")
        spread = f" +- {_fmt(error, '.2g')}" if isinstance(error, (int, float)) and error > 0 else ""
        lines.append(f"{indent}non-uniformity s = {_fmt(nu.get('value'))}{spread}  ({nu.get('method', 'exact')}, "
                     f"{nu.get('sigma_samples', nu.get('num_samples', 0))} samples, sharpness {_fmt(nu.get('sharpness', 0))}{state})")
        if "sgd_stable" in nu:
            lines.append(f"{indent}  SGD at lr {_fmt(nu.get('learning_rate'), '.4g')}, batch {_fmt(nu.get('batch_size'))}: "
                         f"{_verdict(nu['sgd_stable'])} (lambda_max = {_fmt(nu.get('stability_eigenvalue'))}"
                         + (f" +- {_fmt(nu['stability_eigenvalue_stderr'], '.2g')}"
                            if isinstance(nu.get("stability_eigenvalue_stderr"), (int, float))
                            and nu["stability_eigenvalue_stderr"] > 0 else "")
                         + ", stable if <= 1)")
            bound = nu.get("non_uniformity_bound")
            lines.append(f"{indent}  necessary conditions a <= {_fmt(nu.get('sharpness_bound'))}"
                         + (f", s <= {_fmt(bound)}" if bound is not None else "")
                         + f": {'met' if nu.get('necessary_conditions_met') else 'NOT met'}")
    return lines


class ProgressLine:
    """What a run is doing, on stderr, the same for a served call and ``--local``.

    On a terminal: one updating line, a bar of the analysis' products done out of its budget
    with an ETA from its pace so far, or the stage (loading the model, planning memory).
    Elsewhere (CI logs, a pipe): plain lines, never one per step: a stage (loading, planning,
    an analysis starting) that is still under way after ``SLOW_STAGE_SECONDS`` says so, and each
    analysis gets one line when it is done. A run that fails fast prints only its error.
    """

    SLOW_STAGE_SECONDS = 2.0

    def __init__(self, stream: TextIO = sys.stderr, *, clock: Callable[[], float] = time.monotonic):
        self.stream = stream
        self.tty = stream.isatty()
        self.clock = clock
        self._shown = False
        self._lock = threading.Lock()
        self._pending: threading.Timer | None = None
        # The analysis (and block) under way: its name, when its first step came, its last step.
        self._current: tuple[str, str] | None = None
        self._started = 0.0
        self._last: pb.Progress | None = None
        self._stage_began: float | None = None

    def __call__(self, event: pb.AnalyzeEvent) -> None:
        if event.HasField("queued"):
            self._stage(f"queued, position {event.queued.position}")
            return
        p = event.progress
        if p.stage:
            self._finish()
            self._stage_began = self.clock()
            self._stage(p.stage)
            return
        self._cancel_pending()
        where = (p.analysis, p.block)
        if where != self._current:
            self._finish()
            # An analysis' time runs from the stage that announced it (its setup counts too).
            began, self._stage_began = self._stage_began, None
            self._current, self._started = where, began if began is not None else self.clock()
        self._last = p
        if self.tty:
            self._show(self._bar(p))

    def _bar(self, p: pb.Progress) -> str:
        where = f" [{p.block}]" if p.block else ""
        filled = int(20 * p.step / p.total) if p.total else 0
        elapsed = self.clock() - self._started
        eta = ""
        if 0 < p.step < p.total and elapsed > 0:
            eta = f", ETA {_duration(elapsed / p.step * (p.total - p.step))}"
        return (f"{p.analysis}{where} [{'#' * filled}{'.' * (20 - filled)}] {p.step}/{p.total} products{eta}, "
                f"estimate {p.current_estimate:.6g}")

    def _stage(self, text: str) -> None:
        """On a terminal at once; elsewhere only if the stage lasts (a timer, cancelled by the next event)."""
        self._cancel_pending()
        if self.tty:
            self._show(text)
            return
        self._pending = threading.Timer(self.SLOW_STAGE_SECONDS, self._show, (text,), {"line": True})
        self._pending.daemon = True
        self._pending.start()

    def _cancel_pending(self) -> None:
        if self._pending is not None:
            self._pending.cancel()
            self._pending = None

    def _finish(self) -> None:
        """A line for the analysis that just ended (off a terminal: its only sign of progress)."""
        if self._current is not None and self._last is not None and not self.tty:
            analysis, block = self._current
            where = f" [{block}]" if block else ""
            self._show(f"{analysis}{where}: {self._last.step} products in "
                       f"{_duration(self.clock() - self._started)}, estimate {self._last.current_estimate:.6g}",
                       line=True)
        self._current, self._last = None, None

    def _show(self, text: str, *, line: bool = False) -> None:
        with self._lock:
            if self.tty:
                self.stream.write("\r\033[K" + text)
                self._shown = True
            elif line:
                self.stream.write(f"curvscope: {text}\n")
            self.stream.flush()

    def close(self, succeeded: bool = True) -> None:
        """End the display; ``succeeded`` (the report follows) also ends the last analysis' line."""
        self._cancel_pending()
        if succeeded:
            self._finish()
        if self._shown:
            self.stream.write("\r\033[K")
            self.stream.flush()
            self._shown = False


def _duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"
