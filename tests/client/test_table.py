"""The terminal table: every section the report has, and no KeyError for what it lacks."""

from __future__ import annotations

import json

import pytest

from curvscope._table import render_report
from curvscope.cli import main

FULL_EIGEN = {"largest": [3.0, 2.0], "smallest": [-0.5], "residuals": {"largest": [1e-4, 2e-4], "smallest": [3e-4]},
              "converged": True, "hvps": 40, "seconds": 0.25, "tolerance": 1e-3}


def test_a_full_report_shows_every_section():
    report = {
        "schema": "curvscope.report/v1",
        "model": {"sha256": "a" * 64, "format": "safetensors", "num_parameters": 2410},
        "data": {"sha256": "b" * 64, "num_samples": 512}, "loss": {"name": "cross_entropy", "value": 0.25},
        "device": "cpu", "seconds": 1.5, "curvature": "ggn", "precision": "float64", "seed": 3,
        "results": {"hessian_eigen": FULL_EIGEN,
                    "sharpness": {"value": 3.0, "learning_rate": 0.5, "gd_stable": True, "margin": 0.25}},
        "per_layer": {"fc.0": {"hessian_eigen": FULL_EIGEN}},
    }
    text = render_report(report)
    for expected in ("2,410 parameters", "512 samples", "cross_entropy = 0.25", "ggn, float64, seed 3, cpu, 1.50 s",
                     "largest    3   2", "residual   0.0001   0.0002", "smallest  -0.5",
                     "GD at lr 0.5: stable (a <= 2/lr = 4, margin 0.25)", "[fc.0]"):
        assert expected in text, expected


def test_residuals_at_the_rounding_floor_read_as_a_bound():
    floor = 2.0216e-08
    at_floor = {**FULL_EIGEN, "residuals": {"largest": [floor, floor], "smallest": [3e-4]},
                "residual_floor": {"largest": floor, "smallest": floor}}
    text = render_report({"results": {"hessian_eigen": at_floor}})
    assert "residual  <= 2.0e-08, at rounding" in text
    assert "residual   0.0003" in text  # the smallest end's residual is a measurement
    mixed = {**at_floor, "residuals": {"largest": [floor, 5e-6], "smallest": []}}
    assert "<= 2.0e-08   5e-06 (<= : at rounding)" in render_report({"results": {"hessian_eigen": mixed}})


def test_subsampled_non_uniformity_shows_its_error_bars():
    nu = {"value": 3.4, "value_stderr": 0.21, "method": "exact", "sigma_samples": 64, "sharpness": 0.7,
          "sgd_stable": True, "learning_rate": 0.1, "batch_size": 32, "stability_eigenvalue": 0.95,
          "stability_eigenvalue_stderr": 0.03, "sharpness_bound": 20.0, "necessary_conditions_met": True}
    text = render_report({"results": {"non_uniformity": nu}})
    assert "non-uniformity s = 3.4 +- 0.21" in text and "lambda_max = 0.95 +- 0.03, stable if <= 1" in text
    exact = render_report({"results": {"non_uniformity": {**nu, "value_stderr": 0.0}}})
    assert "s = 3.4  (" in exact  # every sample used: no error bar to show


def test_density_masses_with_their_standard_errors():
    density = {"nodes": [-0.1, 0.5], "hvps": 90, "negative_mass": 0.0123, "negative_mass_stderr": 0.004,
               "near_zero_mass": 0.7, "near_zero_mass_stderr": 0.01, "negative_tolerance": 1e-3}
    text = render_report({"results": {"hessian_density": density}})
    assert "negative mass 1.23 +- 0.40 %, near zero 70.00 +- 1.00 % (|lambda| <= 1e-03 max|lambda| is zero)" in text
    # A report from before the masses had standard errors.
    assert "negative mass 1.23 %" in render_report({"results": {"hessian_density": {"negative_mass": 0.0123}}})


@pytest.mark.parametrize("report", [
    {},
    {"schema": "curvscope.report/v1", "model": {}, "results": {}},
    {"model": {"sha256": "a" * 64}, "data": {"num_samples": 3}, "loss": {"name": "mse"}, "results": None,
     "per_layer": {"0": None}},
    {"results": {"hessian_eigen": {"largest": [1.0]}}},  # no residuals, no counts
    {"results": {"hessian_eigen": {"smallest": [-1.0], "residuals": {}}}},
    {"results": {"sharpness": {"gd_stable": False}}},  # a verdict without its learning rate or value
    {"results": {"sharpness": {"value": 2.0, "gd_stable": True, "learning_rate": 0.0}}},  # no 2/0
    {"results": {"non_uniformity": {"sgd_stable": True}}},
    {"results": {"hessian_trace": {"estimate": "NaN"}, "hessian_density": {"nodes": ["NaN"], "negative_mass": None}}},
    {"results": {"lipschitz": {"details": [{"method": "naive"}, {"value": 3.0}]}}},
    {"results": {"weight_spectra": {"layers": [{"name": "fc"}]}}},
    {"per_layer": {"fc.0": {"hessian_eigen": {"largest": [2.0]}}}},
])
def test_a_report_missing_sections_or_keys_still_renders(report):
    text = render_report(report)
    assert text.startswith("model ")


def test_missing_values_show_as_a_dash():
    text = render_report({"results": {"hessian_eigen": {"largest": [1.5]}, "sharpness": {"gd_stable": True}}})
    assert "largest    1.5" in text and "residual  -" in text
    assert "Hessian eigenvalues: - HVPs, - s" in text and "sharpness a = -" in text


def test_cli_report_of_a_trimmed_report(tmp_path, capsys):
    # A report written by hand (or by an older server) with only some keys of a result.
    path = tmp_path / "trimmed.json"
    path.write_text(json.dumps({"schema": "curvscope.report/v1", "model": {"sha256": "a" * 64, "format": "safetensors",
                                                                           "num_parameters": 10},
                                "device": "cpu", "seconds": 1.0,
                                "results": {"non_uniformity": {"value": 3.0, "batch_size": 8, "sgd_stable": False}}}))
    assert main(["report", str(path)]) == 0
    assert "non-uniformity s = 3" in capsys.readouterr().out
