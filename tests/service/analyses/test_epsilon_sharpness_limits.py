"""epsilon_sharpness's random subspace: its size capped before the matrix exists, and the linear
algebra that builds it stopped when the request is cancelled."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from curvscope_service.curvature.measures import epsilon_sharpness
from curvscope_service.curvature.measures.epsilon_sharpness import MAX_SUBSPACE_DIM, PerturbedLoss, compute_epsilon_sharpness
from curvscope_service.engine import EngineLimits, run_analysis, validate_job
from curvscope_service.errors import Cancelled, InvalidInput, ResourceExhausted

from .conftest import job


def test_subspace_dim_cap_before_queueing(files):
    with pytest.raises(InvalidInput, match=f"subspace_dim {MAX_SUBSPACE_DIM + 1} must lie between 0 .* and {MAX_SUBSPACE_DIM}"):
        validate_job(job(files, {"epsilon_sharpness": {"subspace_dim": MAX_SUBSPACE_DIM + 1}}), EngineLimits())
    spec = validate_job(job(files, {"epsilon_sharpness": {"subspace_dim": MAX_SUBSPACE_DIM}}), EngineLimits())
    assert spec.specs["epsilon_sharpness"].subspace_dim == MAX_SUBSPACE_DIM


def test_memory_cap_names_what_fits(files, monkeypatch):
    # the stored MLP has 53 parameters; with 32 optimiser values per variable, 2 columns fit in
    # 8 x (53 + 32) x 2 bytes, 5 do not, nor does the full space (8 x 32 x 53 bytes)
    monkeypatch.setattr(epsilon_sharpness, "MAX_WORKSPACE_BYTES", 8 * (53 + 32) * 2)
    with pytest.raises(ResourceExhausted, match="subspace_dim 5 needs a 53 x 5 float64 matrix .* use subspace_dim 2 or less"):
        run_analysis(job(files, {"epsilon_sharpness": {"subspace_dim": 5}}))
    with pytest.raises(ResourceExhausted, match="full space of 53 parameters .* use a random subspace \\(subspace_dim 2;"):
        run_analysis(job(files, {"epsilon_sharpness": {}}))
    report = run_analysis(job(files, {"epsilon_sharpness": {"subspace_dim": 2, "epsilon": 1e-2}}))
    assert report["results"]["epsilon_sharpness"]["subspace_dim"] == 2


def _objective(check=None) -> PerturbedLoss:
    torch.manual_seed(5)
    model = nn.Linear(40, 1).double()
    inputs, targets = torch.randn(16, 40, dtype=torch.float64), torch.randn(16, 1, dtype=torch.float64)
    return PerturbedLoss(model, inputs, targets, lambda o, t: ((o - t) ** 2).mean(), check=check)


def test_cancelled_while_the_subspace_is_built(monkeypatch):
    monkeypatch.setattr(epsilon_sharpness, "_BLOCK_VALUES", 30)  # 3 rows of 10 columns per block: 14 blocks
    calls = []

    def check():
        calls.append(None)
        if len(calls) == 3:
            raise Cancelled("the analysis was cancelled by the client")

    objective = _objective(check)
    with pytest.raises(Cancelled):
        compute_epsilon_sharpness(objective, epsilon=1e-2, subspace_dim=10)
    assert objective.evaluations == 0  # stopped in the linear algebra, before any loss was evaluated


def test_blockwise_reduction_is_the_pseudo_inverse(monkeypatch):
    monkeypatch.setattr(epsilon_sharpness, "_BLOCK_VALUES", 70)  # uneven blocks of 7 rows
    objective = _objective()
    x = objective.weights.to(torch.float64)
    a, scale = epsilon_sharpness._random_subspace(objective, x, 10, seed=3)
    torch.testing.assert_close(scale, torch.linalg.pinv(a) @ x, rtol=1e-9, atol=1e-12)
    assert a.shape == (41, 10)
