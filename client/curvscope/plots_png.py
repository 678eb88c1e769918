"""``analyze --plot OUT.png``: the spectrum of a report as a PNG, drawn with matplotlib.

matplotlib is an optional extra of the thin client (``pip install 'curvscope[plot]'``): it is
imported here only, and only when a PNG is asked for; ``--plot OUT.svg`` needs nothing more
(see ``plots``). Two panels, each drawn when the report has its data: the SLQ spectral density
on a log scale, as in Ghorbani, Krishnan & Xiao (2019), and the top Hessian eigenvalues of the
whole model and of every layer.
"""

from __future__ import annotations

import io
import math
from typing import Any

from .client import CurvscopeError
from .plots import BAND_FILL, BAND_WIDTH, DENSITY_FILL, EIGEN_FILL, INK, LINE, density_band, mass_label

MISSING = ("--plot OUT.png needs matplotlib, an optional extra of the client: pip install 'curvscope[plot]' "
           "(or write OUT.svg, which needs nothing more)")
DPI = 120


def require_matplotlib() -> None:
    """Raise a CurvscopeError naming the extra when matplotlib is not installed."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise CurvscopeError("FAILED_PRECONDITION", MISSING) from None


def _finite(values: list[Any]) -> bool:
    return all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)


def _density(report: dict[str, Any]) -> dict[str, Any] | None:
    density = (report.get("results") or {}).get("hessian_density") or {}
    grid, values = density.get("grid") or [], density.get("density") or []
    if len(grid) < 2 or len(grid) != len(values) or not _finite(grid + values) or max(values) <= 0:
        return None
    return density


def _eigen_groups(report: dict[str, Any]) -> list[tuple[str, list[float]]]:
    """(block, largest eigenvalues): the whole model first, then every layer that has them."""
    groups = []
    whole = ((report.get("results") or {}).get("hessian_eigen") or {}).get("largest") or []
    if whole:
        groups.append(("whole model", list(whole)))
    for block, results in (report.get("per_layer") or {}).items():
        largest = ((results or {}).get("hessian_eigen") or {}).get("largest") or []
        if largest:
            groups.append((block, list(largest)))
    return [(name, [v if isinstance(v, (int, float)) and math.isfinite(v) else math.nan for v in values])
            for name, values in groups]


def _draw_density(axes: Any, density: dict[str, Any]) -> None:
    grid, values = density["grid"], density["density"]
    peak = max(values)
    floor = peak * 1e-6  # six decades below the peak: beyond that the broadening's tails are noise
    clipped = [max(v, floor) for v in values]
    axes.fill_between(grid, floor, clipped, color=DENSITY_FILL, linewidth=0)
    upper, lower = density_band(density)
    if upper:
        axes.fill_between(grid, [max(v, floor) for v in lower], [min(max(v, floor), peak * 2) for v in upper],
                          color=BAND_FILL, linewidth=0, label=f"+-{BAND_WIDTH:g} standard errors over the probes")
        axes.legend(loc="center right", frameon=False)
    axes.plot(grid, clipped, color=LINE, linewidth=1.5)
    axes.set_yscale("log")
    axes.set_ylim(floor, peak * 2)
    axes.set_xlim(min(grid), max(grid))
    if min(grid) < 0 < max(grid):
        axes.axvline(0, color=INK, linewidth=1, linestyle="--")
    nodes = [n for n in density.get("nodes") or [] if min(grid) <= n <= max(grid)]
    if nodes:  # the quadrature nodes as a rug along the bottom
        axes.plot(nodes, [floor] * len(nodes), linestyle="none", marker="|", markersize=10, color=INK)
    axes.set_title("Hessian spectral density")
    axes.set_xlabel("eigenvalue")
    axes.set_ylabel("density (log scale)")
    axes.text(0.98, 0.94, mass_label(density),
              transform=axes.transAxes, ha="right", va="top")


def _draw_eigenvalues(axes: Any, groups: list[tuple[str, list[float]]]) -> None:
    for index, (name, values) in enumerate(groups):
        width = 0.8 / len(values)
        positions = [index - 0.4 + width * (rank + 0.5) for rank in range(len(values))]
        axes.bar(positions, values, width=width * 0.9, color=EIGEN_FILL, edgecolor=INK, linewidth=0.5,
                 label=name)
    axes.axhline(0, color=INK, linewidth=1)
    axes.set_xticks(range(len(groups)), [name if len(name) <= 14 else name[:13] + "…" for name, _ in groups])
    axes.set_xlim(-0.6, len(groups) - 0.4)
    axes.set_title("Top Hessian eigenvalues" + (" per layer" if len(groups) > 1 else ""))
    axes.set_xlabel("parameter block")
    axes.set_ylabel("eigenvalue")


def spectrum_figure(report: dict[str, Any]) -> Any | None:
    """A matplotlib Figure with a panel for each of the density and the eigenvalues the report
    has; None when it has neither."""
    require_matplotlib()
    from matplotlib.figure import Figure  # no pyplot: no global state, no display needed

    density, groups = _density(report), _eigen_groups(report)
    panels = [p for p in (("density", density), ("eigenvalues", groups)) if p[1]]
    if not panels:
        return None
    figure = Figure(figsize=(max(7.0, 0.9 * len(groups) + 2), 3.8 * len(panels)), dpi=DPI, layout="constrained")
    for axes, (kind, data) in zip(figure.subplots(len(panels), 1, squeeze=False)[:, 0], panels):
        _draw_density(axes, data) if kind == "density" else _draw_eigenvalues(axes, data)
    return figure


def spectrum_png(report: dict[str, Any]) -> bytes | None:
    """The PNG of ``spectrum_figure``; None when the report has nothing to plot."""
    figure = spectrum_figure(report)
    if figure is None:
        return None
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI, facecolor="white")
    return buffer.getvalue()
