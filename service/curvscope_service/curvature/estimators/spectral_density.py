"""The spectral density from quadrature rules: Gaussian broadening onto a grid (Ghorbani,
Krishnan & Xiao 2019; Lin, Saad & Yang 2016), and the negative spectral mass.

The probes' rules (nodes theta_pj, weights tau_pj, each probe's weights summing to 1) are
averaged and every node is widened into a Gaussian of standard deviation sigma * (spectral
range), so the curve is a probability density (it integrates to 1). The negative mass is the
curve's integral below zero, sum tau Phi(-theta / sigma) / probes: the share of the spectrum
that is negative, the saddle signal of Dauphin et al. (2014), smoothed like the curve so that
the cloud of near-zero eigenvalues of trained networks counts by halves, not by the sign of
its rounding.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# Default width: variance 1e-5 (spectral range)^2, the broadening PyHessian uses.
SIGMA = math.sqrt(1e-5)
# The grid reaches this many widths beyond the extreme nodes.
MARGIN = 5.0


def broadened_density(nodes: Tensor, weights: Tensor, *, grid_points: int = 1000,
                      sigma: float = SIGMA) -> dict[str, list[float] | float]:
    """``grid``, ``density`` and ``negative_mass`` from (probes, steps) ``nodes`` and ``weights``."""
    if grid_points < 2:
        raise ValueError(f"grid_points must be at least 2, got {grid_points}")
    if not sigma > 0:
        raise ValueError(f"sigma must be positive, got {sigma}")
    nodes = nodes.to(torch.float64).reshape(-1)
    weights = weights.to(torch.float64).reshape(-1) / weights.shape[0]
    low, high = nodes.min().item(), nodes.max().item()
    # A single point spectrum (A = c I) has no range: widen relative to its magnitude instead.
    width = sigma * ((high - low) or max(abs(high), 1.0))
    grid = torch.linspace(low - MARGIN * width, high + MARGIN * width, grid_points, dtype=torch.float64)
    density = torch.zeros(grid_points, dtype=torch.float64)
    chunk = max(1, (1 << 22) // max(grid_points, 1))
    for start in range(0, nodes.numel(), chunk):
        theta, tau = nodes[start : start + chunk], weights[start : start + chunk]
        z = (grid[:, None] - theta[None, :]) / width
        density += (torch.exp(-0.5 * z * z) * tau).sum(1)
    density /= width * math.sqrt(2 * math.pi)
    negative_mass = (weights * torch.special.ndtr(-nodes / width)).sum().item()
    return {"grid": grid.tolist(), "density": density.tolist(), "negative_mass": negative_mass}
