"""The hand-drawn SVG plots: read back from the drawing, every mark sits where its value says."""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET

import jsonschema
import pytest

from curvscope import json_schema
from curvscope.cli import main
from curvscope.plots import (BAND_FILL, DENSITY_FILL, EIGEN_FILL, LIPSCHITZ_FILL, STABLE_FILL, all_plots, density_svg,
                             eigenvalues_svg, lipschitz_svg, stability_svg)

SVG = "{http://www.w3.org/2000/svg}"


def eigen(largest):
    return {"largest": largest, "smallest": [], "residuals": {"largest": [0.0] * len(largest), "smallest": []},
            "converged": True, "hvps": 10, "seconds": 0.1, "tolerance": 1e-3}


def full_report() -> dict:
    grid = [-1.0 + 0.05 * i for i in range(81)]
    density = [math.exp(-((g - 0.5) ** 2) / 0.02) + 1e-3 * math.exp(-((g + 0.5) ** 2) / 0.02) for g in grid]
    report = {
        "schema": "curvscope.report/v1",
        "model": {"sha256": "a" * 64, "format": "safetensors", "num_parameters": 2410},
        "data": {"sha256": "b" * 64, "num_samples": 512}, "loss": {"name": "cross_entropy", "value": 0.1},
        "device": "cpu", "seconds": 2.0,
        "results": {
            "hessian_eigen": eigen([4.0, 2.0, 1.0]),
            "hessian_density": {"grid": grid, "density": density, "nodes": [-0.5, 0.5, 1.5], "weights": [0.1, 0.8, 0.1],
                                "negative_mass": 0.0123, "hvps": 90, "seconds": 1.0},
            "non_uniformity": {"value": 30.0, "batch_size": 32, "sgd_stable": True, "stability_eigenvalue": 0.99,
                               "learning_rate": 0.05, "method": "exact", "num_samples": 512, "converged": True,
                               "sharpness": 4.0},
            "lipschitz": {"lower": 18.0, "upper": 21.0, "method": "lipsdp_neuron", "bounds": {},
                          "details": [{"method": "naive", "value": 24.0}, {"method": "lipsdp_neuron", "value": 21.0},
                                      {"method": "lower", "value": 18.0}]},
        },
        "per_layer": {"0": {"hessian_eigen": eigen([3.0, 1.5, 0.5])}, "fc.2": {"hessian_eigen": eigen([0.8, 0.4, -0.2])}},
    }
    jsonschema.validate(report, json_schema())
    return report


def parse(svg: str) -> ET.Element:
    root = ET.fromstring(svg)
    assert root.tag == SVG + "svg" and not list(root.iter(SVG + "script"))
    return root


def points(element: ET.Element) -> list[tuple[float, float]]:
    return [tuple(map(float, pair.split(","))) for pair in element.get("points").split()]


def tick_scale(root: ET.Element, axis: str, log: bool):
    """The axis mapping, recovered from two tick labels the plot drew (value -> pixel)."""
    ticks = []
    for text in root.iter(SVG + "text"):
        label = text.text or ""
        try:
            value = float(label)
        except ValueError:
            continue
        anchor = text.get("text-anchor")
        if axis == "x" and anchor == "middle" and text.get("transform") is None:
            ticks.append((value, float(text.get("x"))))
        if axis == "y" and anchor == "end":
            ticks.append((value, float(text.get("y")) - 4))
    (v0, p0), (v1, p1) = ticks[0], ticks[-1]
    f = math.log10 if log else (lambda v: v)
    slope = (p1 - p0) / (f(v1) - f(v0))
    return lambda pixel: (10 ** (f(v0) + (pixel - p0) / slope)) if log else v0 + (pixel - p0) / slope


def test_stability_region_boundary_is_the_papers_condition():
    report = full_report()
    root = parse(stability_svg(report))
    a, s, n = 4.0, 30.0, 512
    to_eta, to_batch = tick_scale(root, "x", log=True), tick_scale(root, "y", log=True)
    region = [p for p in root.iter(SVG + "polygon") if p.get("fill") == STABLE_FILL]
    assert len(region) == 1
    boundary = [p for p in root.iter(SVG + "polyline") if p.get("stroke-dasharray") is None][0]
    checked = 0
    for x, y in points(boundary):
        eta, batch = to_eta(x), to_batch(y)
        assert eta <= 2 / a * 1.01
        if batch > 1.05:  # above the B = 1 floor the edge is s^2 eta^2 (n - B) / (B (n - 1)) = 1
            assert math.isclose(s**2 * eta**2 * (n - batch) / (batch * (n - 1)), 1.0, rel_tol=0.03), (eta, batch)
            checked += 1
    assert checked > 20
    dashed = [p for p in root.iter(SVG + "polyline") if p.get("stroke-dasharray")][0]
    assert math.isclose(to_eta(points(dashed)[0][0]), 2 / a, rel_tol=0.01)
    marker = next(root.iter(SVG + "circle"))
    assert math.isclose(to_eta(float(marker.get("cx"))), 0.05, rel_tol=0.01)
    assert math.isclose(to_batch(float(marker.get("cy"))), 32, rel_tol=0.02)
    assert marker.get("fill") == "#1a9850"  # stable
    report["results"]["non_uniformity"]["sgd_stable"] = False
    assert next(parse(stability_svg(report)).iter(SVG + "circle")).get("fill") == "#d73027"


def test_eigenvalue_bars_are_proportional_and_signed():
    report = full_report()
    root = parse(eigenvalues_svg(report))
    bars = [r for r in root.iter(SVG + "rect") if r.get("fill") == EIGEN_FILL]
    values = [4.0, 2.0, 1.0, 3.0, 1.5, 0.5, 0.8, 0.4, -0.2]
    assert len(bars) == len(values)
    to_value = tick_scale(root, "y", log=False)
    for bar, value in zip(bars, values):
        top, height = float(bar.get("y")), float(bar.get("height"))
        drawn = to_value(top) if value > 0 else to_value(top + height)
        assert math.isclose(drawn, value, abs_tol=0.02), (drawn, value)
    labels = [t.text for t in root.iter(SVG + "text")]
    assert {"whole model", "0", "fc.2"} <= set(labels)


def test_density_curve_on_a_log_scale():
    report = full_report()
    root = parse(density_svg(report))
    to_x, to_y = tick_scale(root, "x", log=False), tick_scale(root, "y", log=True)
    curve = [p for p in root.iter(SVG + "polyline") if p.get("stroke-dasharray") is None][0]
    density = report["results"]["hessian_density"]
    for (x, y), g, d in zip(points(curve), density["grid"], density["density"]):
        assert math.isclose(to_x(x), g, abs_tol=0.01)
        floor = max(density["density"]) * 1e-6
        assert math.isclose(math.log10(to_y(y)), math.log10(max(d, floor)), abs_tol=0.02)
    assert [p for p in root.iter(SVG + "polygon") if p.get("fill") == DENSITY_FILL]
    assert any("negative mass 1.23 %" in (t.text or "") for t in root.iter(SVG + "text"))
    assert not [p for p in root.iter(SVG + "polygon") if p.get("fill") == BAND_FILL]  # no stderr, no band


def test_density_band_is_two_standard_errors_around_the_curve():
    report = full_report()
    density = report["results"]["hessian_density"]
    density.update({"density_stderr": [0.1 * d for d in density["density"]], "negative_mass_stderr": 0.004,
                    "near_zero_mass": 0.5, "near_zero_mass_stderr": 0.02})
    root = parse(density_svg(report))
    to_y = tick_scale(root, "y", log=True)
    band = points([p for p in root.iter(SVG + "polygon") if p.get("fill") == BAND_FILL][0])
    upper, lower = band[: len(density["grid"])], band[len(density["grid"]):][::-1]
    floor = max(density["density"]) * 1e-6
    for (_, high), (_, low), d in zip(upper, lower, density["density"]):
        assert math.isclose(math.log10(to_y(high)), math.log10(max(1.2 * d, floor)), abs_tol=0.02)
        assert math.isclose(math.log10(to_y(low)), math.log10(max(0.8 * d, floor)), abs_tol=0.02)
    texts = " ".join(t.text or "" for t in root.iter(SVG + "text"))
    assert "negative mass 1.23 +- 0.40 %, near zero 50.00 +- 2.00 %" in texts
    assert "band: +-2 standard errors over the probes" in texts


def test_lipschitz_marks_on_a_log_axis():
    root = parse(lipschitz_svg(full_report()))
    to_x = tick_scale(root, "x", log=True)
    marks = {t.text: t for t in root.iter(SVG + "title")}
    circles = list(root.iter(SVG + "circle"))
    for circle, value in zip(circles, (24.0, 21.0, 18.0)):
        assert math.isclose(to_x(float(circle.get("cx"))), value, rel_tol=0.01)
    interval = [r for r in root.iter(SVG + "rect") if r.get("fill") == LIPSCHITZ_FILL][0]
    left, width = float(interval.get("x")), float(interval.get("width"))
    assert math.isclose(to_x(left), 18.0, rel_tol=0.01) and math.isclose(to_x(left + width), 21.0, rel_tol=0.01)
    assert "[18, 21]" in marks


def test_plots_need_their_data():
    report = full_report()
    assert set(all_plots(report)) == {"density", "eigenvalues", "lipschitz", "stability"}
    bare = {**report, "results": {}, "per_layer": {}}
    assert all_plots(bare) == {}
    no_s = {**report, "results": {"non_uniformity": {**report["results"]["non_uniformity"], "sharpness": 0.0}}}
    assert stability_svg(no_s) is None  # a <= 0: no learning-rate bound to draw


def test_analyze_plot_flag(server, digits_files, tmp_path, capsys):
    model_path, data_path = digits_files
    out = tmp_path / "plot.svg"
    args = ["analyze", str(model_path), "--data", str(data_path), "--server", server.target, "--plot", str(out)]
    assert main(args + ["--eigen", "2"]) == 0
    assert "Top Hessian eigenvalues" in out.read_text()
    assert main(args + ["--density"]) == 0
    assert "spectral density" in out.read_text()
    out.unlink()
    assert main(args + ["--trace"]) == 2
    assert "no spectral density or eigenvalues to plot" in capsys.readouterr().err and not out.exists()
