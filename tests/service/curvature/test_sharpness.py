"""Sharpness against the dense Hessian; the GD verdict at 2 / eta; reuse of a converged eigen solve."""

from __future__ import annotations

import pytest
import torch

from curvscope_service.curvature.measures.sharpness import compute_sharpness, gd_verdict
from curvscope_service.curvature.operators.hessian import HessianOperator
from curvscope_service.errors import InvalidInput


def test_sharpness_is_the_top_dense_eigenvalue(case):
    operator = HessianOperator(case.model, case.inputs, case.targets, case.loss_fn)
    a = torch.linalg.eigvalsh(case.hessian)[-1].item()
    result = compute_sharpness(operator, learning_rate=1.0, tol=1e-6)
    assert result["converged"] and result["source"] == "lanczos" and result["hvps"] > 0
    # A residual <= 1e-6 |theta| puts theta within 1e-6 |theta| of an eigenvalue (Bauer-Fike).
    assert result["value"] == pytest.approx(a, rel=1e-6)
    assert result["gd_stable"] == (a <= 2.0) and result["margin"] == pytest.approx(2.0 - result["value"])


def test_gd_verdict_flips_at_two_over_eta():
    assert gd_verdict(3.0, 2 / 3.0 * 0.999)["gd_stable"]
    assert not gd_verdict(3.0, 2 / 3.0 * 1.001)["gd_stable"]
    assert gd_verdict(3.0, 0.0) == {}
    with pytest.raises(InvalidInput):
        gd_verdict(3.0, float("nan"))


def test_reuse_only_a_converged_solve_at_least_as_tight(cnn_case):
    operator = HessianOperator(cnn_case.model, cnn_case.inputs, cnn_case.targets, cnn_case.loss_fn)
    earlier = {"largest": [1.5], "converged": True, "tolerance": 1e-4}
    assert compute_sharpness(operator, earlier_eigen=earlier)["source"] == "hessian_eigen"
    assert operator.products == 0
    for stale in ({**earlier, "converged": False}, {**earlier, "tolerance": 1e-2}):
        assert compute_sharpness(operator, earlier_eigen=stale)["source"] == "lanczos"
