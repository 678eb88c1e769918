"""Keskar et al.'s epsilon-sharpness: exact on a quadratic (the max of a convex loss over a box
sits at a vertex), 0 at eps = 0, growing with eps."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from curvscope_service.curvature.measures.epsilon_sharpness import PerturbedLoss, compute_epsilon_sharpness
from curvscope_service.errors import InvalidInput


def least_squares(d: int = 3, n: int = 10):
    torch.manual_seed(11)
    model = nn.Linear(d, 1, bias=False).double()
    inputs = torch.randn(n, d, dtype=torch.float64)
    targets = torch.randn(n, 1, dtype=torch.float64)
    return model, inputs, targets, lambda o, t: ((o - t) ** 2).mean()


def loss_at(model, inputs, targets, loss_fn, w):
    return loss_fn(inputs @ w.reshape(-1, 1), targets).item()


def test_matches_the_best_vertex_of_the_box():
    model, inputs, targets, loss_fn = least_squares()
    x = model.weight.detach().reshape(-1)
    eps = 0.05
    bound = eps * (x.abs() + 1)
    base = loss_at(model, inputs, targets, loss_fn, x)
    best = max(loss_at(model, inputs, targets, loss_fn, x + torch.tensor(signs, dtype=torch.float64) * bound)
               for signs in itertools.product([-1.0, 1.0], repeat=3))
    result = compute_epsilon_sharpness(PerturbedLoss(model, inputs, targets, loss_fn), epsilon=eps, max_iterations=50)
    assert result["value"] == pytest.approx(100 * (best - base) / (1 + base), rel=1e-6)
    assert result["loss"] == pytest.approx(base) and result["max_loss"] == pytest.approx(best, rel=1e-9)


def test_zero_at_zero_and_growing_with_epsilon(cnn_case):
    objective = lambda: PerturbedLoss(cnn_case.model, cnn_case.inputs, cnn_case.targets, cnn_case.loss_fn)  # noqa: E731
    assert compute_epsilon_sharpness(objective(), epsilon=0.0)["value"] == 0.0
    values = [compute_epsilon_sharpness(objective(), epsilon=eps)["value"] for eps in (1e-4, 1e-3, 1e-2)]
    assert 0 < values[0] < values[1] < values[2]


def test_random_subspace_is_seeded_and_bounded(cnn_case):
    objective = lambda: PerturbedLoss(cnn_case.model, cnn_case.inputs, cnn_case.targets, cnn_case.loss_fn)  # noqa: E731
    first = compute_epsilon_sharpness(objective(), epsilon=1e-2, subspace_dim=5, seed=1)
    again = compute_epsilon_sharpness(objective(), epsilon=1e-2, subspace_dim=5, seed=1)
    other = compute_epsilon_sharpness(objective(), epsilon=1e-2, subspace_dim=5, seed=2)
    assert first["value"] == again["value"] != other["value"] and first["value"] > 0
    assert first["subspace_dim"] == 5


def test_bad_input():
    objective = PerturbedLoss(*least_squares())
    for kwargs in ({"epsilon": -1.0}, {"subspace_dim": 4}, {"max_iterations": 0}):
        with pytest.raises(InvalidInput):
            compute_epsilon_sharpness(objective, **kwargs)
