"""hessian_trace and hessian_density through the engine, for every curvature, against dense truths."""

from __future__ import annotations

from dataclasses import asdict

import numpy as np
import pytest
import torch
from torch.func import functional_call, hessian, jacrev

from curvscope_service.engine import EngineLimits, run_analysis, validate_job
from curvscope_service.errors import InvalidInput
from curvscope_service.loading import load_data, load_model
from curvscope_service.losses import get_loss
from curvscope_service.requests import report_document, report_message
from dense_reference import dense_hessian

from .conftest import job


def stored(files):
    model = load_model(files / "mlp.safetensors", dtype=torch.float64).module
    data = load_data(files / "classes.safetensors", dtype=torch.float64)
    return model, data.inputs[0], data.targets, get_loss("cross_entropy")


def dense_ggn(files, names=None):
    """J^T H_loss J from the output Jacobian and the loss' Hessian in the outputs."""
    model, inputs, targets, loss = stored(files)
    params = dict(model.named_parameters())
    names = list(params) if names is None else names
    sizes = [params[k].numel() for k in names]

    def outputs(theta):
        values = dict(params)
        values.update({k: t.reshape(params[k].shape) for k, t in zip(names, theta.split(sizes))})
        return functional_call(model, values, (inputs,))

    theta = torch.cat([params[k].detach().reshape(-1) for k in names])
    out = outputs(theta).detach()
    J = jacrev(lambda t: outputs(t).reshape(-1))(theta)
    return J.T @ hessian(lambda o: loss(o.reshape(out.shape), targets))(out.reshape(-1)) @ J


def dense_outer_products(files, labels):
    """(1/n) sum_i g_i g_i^T, g_i the gradient of sample i's loss at ``labels``, from per-sample
    gradients written out one sample at a time."""
    model, inputs, _, loss = stored(files)
    params = dict(model.named_parameters())
    gradients = []
    for x, y in zip(inputs, labels):
        model.zero_grad()
        loss(model(x[None]), y[None]).backward()
        gradients.append(torch.cat([p.grad.reshape(-1) for p in params.values()]))
    G = torch.stack(gradients)
    return G.T @ G / len(G)


def dense_curvature(files, curvature: str, seed: int):
    """The dense float64 matrix of a curvature. The Fisher's labels are drawn as the operator
    documents (curvature/operators/fisher.py: one class per sample from softmax(f), a generator
    seeded with the request's seed, one micro-batch here)."""
    if curvature == "ggn":
        return dense_ggn(files)
    model, inputs, targets, _ = stored(files)
    if curvature == "empirical_fisher":
        return dense_outer_products(files, targets)
    with torch.no_grad():
        probabilities = torch.softmax(model(inputs).double(), dim=1)
    labels = torch.multinomial(probabilities, 1, replacement=True, generator=torch.Generator().manual_seed(seed))[:, 0]
    return dense_outer_products(files, labels)


@pytest.fixture(scope="module")
def dynamic_export(files, tmp_path_factory):
    """The same MLP as a .pt2 with a dynamic batch dimension."""
    model = load_model(files / "mlp.safetensors").module
    path = tmp_path_factory.mktemp("spectrum") / "mlp.pt2"
    inputs = torch.randn(8, 6)
    torch.export.save(torch.export.export(model, (inputs,), dynamic_shapes=({0: torch.export.Dim("batch")},)), str(path))
    return path


@pytest.mark.parametrize("method", ["TRACE_METHOD_XTRACE", "TRACE_METHOD_HUTCH_PLUS_PLUS", "TRACE_METHOD_HUTCHINSON"])
def test_trace_whole_model_and_per_layer(files, method):
    report = run_analysis(job(files, {"hessian_trace": {"method": method, "max_hvps": 30, "frobenius": True}},
                              per_layer=True))
    result = report["results"]["hessian_trace"]
    H = dense_hessian(*stored(files))
    assert result["method"] == method.removeprefix("TRACE_METHOD_").lower().replace("hutch_plus_plus", "hutchpp")
    assert result["hvps"] == 30 and result["stderr"] > 0
    assert abs(result["estimate"] - H.trace().item()) <= 3 * result["stderr"]
    # 4 = 3 x 1.3: XTrace's standard error of tr(H^2) runs low (test_trace.py).
    assert abs(result["frobenius_squared"] - (H**2).sum().item()) <= 4 * result["frobenius_squared_stderr"]
    blocks = load_model(files / "mlp.safetensors").parameter_blocks
    for block, names in blocks.items():
        block_result = report["per_layer"][block]["hessian_trace"]
        truth = dense_hessian(*stored(files), param_names=names).trace().item()
        assert abs(block_result["estimate"] - truth) <= 3 * block_result["stderr"] + 1e-9
    report_message(report_document(report))  # every key is a field of the API's result messages


def test_trace_of_the_ggn_from_a_dynamic_export(files, dynamic_export):
    spec = {"hessian_trace": {"method": "TRACE_METHOD_HUTCH_PLUS_PLUS", "max_hvps": 60}}
    exported = job(files, spec, curvature="ggn")
    exported.model_path = dynamic_export
    result = run_analysis(exported)["results"]["hessian_trace"]
    truth = dense_ggn(files).trace().item()
    assert abs(result["estimate"] - truth) <= 3 * result["stderr"]
    # The model has 53 parameters and the GGN rank <= 16 x 2: a 20-vector sketch takes most of it.
    assert result["stderr"] < 0.05 * truth


@pytest.mark.parametrize("curvature", ["ggn", "fisher", "empirical_fisher"])
def test_eigen_and_trace_of_every_curvature(files, curvature):
    report = run_analysis(job(files, {"hessian_eigen": {"top_k": 2, "tolerance": 1e-6},
                                      "hessian_trace": {"max_hvps": 40}}, curvature=curvature, seed=2))
    eigen, trace = report["results"]["hessian_eigen"], report["results"]["hessian_trace"]
    assert report["curvature"] == curvature and eigen["converged"]
    dense = dense_curvature(files, curvature, seed=2)
    # Residuals <= 1e-6 |theta| bound each eigenvalue's error by 1e-6 |theta| (Bauer-Fike): 1e-5 leaves room.
    assert eigen["largest"] == pytest.approx(torch.linalg.eigvalsh(dense).flip(0)[:2].tolist(), rel=1e-5)
    assert abs(trace["estimate"] - dense.trace().item()) <= 3 * trace["stderr"] + 1e-10 * dense.trace().item()
    # The loss in the report is the loss, whatever the curvature.
    model, inputs, targets, loss = stored(files)
    assert report["loss"]["value"] == pytest.approx(loss(model(inputs), targets).item(), rel=1e-10)


def test_trace_seeded_by_the_eigenpairs_of_the_same_request(files):
    analyses = {"hessian_eigen": {"top_k": 3, "bottom_k": 1, "tolerance": 1e-8},
                "hessian_trace": {"method": "TRACE_METHOD_HUTCHINSON", "max_hvps": 30, "frobenius": True}}
    report = run_analysis(job(files, analyses, per_layer=True, seed=1))
    result = report["results"]["hessian_trace"]
    H = dense_hessian(*stored(files))
    assert result["seeded_eigenpairs"] == 4 and result["hvps"] == 30
    assert abs(result["estimate"] - H.trace().item()) <= 3 * result["stderr"]
    assert abs(result["frobenius_squared"] - (H**2).sum().item()) <= 3 * result["frobenius_squared_stderr"]
    for block, names in load_model(files / "mlp.safetensors").parameter_blocks.items():
        block_result = report["per_layer"][block]["hessian_trace"]
        truth = dense_hessian(*stored(files), param_names=names).trace().item()
        assert block_result["seeded_eigenpairs"] == 4
        assert abs(block_result["estimate"] - truth) <= 3 * block_result["stderr"] + 1e-9
    assert report_message(report_document(report)).results.hessian_trace.seeded_eigenpairs == 4
    # Listed before hessian_eigen, the trace has nothing to seed it with.
    reordered = run_analysis(job(files, dict(reversed(list(analyses.items()))), seed=1))
    assert reordered["results"]["hessian_trace"]["seeded_eigenpairs"] == 0


def test_adaptive_trace_stops_early(files):
    result = run_analysis(job(files, {"hessian_trace": {"relative_tolerance": 0.02}}))["results"]["hessian_trace"]
    assert result["hvps"] < EngineLimits().max_products
    assert result["stderr"] <= 0.02 * abs(result["estimate"])


def test_density(files):
    report = run_analysis(job(files, {"hessian_density": {"lanczos_steps": 20, "num_probes": 6, "grid_points": 500}},
                              per_layer=True))
    result = report["results"]["hessian_density"]
    assert "hessian_density" not in report["per_layer"].get("0", {})
    assert result["hvps"] == 120 and len(result["nodes"]) == len(result["weights"]) == 120
    grid, density = np.array(result["grid"]), np.array(result["density"])
    assert len(grid) == 500 and np.trapezoid(density, grid) == pytest.approx(1.0, abs=1e-4)
    assert len(result["density_stderr"]) == 500 and min(result["density_stderr"]) >= 0
    eigenvalues = torch.linalg.eigvalsh(dense_hessian(*stored(files)))
    nodes = np.array(result["nodes"]).reshape(6, 20)
    weights = np.array(result["weights"]).reshape(6, 20)
    first = (nodes * weights).sum(1)
    assert abs(first.mean() - eigenvalues.mean().item()) <= 3 * first.std(ddof=1) / np.sqrt(6)
    assert result["negative_tolerance"] == 1e-3
    report_message(report_document(report))


@pytest.mark.parametrize("tolerance", [0.0, 1e-3, 1e-2, 1e-1])
def test_negative_and_near_zero_mass_against_the_dense_spectrum(files, tolerance):
    # 53 steps span the 53-parameter model's Krylov spaces, so each probe's rule is exact and
    # only the probes' sampling is left: 30 probes.
    report = run_analysis(job(files, {"hessian_density": {"lanczos_steps": 53, "num_probes": 30,
                                                          "negative_tolerance": tolerance}}, seed=4))
    result = report["results"]["hessian_density"]
    eigenvalues = torch.linalg.eigvalsh(dense_hessian(*stored(files)))
    cut = tolerance * eigenvalues.abs().max().item()
    exact = {"negative_mass": (eigenvalues < -cut).double().mean().item(),
             "near_zero_mass": (eigenvalues.abs() <= cut).double().mean().item()}
    for key, truth in exact.items():
        assert abs(result[key] - truth) <= 0.03, (key, result[key], truth)
        assert abs(result[key] - truth) <= 3 * result[f"{key}_stderr"] + 1e-9, (key, result[key], truth)
    assert result["negative_tolerance"] == tolerance
    assert report_message(report_document(report)).results.hessian_density.negative_tolerance == tolerance


@pytest.mark.parametrize("analyses, words", [
    ({"hessian_trace": {"method": "TRACE_METHOD_GIRARD"}}, "unknown trace method"),
    ({"hessian_trace": {"relative_tolerance": 2.0}}, "relative_tolerance"),
    ({"hessian_trace": {"max_hvps": 10**6}}, "over this server's limit"),
    ({"hessian_trace": {"method": "TRACE_METHOD_HUTCH_PLUS_PLUS", "max_hvps": 2}}, "at least 3"),
    ({"hessian_density": {"lanczos_steps": 100, "num_probes": 100}}, "over this server's limit"),
    ({"hessian_density": {"grid_points": 1}}, "grid_points"),
    ({"hessian_density": {"sigma": 1.5}}, "sigma"),
    ({"hessian_density": {"num_probes": 1}}, "at least 2"),
    ({"hessian_density": {"negative_tolerance": -0.1}}, "negative_tolerance"),
    ({"hessian_density": {"negative_tolerance": float("nan")}}, "negative_tolerance"),
])
def test_bad_options_refused_before_queueing(files, analyses, words):
    with pytest.raises(InvalidInput, match=words):
        validate_job(job(files, analyses), EngineLimits())


def test_defaults(files):
    specs = validate_job(job(files, {"hessian_trace": {"method": "TRACE_METHOD_UNSPECIFIED", "max_hvps": 0},
                                     "hessian_density": {}}), EngineLimits()).specs
    assert asdict(specs["hessian_trace"]) == {"method": "xtrace", "max_products": 100, "relative_tolerance": 0.0, "frobenius": False}
    assert specs["hessian_density"].lanczos_steps == 90 and specs["hessian_density"].num_probes == 10
