"""Stochastic Lanczos quadrature (Ghorbani, Krishnan & Xiao, ICML 2019; Lin, Saad & Yang 2016).

For a unit probe v and m Lanczos steps on A from v, the tridiagonal T_m = S diag(theta) S^T gives
a Gauss quadrature rule: nodes theta_j, weights tau_j = S_1j^2 (summing to 1), exact for
polynomials of degree up to 2m - 1:

    v^T f(A) v ~ sum_j tau_j f(theta_j).

With v a normalised Rademacher vector, E[v^T f(A) v] = tr(f(A)) / dim, so the average of the
probes' rules estimates the spectral measure (1/dim) sum_i delta(lambda_i). The probes run in
lockstep so that each step is one batched product of all of them; the Krylov bases are kept in
the vectors' dtype (the operator's) on its device and fully reorthogonalised (classical
Gram-Schmidt, twice), so no ghost eigenvalues; the recurrence coefficients are float64. The
bases of a group of probes take (probes in the group) x (steps + 1) x dim x itemsize bytes, so
the probes run in as many groups as ``basis_budget_bytes`` asks (the memory plan sets it).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .probes import Apply, rademacher

# Default bytes of Krylov bases held at once; probes run in groups that fit.
BASIS_BUDGET_BYTES = 512 << 20
# A Lanczos vector below eps sqrt(dim) ||T|| is rounding: the Krylov space is invariant.
BREAKDOWN = np.finfo(np.float64).eps


@dataclass
class Quadrature:
    """Per-probe Gauss rules: ``nodes`` and ``weights`` of shape (probes, steps), float64.

    A probe whose Krylov space became invariant before ``steps`` (a low-rank operator) has
    an exact shorter rule, padded with zero-weight copies of its last node.
    """

    nodes: Tensor
    weights: Tensor
    products: int


def slq(
    apply: Apply,
    dim: int,
    *,
    steps: int = 90,
    probes: int = 10,
    seed: int = 0,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float64,
    basis_budget_bytes: int = BASIS_BUDGET_BYTES,
    progress: Callable[[int, int, float], None] | None = None,
) -> Quadrature:
    """``probes`` Gauss rules of ``min(steps, dim)`` nodes each; ``apply`` maps (dim, k) blocks of ``dtype``.

    ``progress(products, total, estimate)`` runs after every step, with the running estimate of
    tr(A) / dim (the mean of the probes' first Rayleigh quotients v^T A v).
    """
    if steps < 1 or probes < 1:
        raise ValueError(f"steps and probes must be positive, got {steps} and {probes}")
    device = torch.device(device)
    steps = min(steps, dim)
    group = probe_group(dim, steps, probes, dtype, basis_budget_bytes)
    generator = torch.Generator().manual_seed(seed)
    alpha = np.zeros((probes, steps))
    beta = np.zeros((probes, steps))
    length = np.full(probes, steps)
    products = 0
    for first in range(0, probes, group):
        members = list(range(first, min(first + group, probes)))
        V = torch.zeros(len(members), steps + 1, dim, dtype=dtype, device=device)
        # Drawn group by group in order: the same probes as one draw of all of them.
        V[:, 0] = rademacher(generator, dim, len(members), device, dtype).T.div_(math.sqrt(dim))
        active = list(range(len(members)))
        for j in range(steps):
            rows = [first + r for r in active]
            # A slice is a view; indexing by a list would copy the bases (only after a breakdown).
            everyone = len(active) == len(members)
            basis = V[:, : j + 1] if everyone else V[active, : j + 1]
            W = apply((V[:, j] if everyone else V[active, j]).T).T
            products += len(active)
            h = torch.einsum("akd,ad->ak", basis, W)
            W = W - torch.einsum("akd,ak->ad", basis, h)
            correction = torch.einsum("akd,ad->ak", basis, W)
            W = W - torch.einsum("akd,ak->ad", basis, correction)
            norms = W.norm(dim=1)
            alpha[rows, j] = (h + correction)[:, j].double().cpu().numpy()
            beta[rows, j] = norms.double().cpu().numpy()
            if progress is not None:
                progress(products, probes * steps, float(alpha[: first + len(members), 0].mean()))
            still = []
            for r, row, norm in zip(active, rows, beta[rows, j]):
                scale = max(np.abs(alpha[row, : j + 1]).max(), beta[row, : j + 1].max())
                if j + 1 < steps and norm > BREAKDOWN * math.sqrt(dim) * scale:
                    V[r, j + 1] = W[active.index(r)] / norm
                    still.append(r)
                elif j + 1 < steps:
                    # An invariant Krylov space: this probe's rule is already exact.
                    length[row] = j + 1
            active = still
            if not active:
                break

    nodes = np.zeros((probes, steps))
    weights = np.zeros((probes, steps))
    for p in range(probes):
        m = length[p]
        T = np.diag(alpha[p, :m]) + np.diag(beta[p, : m - 1], 1) + np.diag(beta[p, : m - 1], -1)
        theta, S = np.linalg.eigh(T)
        nodes[p, :m], weights[p, :m] = theta, S[0] ** 2
        nodes[p, m:] = theta[-1]
    return Quadrature(torch.from_numpy(nodes), torch.from_numpy(weights), products)


def probe_group(dim: int, steps: int, probes: int, dtype: torch.dtype, basis_budget_bytes: int) -> int:
    """Probes run in lockstep: as many as ``basis_budget_bytes`` of Krylov bases hold (at least one)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return max(1, min(probes, basis_budget_bytes // (itemsize * (min(steps, dim) + 1) * max(dim, 1))))
