"""epsilon_sharpness and adaptive_sharpness through the engine: options, per layer, progress, bad input."""

from __future__ import annotations

from dataclasses import asdict

import pytest

from curvscope_service.engine import EngineLimits, run_analysis, validate_job
from curvscope_service.errors import InvalidInput

from .conftest import job


def test_defaults_of_the_papers(files):
    specs = validate_job(job(files, {"epsilon_sharpness": {}, "adaptive_sharpness": {}}), EngineLimits()).specs
    assert asdict(specs["epsilon_sharpness"]) == {"epsilon": 1e-3, "max_iterations": 10, "subspace_dim": 0}
    assert asdict(specs["adaptive_sharpness"]) == {"rho": 0.002, "steps": 20, "norm": "linf", "adaptive": False,
                                           "average_case": False}
    l2 = validate_job(job(files, {"adaptive_sharpness": {"norm": "SHARPNESS_NORM_L2"}}), EngineLimits()).specs
    assert l2["adaptive_sharpness"].rho == 0.1 and l2["adaptive_sharpness"].norm == "l2"


def test_reports_whole_model_and_per_layer(files):
    events = []
    report = run_analysis(job(files, {
        "epsilon_sharpness": {"epsilon": 1e-2},
        "adaptive_sharpness": {"rho": 0.05, "adaptive": True, "norm": "SHARPNESS_NORM_L2"},
    }, per_layer=True), progress=events.append)
    eps, ada = report["results"]["epsilon_sharpness"], report["results"]["adaptive_sharpness"]
    assert eps["value"] > 0 and eps["max_loss"] > eps["loss"] == pytest.approx(report["loss"]["value"])
    assert eps["value"] == pytest.approx(100 * (eps["max_loss"] - eps["loss"]) / (1 + eps["loss"]))
    assert ada["value"] == pytest.approx(ada["perturbed_loss"] - ada["loss"]) and ada["value"] > 0
    assert ada["adaptive"] and ada["norm"] == "l2" and ada["steps"] == 20
    for block in report["per_layer"].values():
        # The best point found is never worse than the unperturbed start: a loss increase >= 0.
        assert block["epsilon_sharpness"]["value"] >= 0 and block["adaptive_sharpness"]["value"] >= 0
    names = {e["analysis"] for e in events if e["analysis"]}
    assert {"epsilon_sharpness", "adaptive_sharpness"} <= names
    assert all(0 < e["step"] <= e["total"] for e in events if e["analysis"] in names)


def test_average_case_is_seeded(files):
    spec = {"adaptive_sharpness": {"rho": 0.05, "average_case": True, "steps": 8}}
    first = run_analysis(job(files, spec, seed=1))["results"]["adaptive_sharpness"]
    again = run_analysis(job(files, spec, seed=1))["results"]["adaptive_sharpness"]
    other = run_analysis(job(files, spec, seed=2))["results"]["adaptive_sharpness"]
    assert first["value"] == again["value"] != other["value"] and first["stderr"] > 0


@pytest.mark.parametrize("analyses, words", [
    ({"epsilon_sharpness": {"epsilon": -1.0}}, "epsilon"),
    ({"epsilon_sharpness": {"max_iterations": 10**6}}, "max_iterations"),
    ({"adaptive_sharpness": {"rho": float("inf")}}, "rho"),
    ({"adaptive_sharpness": {"norm": "SHARPNESS_NORM_L1"}}, "norm"),
    ({"adaptive_sharpness": {"steps": 10**6}}, "steps"),
])
def test_bad_options_refused(files, analyses, words):
    with pytest.raises(InvalidInput, match=words):
        validate_job(job(files, analyses), EngineLimits())
