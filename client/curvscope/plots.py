"""Plots of a report as standalone SVG, drawn by hand (the thin client has no numpy or matplotlib).

Each function takes the report dict (schema curvscope.report/v1) and returns an SVG document, or
None when the report lacks what the plot shows: the spectral density on a log scale, the top
eigenvalues per layer, the Lipschitz interval with every bound, and the (learning rate, batch
size) region where SGD can be linearly stable given the sharpness a and non-uniformity s.
"""

from __future__ import annotations

import math
import re
from typing import Any
from xml.sax.saxutils import escape, quoteattr

# One opaque fill per plot, so a screenshot shows which plots were drawn.
DENSITY_FILL = "#9ecae1"
# The density's band: +- BAND_WIDTH standard errors over the probes (about 95 %).
BAND_FILL, BAND_WIDTH = "#fdae6b", 2.0
EIGEN_FILL = "#f4a582"
LIPSCHITZ_FILL = "#a1d99b"
STABLE_FILL = "#bcbddc"
INK, GRID, LINE = "#222222", "#dddddd", "#2166ac"
FONT = "font-family='Helvetica, Arial, sans-serif' font-size='12'"


class _Scale:
    """Data to pixels on a linear or log axis, with readable ticks."""

    def __init__(self, low: float, high: float, start: float, end: float, log: bool = False):
        if log:
            low, high = math.log10(low), math.log10(high)
        if not high > low:
            low, high = low - 0.5, high + 0.5
        self.low, self.high, self.start, self.end, self.log = low, high, start, end, log

    def __call__(self, value: float) -> float:
        value = math.log10(value) if self.log else value
        return self.start + (value - self.low) / (self.high - self.low) * (self.end - self.start)

    def ticks(self) -> list[tuple[float, str]]:
        if self.log and self.high - self.low >= 1.5:
            step = max(1, math.ceil((self.high - self.low) / 6))
            return [(10.0**e, _power(e)) for e in range(math.ceil(self.low), math.floor(self.high) + 1, step)]
        low, high = (10**self.low, 10**self.high) if self.log else (self.low, self.high)
        step = _nice_step((high - low) / 5)
        first = math.ceil(low / step) * step
        count = int(math.floor((high - first) / step + 1e-9)) + 1
        return [(first + i * step, f"{first + i * step:.4g}") for i in range(count) if first + i * step > 0 or not self.log]


def _nice_step(raw: float) -> float:
    exponent = math.floor(math.log10(raw))
    for factor in (1, 2, 5, 10):
        if factor * 10**exponent >= raw:
            return factor * 10**exponent
    return 10 ** (exponent + 1)


def _power(exponent: int) -> str:
    return {0: "1", 1: "10"}.get(exponent, f"1e{exponent}")


class _Figure:
    def __init__(self, title: str, width: int = 560, height: int = 320, left: int = 64, right: int = 20,
                 top: int = 36, bottom: int = 48):
        self.width, self.height = width, height
        self.box = (left, top, width - right, height - bottom)
        self.parts = [f"<text x='{width / 2:.0f}' y='20' text-anchor='middle' font-weight='bold' {FONT}>{escape(title)}</text>"]
        self.title = title

    def axes(self, x: _Scale, y: _Scale | None, xlabel: str, ylabel: str, x_ticks: bool = True) -> None:
        left, top, right, bottom = self.box
        for value, label in (y.ticks() if y else []):
            py = y(value)
            self.parts.append(f"<line x1='{left}' x2='{right}' y1='{py:.1f}' y2='{py:.1f}' stroke='{GRID}'/>")
            self.parts.append(f"<text x='{left - 6}' y='{py + 4:.1f}' text-anchor='end' {FONT}>{escape(label)}</text>")
        if x_ticks:
            for value, label in x.ticks():
                px = x(value)
                self.parts.append(f"<line x1='{px:.1f}' x2='{px:.1f}' y1='{bottom}' y2='{bottom + 4}' stroke='{INK}'/>")
                self.parts.append(f"<text x='{px:.1f}' y='{bottom + 17}' text-anchor='middle' {FONT}>{escape(label)}</text>")
        self.parts.append(f"<rect x='{left}' y='{top}' width='{right - left}' height='{bottom - top}' fill='none' stroke='{INK}'/>")
        self.parts.append(f"<text x='{(left + right) / 2:.0f}' y='{self.height - 8}' text-anchor='middle' {FONT}>{escape(xlabel)}</text>")
        self.parts.append(f"<text transform='translate(14 {(top + bottom) / 2:.0f}) rotate(-90)' text-anchor='middle' {FONT}>{escape(ylabel)}</text>")

    def polygon(self, points: list[tuple[float, float]], fill: str, stroke: str = "none") -> None:
        path = " ".join(f"{x:.1f},{y:.1f}" for x, y in points)
        self.parts.append(f"<polygon points='{path}' fill='{fill}' stroke='{stroke}'/>")

    def polyline(self, points: list[tuple[float, float]], stroke: str = LINE, width: float = 1.5, dash: str = "") -> None:
        path = " ".join(f"{x:.1f},{y:.1f}" for x, y in points)
        dashes = f" stroke-dasharray='{dash}'" if dash else ""
        self.parts.append(f"<polyline points='{path}' fill='none' stroke='{stroke}' stroke-width='{width}'{dashes}/>")

    def rect(self, x: float, y: float, width: float, height: float, fill: str, tooltip: str = "") -> None:
        title = f"<title>{escape(tooltip)}</title>" if tooltip else ""
        self.parts.append(f"<rect x='{x:.1f}' y='{y:.1f}' width='{max(width, 0.5):.1f}' height='{max(height, 0.5):.1f}' "
                          f"fill='{fill}'>{title}</rect>")

    def circle(self, x: float, y: float, fill: str, radius: float = 5, tooltip: str = "") -> None:
        title = f"<title>{escape(tooltip)}</title>" if tooltip else ""
        self.parts.append(f"<circle cx='{x:.1f}' cy='{y:.1f}' r='{radius}' fill='{fill}' stroke='{INK}'>{title}</circle>")

    def text(self, x: float, y: float, text: str, anchor: str = "start", color: str = INK) -> None:
        self.parts.append(f"<text x='{x:.1f}' y='{y:.1f}' text-anchor='{anchor}' fill='{color}' {FONT}>{escape(text)}</text>")

    def svg(self) -> str:
        return (f"<svg xmlns='http://www.w3.org/2000/svg' width='{self.width}' height='{self.height}' "
                f"viewBox='0 0 {self.width} {self.height}' role='img' aria-label={quoteattr(self.title)}>"
                f"<title>{escape(self.title)}</title><rect width='100%' height='100%' fill='white'/>"
                + "".join(self.parts) + "</svg>\n")


def density_svg(report: dict[str, Any]) -> str | None:
    """The SLQ spectral density on a log scale (PyHessian's view), with the quadrature nodes."""
    density = report.get("results", {}).get("hessian_density") or {}
    grid, values = density.get("grid") or [], density.get("density") or []
    if len(grid) < 2 or len(grid) != len(values) or max(values) <= 0:
        return None
    peak = max(values)
    floor = peak * 1e-6  # six decades below the peak: beyond that the broadening's tails are noise
    figure = _Figure("Hessian spectral density")
    left, top, right, bottom = figure.box
    x = _Scale(min(grid), max(grid), left, right)
    y = _Scale(floor, peak * 2, bottom, top, log=True)
    figure.axes(x, y, "eigenvalue", "density (log scale)")
    curve = [(x(g), y(max(v, floor))) for g, v in zip(grid, values)]
    figure.polygon([(curve[0][0], bottom)] + curve + [(curve[-1][0], bottom)], DENSITY_FILL)
    upper, lower = density_band(density)
    if upper:
        figure.polygon([(x(g), y(min(max(v, floor), peak * 2))) for g, v in zip(grid, upper)]
                       + [(x(g), y(max(v, floor))) for g, v in reversed(list(zip(grid, lower)))], BAND_FILL)
    figure.polyline(curve)
    if min(grid) < 0 < max(grid):
        figure.polyline([(x(0), top), (x(0), bottom)], stroke=INK, width=1, dash="4 3")
    for node in density.get("nodes") or []:
        if min(grid) <= node <= max(grid):
            figure.polyline([(x(node), bottom), (x(node), bottom - 6)], stroke=INK, width=1)
    figure.text(right - 6, top + 16, mass_label(density), anchor="end")
    if upper:
        figure.text(right - 6, top + 32, f"band: +-{BAND_WIDTH:g} standard errors over the probes", anchor="end")
    return figure.svg()


def density_band(density: dict[str, Any]) -> tuple[list[float], list[float]]:
    """The curve +- BAND_WIDTH standard errors at every grid point; empty lists for a report
    without ``density_stderr`` (older servers)."""
    values, stderr = density.get("density") or [], density.get("density_stderr") or []
    if len(stderr) != len(values) or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in stderr):
        return [], []
    return ([v + BAND_WIDTH * e for v, e in zip(values, stderr)],
            [v - BAND_WIDTH * e for v, e in zip(values, stderr)])


def mass_label(density: dict[str, Any]) -> str:
    """"negative mass 1.20 +- 0.30 %" (and the near-zero mass when the report has it)."""
    def share(key: str) -> str:
        value, stderr = density.get(key, 0.0), density.get(f"{key}_stderr")
        if not isinstance(value, (int, float)):
            return str(value)
        return f"{100 * value:.2f}" + (f" +- {100 * stderr:.2f}" if isinstance(stderr, (int, float)) else "") + " %"
    label = f"negative mass {share('negative_mass')}"
    return label + (f", near zero {share('near_zero_mass')}" if "near_zero_mass" in density else "")


def eigenvalues_svg(report: dict[str, Any]) -> str | None:
    """The largest Hessian eigenvalues of the whole model and of every layer, as grouped bars."""
    groups = []
    whole = report.get("results", {}).get("hessian_eigen") or {}
    if whole.get("largest"):
        groups.append(("whole model", whole["largest"]))
    for block, results in (report.get("per_layer") or {}).items():
        largest = (results.get("hessian_eigen") or {}).get("largest")
        if largest:
            groups.append((block, largest))
    if not groups:
        return None
    values = [v for _, group in groups for v in group]
    figure = _Figure("Top Hessian eigenvalues" + (" per layer" if len(groups) > 1 else ""),
                     width=max(560, 90 * len(groups) + 100))
    left, top, right, bottom = figure.box
    low, high = min(0.0, min(values)), max(0.0, max(values))
    pad = 0.05 * ((high - low) or 1.0)
    y = _Scale(low - (pad if low < 0 else 0), high + pad, bottom, top)
    slot = (right - left) / len(groups)
    figure.axes(_Scale(0, 1, left, right), y, "parameter block", "eigenvalue", x_ticks=False)
    for index, (name, group) in enumerate(groups):
        width = 0.8 * slot / len(group)
        for rank, value in enumerate(group):
            x0 = left + index * slot + 0.1 * slot + rank * width
            top_y, bottom_y = sorted((y(value), y(0)))
            figure.rect(x0 + 1, top_y, width - 2, bottom_y - top_y, EIGEN_FILL, f"{name} #{rank + 1}: {value:.6g}")
        label = name if len(name) <= 14 else name[:13] + "…"
        figure.text(left + (index + 0.5) * slot, bottom + 17, label, anchor="middle")
    figure.polyline([(left, y(0)), (right, y(0))], stroke=INK, width=1)
    return figure.svg()


def lipschitz_svg(report: dict[str, Any]) -> str | None:
    """The Lipschitz interval [lower, upper] on a log axis, with the value of every method."""
    lip = report.get("results", {}).get("lipschitz") or {}
    marks = [(d.get("method", ""), d["value"]) for d in lip.get("details", []) if d.get("value", 0) > 0]
    lower, upper = lip.get("lower", 0.0), lip.get("upper", 0.0)
    positive = [v for v in [lower, upper] + [v for _, v in marks] if v > 0 and math.isfinite(v)]
    if not positive:
        return None
    rows = len(marks) + 1
    figure = _Figure("Lipschitz constant", height=90 + 28 * rows, left=130)
    left, top, right, bottom = figure.box
    x = _Scale(min(positive) / 2, max(positive) * 2, left, right, log=True)
    figure.axes(x, None, "Lipschitz constant (log scale)", "")
    row_height = (bottom - top) / rows
    start = x(lower) if lower > 0 else left
    end = x(upper) if upper > 0 else right
    figure.rect(start, top + 0.2 * row_height, end - start, 0.6 * row_height, LIPSCHITZ_FILL,
                f"[{lower:.6g}, {upper:.6g}]")
    figure.text(left - 8, top + 0.5 * row_height + 4, "interval", anchor="end")
    for index, (method, value) in enumerate(marks, 1):
        cy = top + (index + 0.5) * row_height
        figure.circle(x(value), cy, LINE, tooltip=f"{method}: {value:.6g}")
        figure.text(left - 8, cy + 4, method, anchor="end")
        figure.text(x(value) + 8, cy + 4, f"{value:.4g}")
    return figure.svg()


def stability_svg(report: dict[str, Any]) -> str | None:
    """Where SGD can be linearly stable in the (learning rate eta, batch size B) plane.

    Wu, Ma & E (2018): a minimum is linearly stable for SGD only if a <= 2/eta and
    s^2 eta^2 (n - B) / (B (n - 1)) <= 1, i.e. B >= s^2 eta^2 n / (n - 1 + s^2 eta^2). The
    shaded region meets both necessary conditions; the dot is the run's (eta, B) with its verdict.
    """
    nu = report.get("results", {}).get("non_uniformity") or {}
    a, s = nu.get("sharpness", 0.0), nu.get("value")
    n = nu.get("num_samples") or report.get("data", {}).get("num_samples", 0)
    if s is None or not a > 0 or n < 2:
        return None
    eta_max = 2 / a
    eta, batch = nu.get("learning_rate", 0.0), nu.get("batch_size", 0)
    x_low, x_high = eta_max / 1e3, eta_max * 10
    if eta > 0:
        x_low, x_high = min(x_low, eta / 3), max(x_high, eta * 3)
    figure = _Figure("SGD linear stability region")
    left, top, right, bottom = figure.box
    x = _Scale(x_low, x_high, left, right, log=True)
    y = _Scale(1, n, bottom, top, log=n > 1)
    figure.axes(x, y, "learning rate η (log scale)", "batch size B (log scale)")

    def smallest_batch(rate: float) -> float:
        noise = (s * rate) ** 2
        return min(max(noise * n / (n - 1 + noise), 1.0), float(n))

    steps = 120
    rates = [x_low * (eta_max / x_low) ** (i / steps) for i in range(steps + 1)]
    boundary = [(x(r), y(smallest_batch(r))) for r in rates]
    figure.polygon([(x(x_low), y(n)), (x(eta_max), y(n))] + boundary[::-1], STABLE_FILL)
    figure.polyline(boundary, stroke=INK, width=1)
    figure.polyline([(x(eta_max), top), (x(eta_max), bottom)], stroke=INK, width=1, dash="4 3")
    figure.text(x(eta_max) + 4, top + 14, "η = 2/a")
    figure.text(left + 8, bottom - 10, f"a = {a:.4g}, s = {s:.4g}, n = {n}")
    if eta > 0 and batch > 0 and "sgd_stable" in nu:
        stable = nu["sgd_stable"]
        figure.circle(x(eta), y(min(max(batch, 1), n)), "#1a9850" if stable else "#d73027",
                      tooltip=f"η = {eta:.4g}, B = {batch}: {'stable' if stable else 'unstable'}")
    return figure.svg()


def spectrum_svg(report: dict[str, Any]) -> str | None:
    """``analyze --plot OUT.svg``: the spectral density above the top eigenvalues per layer,
    as one document (either alone when the report has only one); None when it has neither."""
    panels = [svg for svg in (density_svg(report), eigenvalues_svg(report)) if svg is not None]
    if len(panels) < 2:
        return panels[0] if panels else None
    sizes = [tuple(int(float(v)) for v in re.search(r"width='([\d.]+)' height='([\d.]+)'", svg).groups())
             for svg in panels]
    width, height = max(w for w, _ in sizes), sum(h for _, h in sizes)
    body, offset = [], 0
    for svg, (_, panel_height) in zip(panels, sizes):
        # A nested <svg> placed at its offset keeps each panel's own coordinates.
        body.append(svg.replace("<svg ", f"<svg x='0' y='{offset}' ", 1).strip())
        offset += panel_height
    return (f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' "
            f"viewBox='0 0 {width} {height}' role='img' aria-label='Hessian spectrum'>"
            f"<title>Hessian spectrum</title><rect width='100%' height='100%' fill='white'/>"
            + "".join(body) + "</svg>\n")


def all_plots(report: dict[str, Any]) -> dict[str, str]:
    """Every plot the report has data for, by name."""
    makers = {"density": density_svg, "eigenvalues": eigenvalues_svg, "lipschitz": lipschitz_svg,
              "stability": stability_svg}
    return {name: svg for name, make in makers.items() if (svg := make(report)) is not None}
