"""Worst- and average-case (adaptive) sharpness on a least-squares loss, where
f(w + delta) - f(w) = g.delta + delta^T H delta / 2 exactly, against closed forms."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

from curvscope_service.curvature.measures.adaptive_sharpness import checkpoints, compute_adaptive_sharpness
from curvscope_service.curvature.measures.epsilon_sharpness import PerturbedLoss
from curvscope_service.errors import InvalidInput


@pytest.fixture(scope="module")
def quadratic():
    torch.manual_seed(13)
    d, n = 3, 10
    model = nn.Linear(d, 1, bias=False).double()
    inputs = torch.randn(n, d, dtype=torch.float64) * torch.tensor([2.0, 1.0, 0.5], dtype=torch.float64)
    targets = torch.randn(n, 1, dtype=torch.float64)
    loss_fn = lambda o, t: ((o - t) ** 2).mean()  # noqa: E731
    w = model.weight.detach().reshape(-1)
    h = 2 * inputs.T @ inputs / n
    g = 2 * inputs.T @ (inputs @ w - targets.reshape(-1)) / n
    return model, inputs, targets, loss_fn, w, g, h


def objective(quadratic):
    model, inputs, targets, loss_fn, *_ = quadratic
    return PerturbedLoss(model, inputs, targets, loss_fn)


def gain(g, h, delta):
    return (g @ delta + delta @ h @ delta / 2).item()


def test_worst_case_l2_solves_the_trust_region_problem(quadratic):
    *_, g, h = quadratic
    rho = 0.3
    # max g.d + d^T H d / 2 over ||d|| <= rho: d = (lam I - H)^-1 g with lam > lambda_max, ||d|| = rho.
    top = torch.linalg.eigvalsh(h)[-1].item()
    low, high = top + 1e-12, top + 1e6
    for _ in range(200):
        lam = (low + high) / 2
        d = torch.linalg.solve(lam * torch.eye(3, dtype=torch.float64) - h, g)
        low, high = (lam, high) if d.norm() > rho else (low, lam)
    truth = gain(g, h, d)
    result = compute_adaptive_sharpness(objective(quadratic), rho=rho, steps=200, norm="l2", adaptive=False)
    assert result["value"] == pytest.approx(truth, rel=1e-3)
    assert result["value"] <= truth * (1 + 1e-9)


@pytest.mark.parametrize("adaptive", [False, True])
def test_worst_case_linf_finds_the_best_vertex(quadratic, adaptive):
    *_, w, g, h = quadratic
    rho = 0.05
    scale = w.abs() if adaptive else torch.ones_like(w)
    truth = max(gain(g, h, torch.tensor(s, dtype=torch.float64) * rho * scale)
                for s in itertools.product([-1.0, 1.0], repeat=3))
    result = compute_adaptive_sharpness(objective(quadratic), rho=rho, steps=20, norm="linf", adaptive=adaptive)
    # Sign ascent may stop at a neighbouring vertex: a lower bound of the worst case, close here.
    assert 0.99 * truth <= result["value"] <= truth * (1 + 1e-9)


@pytest.mark.parametrize("norm, variance", [("l2", 1.0), ("linf", 1 / 3)])
def test_average_case_is_half_the_scaled_trace(quadratic, norm, variance):
    model, inputs, _, loss_fn, w, _, h = quadratic
    # Targets fitted exactly: g = 0, so the noise of the linear term does not drown the mean.
    fitted = (inputs @ w).reshape(-1, 1)
    rho = 0.2
    # E[g.d + d^T H d / 2] with d = |w| z, E[z z^T] = variance rho^2 I.
    truth = variance * rho**2 * (w.abs() ** 2 * torch.diagonal(h)).sum().item() / 2
    result = compute_adaptive_sharpness(PerturbedLoss(model, inputs, fitted, loss_fn), rho=rho, steps=4000, norm=norm,
                                        adaptive=True,
                                        average_case=True, seed=1)
    assert abs(result["value"] - truth) <= 4 * result["stderr"]
    assert result["stderr"] < 0.1 * truth


def test_checkpoint_schedule_of_the_reference_code():
    # ceil(0.22 s), then fractions 0.41, 0.57, ... (gaps shrinking by 0.03, at least 0.06).
    assert checkpoints(20)[:2] == [5, 9] and checkpoints(100)[:2] == [22, 41]
    marks = checkpoints(100)
    assert marks == sorted(set(marks)) and marks[-1] >= 99


def test_bad_input(quadratic):
    for kwargs in ({"rho": -1.0}, {"rho": 0.1, "steps": 0}, {"rho": 0.1, "norm": "l1"}):
        with pytest.raises(InvalidInput):
            compute_adaptive_sharpness(objective(quadratic), **kwargs)
