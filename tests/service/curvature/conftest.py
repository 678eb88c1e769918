"""Small models, data and their dense float64 Hessians, shared by the curvature tests."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor, nn

from dense_reference import dense_hessian

def mse(outputs: Tensor, targets: Tensor) -> Tensor:
    # The value of F.mse_loss, written out: F.mse_loss's forward-mode derivative breaks
    # torch.func.jvp (see test_functional_mse_loss in test_hessian_operator.py).
    return ((outputs - targets) ** 2).mean()


LOSSES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "cross_entropy": nn.functional.cross_entropy,
    "mse": mse,
}


def mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))


def cnn() -> nn.Module:
    model = nn.Sequential(
        nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 2 * 2, 3)
    )
    # Running statistics far from (0, 1), so eval-mode BatchNorm is not the identity.
    model[1].running_mean.uniform_(-0.5, 0.5)
    model[1].running_var.uniform_(0.5, 2.0)
    return model


ARCHITECTURES = {"mlp": (mlp, (1, 2, 3)), "cnn": (cnn, (1, 4, 4))}


@dataclass
class Case:
    """A model in eval mode, a batch, a loss and the dense Hessian of the mean loss."""

    model: nn.Module
    inputs: Tensor
    targets: Tensor
    loss_fn: Callable[[Tensor, Tensor], Tensor]
    hessian: Tensor  # float64, in named_parameters() order

    def to(self, dtype: torch.dtype) -> Case:
        model = copy.deepcopy(self.model).to(dtype)
        targets = self.targets.to(dtype) if self.targets.is_floating_point() else self.targets
        return Case(model, self.inputs.to(dtype), targets, self.loss_fn, self.hessian)


def make_case(architecture: str, loss: str, n: int = 10, seed: int = 0) -> Case:
    torch.manual_seed(seed)
    build, shape = ARCHITECTURES[architecture]
    model = build().double().eval()
    inputs = torch.randn(n, *shape, dtype=torch.float64)
    if loss == "cross_entropy":
        targets = torch.randint(0, 3, (n,))
    else:
        targets = torch.randn(n, 3, dtype=torch.float64)
    loss_fn = LOSSES[loss]
    return Case(model, inputs, targets, loss_fn, dense_hessian(model, inputs, targets, loss_fn))


CASES = [(a, l) for a in ARCHITECTURES for l in LOSSES]


@pytest.fixture(scope="session", params=CASES, ids=lambda p: f"{p[0]}-{p[1]}")
def case(request) -> Case:
    """Every architecture with every loss, float64, built once per session."""
    return make_case(*request.param)


@pytest.fixture(scope="session")
def cnn_case() -> Case:
    """The CNN with BatchNorm and cross-entropy, for checks that need only one model."""
    return make_case("cnn", "cross_entropy")


@pytest.fixture(scope="session")
def hessian_of() -> Callable[..., Tensor]:
    """The dense reference, for blocks and for models built inside a test."""
    return dense_hessian


def relative_error(a: Tensor, b: Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="session")
def rel() -> Callable[[Tensor, Tensor], float]:
    """||a - b|| / ||b||."""
    return relative_error
