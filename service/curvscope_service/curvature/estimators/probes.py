"""What the stochastic trace estimators share: Rademacher probes, block products, statistics.

The estimators (``hutchinson``, ``hutchpp``, ``xtrace``) see the operator only through
``apply``: a float64 block of vectors (dim, k) in, the products (dim, k) out. ``BlockProducts``
adapts an operator with ``matmat`` to that, cutting wide blocks so that at most ``block_size``
vectors go through one batched (vmap'd) product, and counts the products.

Each estimator also gives tr(A^2) = ||A||_F^2 from the same products when asked, because every
product A z it computes is also a sample of ||A z||^2, whose mean is tr(A^2) for Rademacher z.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ..operators.base import CurvatureOperator

Apply = Callable[[Tensor], Tensor]
Progress = Callable[[int, int, float], None]

# An adaptive run trusts its sample standard error only from this many samples on.
MIN_ADAPTIVE_SAMPLES = 10


@dataclass
class TraceEstimate:
    """An estimate of tr(A) with its standard error, and optionally of tr(A^2)."""

    estimate: float
    stderr: float
    method: str
    products: int
    frobenius_squared: float | None = None
    frobenius_squared_stderr: float | None = None
    seconds: float = 0.0
    # Ritz pairs the estimate was deflated with (0: none; see trace.estimate_trace).
    seeded: int = 0


@dataclass(frozen=True)
class TraceSettings:
    """What every estimator takes besides ``apply`` and ``dim``: the budget of products, the
    adaptive stop (0: use the whole budget), whether to estimate tr(A^2) too, the probes' seed and
    device, the probes per block, the progress callback and a constant added to the estimate (the
    deflated part's trace, see trace.estimate_trace)."""

    max_products: int
    relative_tolerance: float = 0.0
    frobenius: bool = False
    seed: int = 0
    device: torch.device | str = "cpu"
    block_size: int = 8
    progress: Progress | None = None
    offset: float = 0.0


class BlockProducts:
    """``apply`` for the estimators: float64 blocks through ``operator.matmat`` in its dtype."""

    def __init__(self, operator: CurvatureOperator, block_size: int = 8) -> None:
        self.operator = operator
        self.block_size = block_size
        self.products = 0

    def __call__(self, V: Tensor) -> Tensor:
        out = torch.empty_like(V)
        for j in range(0, V.shape[1], self.block_size):
            block = V[:, j : j + self.block_size]
            out[:, j : j + block.shape[1]] = self.operator.matmat(block.to(self.operator.dtype)).to(torch.float64)
            self.products += block.shape[1]
        return out


def rademacher(generator: torch.Generator, dim: int, k: int, device: torch.device) -> Tensor:
    """k independent Rademacher vectors (entries +-1), float64, as the columns of a (dim, k) block.

    Drawn vector by vector, so a seed gives the same probes however they are blocked.
    """
    signs = torch.randint(0, 2, (k, dim), generator=generator, dtype=torch.int8)
    return (2.0 * signs - 1.0).to(torch.float64).T.to(device)


def mean_and_stderr(samples: Tensor) -> tuple[float, float]:
    """Sample mean and its standard error (0 with a single sample: nothing to estimate it from)."""
    n = samples.numel()
    mean = samples.mean().item()
    if n < 2:
        return mean, 0.0
    return mean, samples.std(correction=1).item() / math.sqrt(n)


def reached(estimate: float, stderr: float, samples: int, relative_tolerance: float) -> bool:
    """The adaptive stopping rule: stderr <= relative_tolerance |estimate| on enough samples."""
    return relative_tolerance > 0 and samples >= MIN_ADAPTIVE_SAMPLES and stderr <= relative_tolerance * abs(estimate)
