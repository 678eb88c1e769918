"""compute_hessian_eigen: the report block, its values against the dense Hessian, progress and stopping."""

import json

import pytest
import torch

from curvscope_service.curvature.operators.hessian import HessianOperator
from curvscope_service.curvature.solvers.extreme_eigenvalues import compute_hessian_eigen
from curvscope_service.errors import DeadlineExceeded, InvalidInput


def operator(case, **options) -> HessianOperator:
    return HessianOperator(case.model, case.inputs, case.targets, case.loss_fn, **options)


def test_report_block(case):
    truth = torch.linalg.eigvalsh(case.hessian)
    steps = []
    report = compute_hessian_eigen(
        operator(case), top_k=2, bottom_k=2, tol=1e-9, progress=lambda *event: steps.append(event)
    )
    assert set(report) == {"largest", "smallest", "residuals", "converged", "hvps", "seconds", "tolerance",
                           "residual_floor"}
    # eps(float64) x ||H||, per end; no residual is reported below it.
    floor = torch.finfo(case.hessian.dtype).eps * truth.abs().max().item()
    assert report["residual_floor"]["largest"] == report["residual_floor"]["smallest"] == pytest.approx(floor, rel=1e-6)
    assert min(report["residuals"]["largest"] + report["residuals"]["smallest"]) >= report["residual_floor"]["largest"]
    assert set(report["residuals"]) == {"largest", "smallest"}
    json.dumps(report)  # plain Python numbers only
    assert all(type(x) is float for x in report["largest"] + report["smallest"] + report["residuals"]["largest"])
    assert type(report["hvps"]) is int and type(report["converged"]) is bool
    assert report["converged"] and report["tolerance"] == 1e-9
    assert report["largest"] == pytest.approx(truth.flip(0)[:2].tolist(), rel=1e-6)
    assert report["smallest"] == pytest.approx(truth[:2].tolist(), rel=1e-6)
    assert report["largest"] == sorted(report["largest"], reverse=True)
    assert report["smallest"] == sorted(report["smallest"])
    assert [s for s, _, _ in steps] == list(range(1, report["hvps"] + 1))
    assert all(total == 500 for _, total, _ in steps)
    assert steps[-1][2] == pytest.approx(report["largest"][0])


def test_small_budget_is_reported_as_not_converged(cnn_case):
    report = compute_hessian_eigen(operator(cnn_case), top_k=3, bottom_k=3, tol=1e-12, max_products=6)
    assert report["converged"] is False and report["hvps"] == 6


def test_same_seed_same_report(cnn_case):
    first, second = (compute_hessian_eigen(operator(cnn_case), top_k=2, seed=7) for _ in range(2))
    assert first["largest"] == second["largest"] and first["hvps"] == second["hvps"]


def test_check_stops_the_solve(cnn_case):
    calls = []

    def check() -> None:
        calls.append(1)
        if len(calls) > 4:
            raise DeadlineExceeded("the deadline passed")

    op = operator(cnn_case, check=check)
    with pytest.raises(DeadlineExceeded):
        compute_hessian_eigen(op, top_k=1, tol=1e-12)
    assert op.products < 4


@pytest.mark.parametrize(
    "options", [{"top_k": 0}, {"top_k": -1}, {"top_k": 10_000}, {"tol": 0.0}, {"top_k": 5, "max_products": 2}]
)
def test_invalid_requests(cnn_case, options):
    with pytest.raises(InvalidInput):
        compute_hessian_eigen(operator(cnn_case), **options)
