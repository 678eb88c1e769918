"""The naive bound: the product of the layers' operator norms and the activations' slopes.

Dense segments use the exact largest singular value (LAPACK, float64). A segment too large to
unroll uses power iteration on AᵀA through autograd (any padding or stride, since it runs the
layers themselves); that estimate converges from below, so the report says it is an estimate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .network import Network, Segment


@dataclass
class NaiveBound:
    value: float
    layer_norms: list[float]
    exact: bool  # False when a norm came from power iteration


def spectral_norm(segment: Segment, *, tol: float = 1e-10, max_iterations: int = 1000, seed: int = 0) -> tuple[float, bool]:
    """‖A‖₂ of one segment and whether it is exact (dense SVD) rather than a power-iteration estimate."""
    if segment.matrix is not None:
        return float(np.linalg.norm(segment.matrix, 2)), True
    return power_iteration_norm(segment, tol=tol, max_iterations=max_iterations, seed=seed), False


def power_iteration_norm(segment: Segment, *, tol: float = 1e-10, max_iterations: int = 1000, seed: int = 0) -> float:
    """σ_max of the segment's linear part by power iteration on AᵀA (Aᵀ by a vector-Jacobian product)."""
    generator = torch.Generator().manual_seed(seed)
    v = torch.randn(1, *segment.in_shape, dtype=torch.float64, generator=generator)
    v /= v.norm()
    sigma = 0.0
    for _ in range(max_iterations):
        x = v.clone().requires_grad_(True)
        u = segment.linear(x)
        (w,) = torch.autograd.grad(u, x, grad_outputs=u)  # AᵀA v
        norm = float(w.norm())
        if norm == 0.0:
            return 0.0
        new_sigma = math.sqrt(float((v * w).sum()))
        v = (w / norm).detach()
        if abs(new_sigma - sigma) <= tol * new_sigma:
            return new_sigma
        sigma = new_sigma
    return sigma


def naive_bound(network: Network, seed: int = 0) -> NaiveBound:
    norms, exact = [], True
    for segment in network.segments:
        norm, is_exact = spectral_norm(segment, seed=seed)
        norms.append(norm)
        exact &= is_exact
    value = math.prod(norms) * math.prod(a.lipschitz for a in network.activations)
    return NaiveBound(value, norms, exact)
