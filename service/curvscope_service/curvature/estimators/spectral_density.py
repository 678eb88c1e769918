"""The spectral density from quadrature rules: Gaussian broadening onto a grid (Ghorbani,
Krishnan & Xiao 2019; Lin, Saad & Yang 2016), with a band from the spread over the probes, and
the spectral masses below and around zero.

The probes' rules (nodes theta_pj, weights tau_pj, each probe's weights summing to 1) are
averaged and every node is widened into a Gaussian of standard deviation sigma * (spectral
range), so the curve is a probability density (it integrates to 1). Each probe's own curve is
an independent estimate of the same density, so their standard deviation over sqrt(probes) is
the curve's standard error at every grid point.

The masses are not broadened: a trained network's cloud of eigenvalues around zero is narrower
than the broadening, which would put half of it below zero. ``negative_mass`` counts the weight
of the nodes below -tolerance * max|lambda| and ``near_zero_mass`` of those within
tolerance * max|lambda| of zero; max|lambda| is the largest |node| (the extreme Ritz values of
Lanczos converge first, from inside the spectrum).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# Default width: variance 1e-5 (spectral range)^2, the broadening PyHessian uses.
SIGMA = math.sqrt(1e-5)
# The grid reaches this many widths beyond the extreme nodes.
MARGIN = 5.0
# Eigenvalues within this fraction of max|lambda| of zero count as zero, not as negative.
NEGATIVE_TOLERANCE = 1e-3
# Grid points x nodes evaluated at once.
CHUNK_ELEMENTS = 1 << 22


def _stderr(samples: Tensor) -> Tensor:
    """Standard error of the mean over the first dimension (the probes)."""
    return samples.std(dim=0, correction=1) / math.sqrt(samples.shape[0])


def broadened_density(nodes: Tensor, weights: Tensor, *, grid_points: int = 1000,
                      sigma: float = SIGMA) -> dict[str, list[float]]:
    """``grid``, ``density`` and ``density_stderr`` from (probes, steps) ``nodes`` and ``weights``;
    the standard error needs at least two probes."""
    if grid_points < 2:
        raise ValueError(f"grid_points must be at least 2, got {grid_points}")
    if not sigma > 0:
        raise ValueError(f"sigma must be positive, got {sigma}")
    if nodes.ndim != 2 or nodes.shape[0] < 2:
        raise ValueError(f"the density's band needs (probes, steps) nodes with at least two probes, got {tuple(nodes.shape)}")
    nodes, weights = nodes.to(torch.float64), weights.to(torch.float64)
    probes, steps = nodes.shape
    low, high = nodes.min().item(), nodes.max().item()
    # A single point spectrum (A = c I) has no range: widen relative to its magnitude instead.
    width = sigma * ((high - low) or max(abs(high), 1.0))
    grid = torch.linspace(low - MARGIN * width, high + MARGIN * width, grid_points, dtype=torch.float64)
    total = torch.zeros(grid_points, dtype=torch.float64)
    squares = torch.zeros(grid_points, dtype=torch.float64)
    group = max(1, CHUNK_ELEMENTS // (grid_points * steps))
    for start in range(0, probes, group):
        theta, tau = nodes[start : start + group], weights[start : start + group]
        z = (grid[None, :, None] - theta[:, None, :]) / width
        curves = (torch.exp(-0.5 * z * z) * tau[:, None, :]).sum(2) / (width * math.sqrt(2 * math.pi))
        total += curves.sum(0)
        squares += (curves * curves).sum(0)
    density = total / probes
    variance = ((squares - probes * density * density) / (probes - 1)).clamp_min(0.0)
    return {"grid": grid.tolist(), "density": density.tolist(),
            "density_stderr": (variance / probes).sqrt().tolist()}


def spectral_masses(nodes: Tensor, weights: Tensor, *, tolerance: float = NEGATIVE_TOLERANCE) -> dict[str, float]:
    """The share of the spectrum below -tolerance * max|lambda| (``negative_mass``) and within
    tolerance * max|lambda| of zero (``near_zero_mass``), each the mean of the probes' rules with
    its standard error over them (at least two probes)."""
    if not tolerance >= 0:
        raise ValueError(f"tolerance must be non-negative, got {tolerance}")
    if nodes.ndim != 2 or nodes.shape[0] < 2:
        raise ValueError(f"the masses' standard errors need at least two probes, got {tuple(nodes.shape)}")
    nodes, weights = nodes.to(torch.float64), weights.to(torch.float64)
    cut = tolerance * nodes.abs().max().item()
    negative = (weights * (nodes < -cut)).sum(1)
    near_zero = (weights * (nodes.abs() <= cut)).sum(1)
    return {"negative_mass": negative.mean().item(), "negative_mass_stderr": _stderr(negative).item(),
            "near_zero_mass": near_zero.mean().item(), "near_zero_mass_stderr": _stderr(near_zero).item(),
            "negative_tolerance": float(tolerance)}
