"""Power iteration with deflation, as PyHessian computes top Hessian eigenvalues.

Kept as the reference the Lanczos solver is measured against (benchmarks/bench_eigen.py),
reproducing PyHessian's ``hessian.eigenvalues`` (Yao et al. 2020): for each eigenvalue a
fresh random vector, orthogonalised against the ones found before, is multiplied until the
Rayleigh quotient changes by less than ``tol`` relative to the previous one, at most
``max_iter`` times. Deflation by orthogonalisation finds the largest in magnitude, not
algebraically.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class PowerIterationResult:
    eigenvalues: list[float]
    eigenvectors: list[Tensor]
    products: int
    seconds: float


def power_iteration(
    matvec: Callable[[Tensor], Tensor],
    dim: int,
    *,
    top_n: int = 1,
    tol: float = 1e-3,
    max_iter: int = 100,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> PowerIterationResult:
    """The ``top_n`` eigenvalues of largest magnitude, found one after another."""
    start = time.perf_counter()
    generator = torch.Generator().manual_seed(seed)
    eigenvalues: list[float] = []
    eigenvectors: list[Tensor] = []
    products = 0
    for _ in range(top_n):
        v = torch.randn(dim, generator=generator, dtype=dtype).to(device)
        eigenvalue = None
        for _ in range(max_iter):
            # PyHessian orthonormalises once per iteration against the eigenvectors found so far.
            for u in eigenvectors:
                v = v - (v @ u) * u
            v = v / v.norm()
            Hv = matvec(v)
            products += 1
            estimate = (Hv @ v).item()
            v = Hv / Hv.norm()
            if eigenvalue is not None and abs(eigenvalue - estimate) / (abs(eigenvalue) + 1e-6) < tol:
                break
            eigenvalue = estimate
        eigenvalues.append(eigenvalue)
        eigenvectors.append(v)
    return PowerIterationResult(eigenvalues, eigenvectors, products, time.perf_counter() - start)
