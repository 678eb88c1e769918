"""A lower bound on the ℓ2 Lipschitz constant: the largest input-Jacobian spectral norm found.

Every ‖J_f(x)‖₂ at a point where f is differentiable is at most L(f), so the maximum over any set
of points is a lower bound. The points: the data, then gradient ascent on ‖J(x)‖₂ from the best
of them. A ReLU network's Jacobian is piecewise constant, so the ascent runs on a copy whose
ReLUs are softplus with a sharpness annealed upwards; the value reported is always the exact
Jacobian of the real model, evaluated at every point the ascent visits at the end of a stage.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .network import Network

JACOBIAN_MAX_ENTRIES = 4_000_000


@dataclass
class LowerBound:
    value: float
    from_data: float  # the best data point alone
    ascent_steps: int


def jacobian_norms(module: Callable[[torch.Tensor], torch.Tensor], inputs: torch.Tensor, chunk: int = 64) -> torch.Tensor:
    """‖J_f(x)‖₂ for each sample of ``inputs`` (exact Jacobians, float64)."""
    norms = []
    for start in range(0, inputs.shape[0], chunk):
        batch = inputs[start:start + chunk]
        norms.append(torch.linalg.matrix_norm(_jacobians(module, batch), ord=2))
    return torch.cat(norms)


def _jacobians(f: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, create_graph: bool = False) -> torch.Tensor:
    # (batch, out, in): the samples are independent, so one backward pass per output
    # coordinate of the summed outputs gives every sample's Jacobian row at once.
    x = x if x.requires_grad else x.detach().requires_grad_(True)
    out = f(x).reshape(x.shape[0], -1)
    if out.shape[1] * x[0].numel() > JACOBIAN_MAX_ENTRIES:
        raise ValueError("the input-output Jacobian is too large to form")
    rows = []
    for k in range(out.shape[1]):
        (g,) = torch.autograd.grad(out[:, k].sum(), x, retain_graph=True, create_graph=create_graph)
        rows.append(g.reshape(x.shape[0], -1))
    return torch.stack(rows, dim=1)


def lower_bound(
    module: nn.Module, network: Network | None, inputs: torch.Tensor, *, steps: int = 60, starts: int = 8,
    seed: int = 0, check: Callable[[], None] | None = None,
) -> LowerBound:
    """The largest exact Jacobian norm over the data and over an ascent from its best points."""
    inputs = inputs.detach().to(torch.float64)
    data_norms = jacobian_norms(module, inputs)
    best = float(data_norms.max())
    if network is None or steps == 0:
        return LowerBound(best, best, 0)
    torch.manual_seed(seed)
    order = data_norms.argsort(descending=True)[:starts]
    x = inputs[order].clone().requires_grad_(True)
    scale = float(inputs.std()) or 1.0
    optimizer = torch.optim.Adam([x], lr=0.02 * scale)
    stages = 3
    # sharpness of the softplus in units of the pre-activations' scale: smooth first, sharp last
    for stage in range(stages):
        sharpness = (4.0 * 4.0 ** stage) / scale
        for _ in range(max(1, steps // stages)):
            if check is not None:
                check()
            optimizer.zero_grad()
            jac = _jacobians(lambda z: network.forward(z, smooth=sharpness), x, create_graph=True)
            objective = -torch.linalg.matrix_norm(jac, ord=2).sum()
            objective.backward()
            optimizer.step()
        best = max(best, float(jacobian_norms(module, x.detach()).max()))
    return LowerBound(best, float(data_norms.max()), steps)
