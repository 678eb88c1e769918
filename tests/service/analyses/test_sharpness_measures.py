"""epsilon_sharpness and adaptive_sharpness through the engine: options, per layer, progress, bad input."""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict

import pytest
import torch
from safetensors.torch import save_file

from curvscope_service.engine import AnalysisJob, EngineLimits, run_analysis, validate_job
from curvscope_service.errors import InvalidInput
from curvscope_service.loading import save_sequential

from .conftest import job


@pytest.fixture(scope="module")
def line(tmp_path_factory):
    """A straight line y = w x + b fitted by mse: two parameters, and a loss quadratic in them, so
    every maximum over a box sits at one of its 4 vertices and over an ellipse on its boundary
    (a convex function's maximum over a convex set is at an extreme point): brute force is exact."""
    root = tmp_path_factory.mktemp("line")
    model = torch.nn.Sequential(torch.nn.Linear(1, 1))
    with torch.no_grad():
        model[0].weight.fill_(0.8)
        model[0].bias.fill_(-0.3)
    save_sequential(root / "line.safetensors", {"input_shape": [1], "layers": [
        {"type": "linear", "in_features": 1, "out_features": 1}]}, model.state_dict())
    x = torch.randn(32, 1, generator=torch.Generator().manual_seed(1))
    t = 1.5 * x + 0.2 + 0.1 * torch.randn(32, 1, generator=torch.Generator().manual_seed(2))
    save_file({"inputs": x, "targets": t}, str(root / "line-data.safetensors"))
    X = torch.cat([x.double(), torch.ones(32, 1, dtype=torch.float64)], 1)
    w = torch.cat([model[0].weight.detach().reshape(-1), model[0].bias.detach()]).double()

    def loss(W: torch.Tensor) -> torch.Tensor:
        """The mse at each row of W (k, 2)."""
        return ((X @ W.T - t.double()) ** 2).mean(0)

    def run(analyses: dict) -> dict:
        return run_analysis(AnalysisJob(model_path=root / "line.safetensors", model_sha256="0" * 64,
                                        data_path=root / "line-data.safetensors", loss="mse", analyses=analyses,
                                        precision="float64"))["results"]
    return w, loss, run


def vertices(half_widths: torch.Tensor) -> torch.Tensor:
    return torch.tensor(list(itertools.product([-1.0, 1.0], repeat=2)), dtype=torch.float64) * half_widths


@pytest.mark.parametrize("epsilon", [1e-3, 0.1])
def test_epsilon_sharpness_is_the_brute_force_maximum(line, epsilon):
    w, loss, run = line
    result = run({"epsilon_sharpness": {"epsilon": epsilon}})["epsilon_sharpness"]
    base = loss(w[None]).item()
    best = loss(w + vertices(epsilon * (w.abs() + 1))).max().item()
    # L-BFGS-B lands on the best vertex: the box's maximum to rounding.
    assert result["value"] == pytest.approx(100 * (best - base) / (1 + base), rel=1e-9)
    assert result["max_loss"] == pytest.approx(best, rel=1e-12)


@pytest.mark.parametrize("norm", ["SHARPNESS_NORM_LINF", "SHARPNESS_NORM_L2"])
@pytest.mark.parametrize("rho, adaptive", [(0.05, True), (0.5, False)])
def test_adaptive_sharpness_is_the_brute_force_maximum(line, norm, rho, adaptive):
    w, loss, run = line
    result = run({"adaptive_sharpness": {"rho": rho, "adaptive": adaptive, "norm": norm}})["adaptive_sharpness"]
    base = loss(w[None]).item()
    scale = w.abs() if adaptive else torch.ones(2, dtype=torch.float64)
    if norm == "SHARPNESS_NORM_LINF":
        best = loss(w + vertices(rho * scale)).max().item() - base
    else:  # the ellipse's boundary at 10^6 angles: the maximum to ~(2 pi / 10^6)^2 relative
        angles = torch.linspace(0, 2 * math.pi, 1_000_001, dtype=torch.float64)
        best = loss(w + torch.stack([angles.cos(), angles.sin()], 1) * rho * scale).max().item() - base
    # The ascent's best point is a lower bound of the maximum, and 20 steps with momentum on the
    # iterates get within 1e-3 of it (measured: 1e-6 on the box, 2e-4 on the ellipse).
    assert best * (1 - 1e-3) <= result["value"] <= best * (1 + 1e-9)


def test_defaults_of_the_papers(files):
    specs = validate_job(job(files, {"epsilon_sharpness": {}, "adaptive_sharpness": {}}), EngineLimits()).specs
    assert asdict(specs["epsilon_sharpness"]) == {"epsilon": 1e-3, "max_iterations": 10, "subspace_dim": 0,
                                                  "random_starts": 0}
    assert asdict(specs["adaptive_sharpness"]) == {"rho": 0.002, "steps": 20, "norm": "linf", "adaptive": False,
                                                   "average_case": False, "random_starts": 0}
    l2 = validate_job(job(files, {"adaptive_sharpness": {"norm": "SHARPNESS_NORM_L2"}}), EngineLimits()).specs
    assert l2["adaptive_sharpness"].rho == 0.1 and l2["adaptive_sharpness"].norm == "l2"


@pytest.mark.parametrize("analysis, spec", [
    ("epsilon_sharpness", {"epsilon": 0.1}),
    ("adaptive_sharpness", {"rho": 0.5}),
    ("adaptive_sharpness", {"rho": 0.5, "norm": "SHARPNESS_NORM_L2"}),
])
def test_random_starts_give_the_spread_of_the_maxima_found(line, analysis, spec):
    w, loss, run = line
    alone = run({analysis: spec})[analysis]
    result = run({analysis: {**spec, "random_starts": 5}})[analysis]
    starts = result["start_values"]
    assert len(starts) == 6 and "start_values" not in alone
    # The ascent from 0 is the same with or without the others; the value is the best of all.
    assert starts[0] == pytest.approx(alone["value"], rel=1e-12) and result["value"] == max(starts)
    assert result["start_spread"] == pytest.approx(torch.tensor(starts, dtype=torch.float64).std().item(), rel=1e-9)
    # Every start's maximum is a point of the set: none above the brute-force maximum.
    base = loss(w[None]).item()
    if analysis == "epsilon_sharpness":
        best = 100 * (loss(w + vertices(0.1 * (w.abs() + 1))).max().item() - base) / (1 + base)
    elif "norm" in spec:
        angles = torch.linspace(0, 2 * math.pi, 1_000_001, dtype=torch.float64)
        best = loss(w + torch.stack([angles.cos(), angles.sin()], 1) * 0.5).max().item() - base
    else:
        best = loss(w + vertices(torch.full((2,), 0.5, dtype=torch.float64))).max().item() - base
    assert max(starts) <= best * (1 + 1e-9)


def test_reports_whole_model_and_per_layer(files):
    events = []
    report = run_analysis(job(files, {
        "epsilon_sharpness": {"epsilon": 1e-2},
        "adaptive_sharpness": {"rho": 0.05, "adaptive": True, "norm": "SHARPNESS_NORM_L2"},
    }, per_layer=True), progress=events.append)
    eps, ada = report["results"]["epsilon_sharpness"], report["results"]["adaptive_sharpness"]
    # The values against brute force: test_epsilon_sharpness_is_the_brute_force_maximum and
    # test_adaptive_sharpness_is_the_brute_force_maximum; here the report's shape.
    assert eps["loss"] == pytest.approx(report["loss"]["value"], rel=1e-12) and eps["value"] > 0
    assert ada["value"] == pytest.approx(ada["perturbed_loss"] - ada["loss"], rel=1e-12) and ada["value"] > 0
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
    ({"adaptive_sharpness": {"random_starts": 101}}, "random_starts"),
    ({"adaptive_sharpness": {"random_starts": 2, "average_case": True}}, "worst case"),
    ({"epsilon_sharpness": {"random_starts": 1000}}, "random_starts"),
])
def test_bad_options_refused(files, analyses, words):
    with pytest.raises(InvalidInput, match=words):
        validate_job(job(files, analyses), EngineLimits())
