"""``analyze --plot``: a PNG through matplotlib (the optional ``plot`` extra), the SVG without it,
each with the density on a log scale and the top eigenvalues per layer."""

from __future__ import annotations

import struct
import sys
import xml.etree.ElementTree as ET

import pytest

from curvscope.cli import main
from curvscope.plots import spectrum_svg
from curvscope.plots_png import spectrum_figure, spectrum_png

from test_plots import full_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SVG = "{http://www.w3.org/2000/svg}"


def png_size(data: bytes) -> tuple[int, int]:
    """(width, height) from the IHDR chunk, which a valid PNG has first."""
    assert data[:8] == PNG_SIGNATURE
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13
    assert data[-12:] == b"\x00\x00\x00\x00IEND\xaeB`\x82"
    return struct.unpack(">II", data[16:24])


def titles(figure) -> list[str]:
    return [axes.get_title() for axes in figure.axes]


def test_png_has_the_density_on_a_log_scale_and_the_eigenvalues_per_layer():
    report = full_report()
    figure = spectrum_figure(report)
    assert titles(figure) == ["Hessian spectral density", "Top Hessian eigenvalues per layer"]
    density, eigen = figure.axes
    assert density.get_yscale() == "log"
    assert [label.get_text() for label in eigen.get_xticklabels()] == ["whole model", "0", "fc.2"]
    heights = [round(patch.get_height(), 9) for patch in eigen.patches]
    assert heights == [4.0, 2.0, 1.0, 3.0, 1.5, 0.5, 0.8, 0.4, -0.2]  # every layer's values, signed

    data = spectrum_png(report)
    width, height = png_size(data)
    assert len(data) > 20_000 and width >= 800 and height >= 800

    # Without per-layer results: the whole model's bars alone; without eigenvalues, one panel.
    whole_only = {**report, "per_layer": {}}
    assert titles(spectrum_figure(whole_only))[1] == "Top Hessian eigenvalues"
    density_only = {**report, "per_layer": {}, "results": {"hessian_density": report["results"]["hessian_density"]}}
    assert titles(spectrum_figure(density_only)) == ["Hessian spectral density"]
    one_panel = png_size(spectrum_png(density_only))
    assert one_panel[1] < height / 1.5
    eigen_only = {**report, "results": {}}
    assert titles(spectrum_figure(eigen_only)) == ["Top Hessian eigenvalues per layer"]
    assert spectrum_png({**report, "results": {}, "per_layer": {}}) is None


def test_svg_stacks_both_panels():
    root = ET.fromstring(spectrum_svg(full_report()))
    panels = root.findall(SVG + "svg")
    assert [panel.find(SVG + "title").text for panel in panels] == ["Hessian spectral density",
                                                                     "Top Hessian eigenvalues per layer"]
    assert panels[0].get("y") == "0" and float(panels[1].get("y")) == float(panels[0].get("height"))
    assert float(root.get("height")) == sum(float(panel.get("height")) for panel in panels)


def test_analyze_plot_png_against_a_server(server, digits_files, tmp_path):
    model_path, data_path = digits_files
    out = tmp_path / "spectrum.png"
    assert main(["analyze", str(model_path), "--data", str(data_path), "--server", server.target, "--eigen", "2",
                 "--per-layer", "--density", "--density-steps", "20", "--density-probes", "2",
                 "--plot", str(out)]) == 0
    data = out.read_bytes()
    png_size(data)
    assert len(data) > 20_000
    out.unlink()
    # With the JSON on stdout the plot is still written.
    assert main(["analyze", str(model_path), "--data", str(data_path), "--server", server.target, "--eigen", "2",
                 "--per-layer", "--json", "-", "--plot", str(out)]) == 0
    png_size(out.read_bytes())


def test_png_without_matplotlib_names_the_extra_before_any_work(monkeypatch, digits_files, tmp_path, capsys):
    model_path, data_path = digits_files
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    out = tmp_path / "spectrum.png"
    # The server does not exist: the flag is refused before anything is sent (2, not 3).
    assert main(["analyze", str(model_path), "--data", str(data_path), "--server", "127.0.0.1:1",
                 "--plot", str(out)]) == 2
    err = capsys.readouterr().err
    assert "curvscope[plot]" in err and "matplotlib" in err and "Traceback" not in err
    assert not out.exists()
    assert main(["analyze", str(model_path), "--server", "127.0.0.1:1", "--plot", str(tmp_path / "x.pdf")]) == 2
    assert "write a .png or an .svg file" in capsys.readouterr().err
