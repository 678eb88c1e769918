"""The sharpness and non_uniformity analyses through the engine, against dense float64 truths."""

from __future__ import annotations

import math

import pytest
import torch

from curvscope_service.engine import EngineLimits, run_analysis, validate_job
from curvscope_service.errors import InvalidInput, Unimplemented
from curvscope_service.loading import load_data, load_model
from curvscope_service.losses import get_loss
from curvscope_service.requests import report_document, report_message
from dense_reference import dense_hessian

from .conftest import job


def truth(files, names=None, keep=None):
    """(a, s, H, Sigma) from dense per-sample Hessians of the stored model and data."""
    model = load_model(files / "mlp.safetensors", dtype=torch.float64).module
    data = load_data(files / "classes.safetensors", dtype=torch.float64)
    inputs, targets = data.inputs[0], data.targets
    if keep is not None:
        inputs, targets = inputs[keep], targets[keep]
    loss = get_loss("cross_entropy")
    per_sample = torch.stack([dense_hessian(model, inputs[i:i + 1], targets[i:i + 1], loss, names)
                              for i in range(inputs.shape[0])])
    h = per_sample.mean(0)
    sigma = (per_sample @ per_sample).mean(0) - h @ h
    return torch.linalg.eigvalsh(h)[-1].item(), math.sqrt(torch.linalg.eigvalsh(sigma)[-1].item()), h, sigma


def test_sharpness_and_non_uniformity_match_dense(files):
    a, s, h, sigma = truth(files)
    eta, b, n = 0.5 / a, 4, 16
    report = run_analysis(job(files, {
        "sharpness": {"learning_rate": eta},
        "non_uniformity": {"learning_rate": eta, "batch_size": b, "tolerance": 1e-6},
    }))
    sharp, nu = report["results"]["sharpness"], report["results"]["non_uniformity"]
    assert sharp["value"] == pytest.approx(a, rel=1e-3) and sharp["source"] == "lanczos"
    assert sharp["gd_stable"] and sharp["margin"] == pytest.approx(2 / eta - a, rel=1e-3)
    # Solved to residuals <= 1e-6 |theta|: each eigenvalue within 1e-6 relative (Bauer-Fike), s = sqrt
    # of one within 5e-7. The sharpness analysis runs at its own 1e-3 (checked above at that).
    assert nu["value"] == pytest.approx(s, rel=1e-6) and nu["method"] == "exact"
    assert nu["sharpness"] == pytest.approx(a, rel=1e-6)
    eye = torch.eye(h.shape[0], dtype=torch.float64)
    m = (eye - eta * h) @ (eye - eta * h) + eta**2 * (n - b) / (b * (n - 1)) * sigma
    top = torch.linalg.eigvalsh(m)[-1].item()
    assert nu["stability_eigenvalue"] == pytest.approx(top, rel=1e-6)
    # An untrained net has negative curvature, so (1 - eta lambda)^2 > 1: no minimum to stay in.
    assert torch.linalg.eigvalsh(h)[0] < 0 and top > 1.01 and not nu["sgd_stable"]
    assert nu["necessary_conditions_met"] and nu["num_samples"] == n


def test_gd_verdict_flips_at_two_over_a(files):
    a = truth(files)[0]
    below = run_analysis(job(files, {"sharpness": {"learning_rate": 0.99 * 2 / a}}))["results"]["sharpness"]
    above = run_analysis(job(files, {"sharpness": {"learning_rate": 1.01 * 2 / a}}))["results"]["sharpness"]
    assert below["gd_stable"] and not above["gd_stable"] and above["margin"] < 0
    plain = run_analysis(job(files, {"sharpness": {}}))["results"]["sharpness"]
    assert "gd_stable" not in plain and "margin" not in plain


def test_sharpness_reuses_a_converged_hessian_eigen(files):
    report = run_analysis(job(files, {"hessian_eigen": {"top_k": 1, "tolerance": 1e-6},
                                      "sharpness": {}, "non_uniformity": {}}))
    sharp, eigen = report["results"]["sharpness"], report["results"]["hessian_eigen"]
    assert sharp["source"] == "hessian_eigen" and sharp["hvps"] == 0
    assert sharp["value"] == eigen["largest"][0] == report["results"]["non_uniformity"]["sharpness"]
    loose = run_analysis(job(files, {"hessian_eigen": {"top_k": 1, "tolerance": 0.1}, "sharpness": {}}))
    assert loose["results"]["sharpness"]["source"] == "lanczos"


def test_per_layer_gauss_newton_and_subsampling(files):
    report = run_analysis(job(files, {"non_uniformity": {"method": "NON_UNIFORMITY_METHOD_GAUSS_NEWTON"},
                                      "sharpness": {}}, per_layer=True))
    assert report["results"]["non_uniformity"]["method"] == "gauss_newton"
    assert "value_stderr" not in report["results"]["non_uniformity"]  # no per-sample terms on that path
    names = load_model(files / "mlp.safetensors").parameter_blocks
    for block, params in names.items():
        a, _, _, _ = truth(files, params)
        assert report["per_layer"][block]["sharpness"]["value"] == pytest.approx(a, rel=1e-3)
    # max_samples: Sigma from a seeded subsample, n of the criterion stays the data's.
    sub = run_analysis(job(files, {"non_uniformity": {"max_samples": 6, "tolerance": 1e-6}}, seed=3))
    nu = sub["results"]["non_uniformity"]
    keep = torch.randperm(16, generator=torch.Generator().manual_seed(3))[:6].sort().values
    assert nu["sigma_samples"] == 6 and nu["num_samples"] == 16
    assert nu["value"] == pytest.approx(truth(files, keep=keep)[1], rel=1e-6)
    # Its error bar, from the subsample's spread (checked against the formula written out in
    # tests/service/curvature/test_non_uniformity.py); the message carries it.
    assert nu["value_stderr"] > 0
    assert report_message(report_document(sub)).results.non_uniformity.value_stderr == nu["value_stderr"]


def test_progress_events(files):
    events = []
    run_analysis(job(files, {"non_uniformity": {"learning_rate": 0.1, "batch_size": 2}}), progress=events.append)
    mine = [e for e in events if e["analysis"] == "non_uniformity"]
    assert mine and all(0 < e["step"] <= e["total"] for e in mine)


@pytest.mark.parametrize("analyses, error, words", [
    ({"sharpness": {"learning_rate": -1.0}}, InvalidInput, "learning_rate"),
    ({"non_uniformity": {"tolerance": 3.0}}, InvalidInput, "tolerance"),
    ({"non_uniformity": {"max_samples": 1}}, InvalidInput, "max_samples"),
    ({"non_uniformity": {"method": "fisher"}}, InvalidInput, "fisher"),
])
def test_bad_options_refused_before_queueing(files, analyses, error, words):
    with pytest.raises(error, match=words):
        validate_job(job(files, analyses), EngineLimits())


def test_batch_larger_than_data_and_fixed_batch_exports(files):
    with pytest.raises(InvalidInput, match="batch_size 17"):
        run_analysis(job(files, {"non_uniformity": {"learning_rate": 0.1, "batch_size": 17}}))
    fixed = job(files, {"non_uniformity": {}})
    fixed.model_path = files / "mlp-batch8.pt2"
    with pytest.raises(Unimplemented, match="dynamic batch"):
        run_analysis(fixed)
