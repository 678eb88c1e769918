"""The HTML report: one self-contained page, and what headless Chromium draws of it."""

from __future__ import annotations

import json
import math
import subprocess

import jsonschema
from PIL import Image

from curvscope import json_schema
from curvscope.cli import main
from curvscope.html_report import render_html
from curvscope.plots import DENSITY_FILL, EIGEN_FILL, LIPSCHITZ_FILL, STABLE_FILL


def eigen(largest):
    return {"largest": largest, "smallest": [], "residuals": {"largest": [0.0] * len(largest), "smallest": []},
            "converged": True, "hvps": 10, "seconds": 0.1, "tolerance": 1e-3}


def report(lipschitz: bool = True) -> dict:
    grid = [-1.0 + 0.05 * i for i in range(81)]
    results = {
        "hessian_eigen": eigen([4.0, 2.0]),
        "hessian_density": {"grid": grid, "density": [math.exp(-((g - 0.5) ** 2) / 0.02) for g in grid],
                            "nodes": [0.5], "weights": [1.0], "negative_mass": 0.01, "hvps": 90, "seconds": 1.0},
        "non_uniformity": {"value": 30.0, "batch_size": 32, "sgd_stable": True, "stability_eigenvalue": 0.99,
                           "learning_rate": 0.05, "method": "exact", "num_samples": 512, "converged": True,
                           "sharpness": 4.0, "sharpness_bound": 40.0, "necessary_conditions_met": True},
    }
    if lipschitz:
        results["lipschitz"] = {"lower": 18.0, "upper": 21.0, "method": "lipsdp_neuron", "bounds": {},
                                "details": [{"method": "naive", "value": 24.0}]}
    data = {"schema": "curvscope.report/v1", "model": {"sha256": "a" * 64, "format": "safetensors", "num_parameters": 2410},
            "data": {"sha256": "b" * 64, "num_samples": 512}, "loss": {"name": "cross_entropy", "value": 0.1},
            "device": "cpu", "seconds": 2.0, "results": results,
            "per_layer": {"<script>alert(1)</script>": {"hessian_eigen": eigen([3.0])}}}
    jsonschema.validate(data, json_schema())
    return data


def test_page_is_self_contained_and_escaped(tmp_path, capsys):
    path = tmp_path / "report.json"
    path.write_text(json.dumps(report()))
    out = tmp_path / "report.html"
    assert main(["report", str(path), "--html", str(out)]) == 0
    assert "Hessian eigenvalues" in capsys.readouterr().out
    page = out.read_text()
    assert page.count("<svg") == 4 and "<script" not in page  # the layer name is escaped, nothing runs
    assert "&lt;script&gt;" in page
    links = page.replace("http://www.w3.org/2000/svg", "")
    assert "http://" not in links and "https://" not in links and "src=" not in links
    assert "hessian_eigen.largest[0]" in page


def _pixels(png_path) -> dict[str, int]:
    image = Image.open(png_path).convert("RGB")
    counts: dict[str, int] = {}
    for count, (r, g, b) in image.getcolors(maxcolors=1 << 20):
        counts[f"#{r:02x}{g:02x}{b:02x}"] = count
    return counts


def _screenshot(chromium: str, tmp_path, html: str, name: str):
    page = tmp_path / f"{name}.html"
    page.write_text(html)
    shot = tmp_path / f"{name}.png"
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync", "--no-first-run",
                    f"--user-data-dir={tmp_path / ('profile-' + name)}", f"--screenshot={shot}",
                    "--window-size=1280,1400", page.as_uri()], capture_output=True, timeout=90, check=True)
    return _pixels(shot)


def test_chromium_draws_every_plot(tmp_path, system_tool):
    chromium = system_tool("chromium", "chromium-browser", install="apt-get install -y chromium")
    pixels = _screenshot(chromium, tmp_path, render_html(report()), "full")
    # Each plot has its own opaque fill: a rendered plot covers hundreds of pixels with it.
    for fill in (DENSITY_FILL, EIGEN_FILL, LIPSCHITZ_FILL, STABLE_FILL):
        assert pixels.get(fill, 0) > 300, (fill, pixels.get(fill, 0))
    # Without Lipschitz results that plot, and only that one, is gone.
    pixels = _screenshot(chromium, tmp_path, render_html(report(lipschitz=False)), "partial")
    assert pixels.get(LIPSCHITZ_FILL, 0) == 0 and pixels.get(STABLE_FILL, 0) > 300
