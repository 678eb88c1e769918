"""Human-readable output of the CLI: a report table and a progress line."""

from __future__ import annotations

import sys
from typing import Any, TextIO

from ._proto.curvscope.v1 import curvscope_pb2 as pb


def _numbers(values: list[float]) -> str:
    return "  ".join(f"{value: .6g}" for value in values) or "-"


def render_report(report: dict[str, Any]) -> str:
    model = report["model"]
    lines = [f"model     {model['sha256'][:12]}  {model['format']}, {model['num_parameters']:,} parameters"]
    if "data" in report:
        lines.append(f"data      {report['data']['sha256'][:12]}  {report['data']['num_samples']:,} samples")
    if "loss" in report:
        lines.append(f"loss      {report['loss']['name']} = {report['loss']['value']:.6g}")
    lines += [
        f"run       {report.get('curvature', 'hessian')}, {report.get('precision', 'float32')}, seed {report.get('seed', 0)}, "
        f"{report['device']}, {report['seconds']:.2f} s",
    ]
    lines += _results(report["results"], indent="")
    per_layer = report.get("per_layer") or {}
    if per_layer:
        lines.append("")
        lines.append("per layer")
        for block, results in per_layer.items():
            lines.append(f"  [{block}]")
            lines += _results(results, indent="    ")
    return "\n".join(lines)


def _results(results: dict[str, Any], indent: str) -> list[str]:
    lines = []
    eigen = results.get("hessian_eigen")
    if eigen:
        state = "converged" if eigen["converged"] else "NOT converged (raise --max-hvps or the tolerance)"
        lines.append(f"{indent}Hessian eigenvalues: {eigen['hvps']} HVPs, {eigen['seconds']:.2f} s, "
                     f"tolerance {eigen.get('tolerance', 0):.0e}, {state}")
        if eigen["largest"]:
            lines.append(f"{indent}  largest   {_numbers(eigen['largest'])}")
            lines.append(f"{indent}  residual  {_numbers(eigen['residuals']['largest'])}")
        if eigen["smallest"]:
            lines.append(f"{indent}  smallest  {_numbers(eigen['smallest'])}")
            lines.append(f"{indent}  residual  {_numbers(eigen['residuals']['smallest'])}")
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
        lines.append(f"{indent}Lipschitz constant in [{lip.get('lower', 0.0):.6g}, {lip.get('upper', 0.0):.6g}]"
                     f"  (upper from {lip.get('method') or 'none'}, relative gap {lip.get('relative_gap', 0.0):.3g})")
        for detail in lip.get("details", []):
            value = f"{detail['value']:.6g}" if "value" in detail else detail.get("status", "")
            extra = ", ".join(x for x in (detail.get("solver", ""), f"{detail.get('seconds', 0.0):.2f} s", detail.get("note", "")) if x)
            lines.append(f"{indent}  {detail.get('method', ''):<14} {value}  ({extra})")
        if lip.get("note"):
            lines.append(f"{indent}  {lip['note']}")
    spectra = results.get("weight_spectra")
    if spectra:
        lines.append(f"{indent}weight spectra: layer, spectral norm, Frobenius norm, stable rank, alpha")
        for layer in spectra.get("layers", []):
            alpha = f"{layer['alpha']:.3g}" if "alpha" in layer else "-"
            lines.append(f"{indent}  {layer.get('name', ''):<12} {layer.get('spectral_norm', 0.0):.6g}  "
                         f"{layer.get('frobenius_norm', 0.0):.6g}  {layer.get('stable_rank', 0.0):.4g}  {alpha}")
    return lines


def _spectrum(results: dict[str, Any], indent: str) -> list[str]:
    """Trace (with its standard error, and tr(H^2) when asked) and the SLQ density in brief."""
    lines = []
    trace = results.get("hessian_trace")
    if trace:
        lines.append(f"{indent}trace = {trace.get('estimate', 0.0):.6g} +- {trace.get('stderr', 0.0):.2g}  "
                     f"({trace.get('method', '')}, {trace.get('hvps', 0)} HVPs, {trace.get('seconds', 0.0):.2f} s)")
        if "frobenius_squared" in trace:
            lines.append(f"{indent}  tr(H^2) = {trace['frobenius_squared']:.6g} +- {trace.get('frobenius_squared_stderr', 0.0):.2g}")
    density = results.get("hessian_density")
    if density:
        nodes = density.get("nodes") or [0.0]
        lines.append(f"{indent}spectral density: {density.get('hvps', 0)} HVPs, {density.get('seconds', 0.0):.2f} s, "
                     f"nodes in [{min(nodes):.4g}, {max(nodes):.4g}], "
                     f"negative mass {100 * density.get('negative_mass', 0.0):.2f} %")
    return lines


def _verdict(stable: Any) -> str:
    return "stable" if stable else "UNSTABLE"


def _stability(results: dict[str, Any], indent: str) -> list[str]:
    """Sharpness (GD verdict) and non-uniformity (SGD verdict, Wu, Ma & E 2018)."""
    lines = []
    sharp = results.get("sharpness")
    if sharp:
        state = "" if sharp.get("converged", True) else ", NOT converged"
        lines.append(f"{indent}sharpness a = {sharp['value']:.6g}  ({sharp.get('source', 'lanczos')}{state})")
        if "gd_stable" in sharp:
            lines.append(f"{indent}  GD at lr {sharp['learning_rate']:.4g}: {_verdict(sharp['gd_stable'])} "
                         f"(a <= 2/lr = {2 / sharp['learning_rate']:.6g}, margin {sharp['margin']:.4g})")
    nu = results.get("non_uniformity")
    if nu:
        state = "" if nu.get("converged", True) else ", NOT converged"
        lines.append(f"{indent}non-uniformity s = {nu['value']:.6g}  ({nu.get('method', 'exact')}, "
                     f"{nu.get('sigma_samples', nu.get('num_samples', 0))} samples, sharpness {nu.get('sharpness', 0):.6g}{state})")
        if "sgd_stable" in nu:
            lines.append(f"{indent}  SGD at lr {nu['learning_rate']:.4g}, batch {nu['batch_size']}: "
                         f"{_verdict(nu['sgd_stable'])} (lambda_max = {nu['stability_eigenvalue']:.6g}, stable if <= 1)")
            bound = nu.get("non_uniformity_bound")
            lines.append(f"{indent}  necessary conditions a <= {nu['sharpness_bound']:.6g}"
                         + (f", s <= {bound:.6g}" if bound is not None else "")
                         + f": {'met' if nu.get('necessary_conditions_met') else 'NOT met'}")
    return lines


class ProgressLine:
    """One updating line on a terminal; silent when the stream is not one (CI logs)."""

    def __init__(self, stream: TextIO = sys.stderr):
        self.stream = stream
        self.active = stream.isatty()
        self._shown = False

    def __call__(self, event: pb.AnalyzeEvent) -> None:
        if not self.active:
            return
        if event.HasField("queued"):
            text = f"queued, position {event.queued.position}"
        else:
            p = event.progress
            where = f" [{p.block}]" if p.block else ""
            filled = int(20 * p.step / p.total) if p.total else 0
            text = (f"{p.analysis}{where} [{'#' * filled}{'.' * (20 - filled)}] {p.step}/{p.total} "
                    f"estimate {p.current_estimate:.6g}")
        self.stream.write("\r\033[K" + text)
        self.stream.flush()
        self._shown = True

    def close(self) -> None:
        if self._shown:
            self.stream.write("\r\033[K")
            self.stream.flush()
