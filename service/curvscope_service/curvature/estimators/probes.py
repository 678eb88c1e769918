"""What the stochastic trace estimators share: Rademacher probes, block products, statistics.

The estimators (``hutchinson``, ``hutchpp``, ``xtrace``) see the operator only through
``apply``: a block of vectors (dim, k) in the operator's dtype and on its device in, the
products (dim, k) out. ``BlockProducts`` adapts an operator with ``matmat`` to that, cutting wide
blocks so that at most ``block_size`` vectors go through one batched (vmap'd) product, and counts
the products.

Memory at 10M-100M parameters: every dim-long vector stays in the operator's dtype on its
device (float32 halves what float64 would hold, and nothing crosses to the host); only the small
projected matrices (k x k) and the per-probe coefficients are float64. The sketches grow in a
preallocated ``GrowingBasis`` (block Gram-Schmidt, twice, as matrix products), and XTrace keeps
its Rademacher probes as packed sign bits (``PackedSigns``, 1/32 of a float32 block), so an
estimator holds about one basis of its sketch size plus two blocks in flight.

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
    dtype: torch.dtype = torch.float64
    block_size: int = 8
    progress: Progress | None = None
    offset: float = 0.0


class BlockProducts:
    """``apply`` for the estimators: blocks through ``operator.matmat``, at most ``block_size``
    vectors per batched product, in the operator's dtype (a block in another dtype is converted
    on the way in and out)."""

    def __init__(self, operator: CurvatureOperator, block_size: int = 8) -> None:
        self.operator = operator
        self.block_size = block_size
        self.products = 0

    def __call__(self, V: Tensor) -> Tensor:
        dtype = self.operator.dtype
        if V.shape[1] <= self.block_size:
            self.products += V.shape[1]
            return self.operator.matmat(V.to(dtype)).to(V.dtype)
        out = torch.empty_like(V)
        for j in range(0, V.shape[1], self.block_size):
            block = V[:, j : j + self.block_size]
            out[:, j : j + block.shape[1]] = self.operator.matmat(block.to(dtype))
            self.products += block.shape[1]
        return out


def rademacher(generator: torch.Generator, dim: int, k: int, device: torch.device | str,
               dtype: torch.dtype = torch.float64) -> Tensor:
    """k independent Rademacher vectors (entries +-1) as the columns of a (dim, k) block.

    Drawn vector by vector on the CPU generator, so a seed gives the same probes however they
    are blocked and whichever the device.
    """
    return _bits(generator, dim, k).to(device).T.to(dtype).mul_(2).sub_(1)


def _bits(generator: torch.Generator, dim: int, k: int) -> Tensor:
    """(k, dim) int8 entries 0 or 1 (1 = +1): one Rademacher vector per row."""
    return torch.randint(0, 2, (k, dim), generator=generator, dtype=torch.int8)


def column_dots(X: Tensor, Y: Tensor) -> Tensor:
    """x_j^T y_j for each column pair, summed in float64 (a float32 sum over 10^7 entries loses
    digits), on the host."""
    return (X * Y).sum(0, dtype=torch.float64).cpu()


class PackedSigns:
    """Rademacher blocks kept as bits, 8 probes per byte of each coordinate, on the device.

    ``draw(k)`` returns the next k probes as +-1 values in ``dtype`` (the same as ``rademacher``
    from the same generator) and keeps their bits; ``block(i)`` gives the i-th block drawn back,
    so XTrace can revisit its probes for dim * k / 8 bytes instead of a float block.
    """

    def __init__(self, generator: torch.Generator, dim: int, device: torch.device | str, dtype: torch.dtype) -> None:
        self.generator, self.dim, self.device, self.dtype = generator, dim, torch.device(device), dtype
        self.blocks: list[tuple[Tensor, int]] = []
        self._weights = 1 << torch.arange(8, device=self.device, dtype=torch.uint8)

    def draw(self, k: int) -> Tensor:
        bits = _bits(self.generator, self.dim, k).to(self.device).T.to(torch.uint8)  # (dim, k)
        padded = torch.zeros(self.dim, -(-k // 8) * 8, dtype=torch.uint8, device=self.device)
        padded[:, :k] = bits
        packed = (padded.view(self.dim, -1, 8) * self._weights).sum(2, dtype=torch.uint8)
        self.blocks.append((packed, k))
        return bits.to(self.dtype).mul_(2).sub_(1)

    def block(self, index: int) -> Tensor:
        packed, k = self.blocks[index]
        bits = (packed[:, :, None] & self._weights).ne(0).reshape(self.dim, -1)[:, :k]
        return bits.to(self.dtype).mul_(2).sub_(1)


class GrowingBasis:
    """An orthonormal basis Q (dim, up to ``capacity`` columns) of the blocks appended, Y = Q R.

    Q is preallocated in the vectors' dtype on their device; each block is made orthogonal to Q
    by block classical Gram-Schmidt, twice ("twice is enough"), as matrix products, then
    QR-factorised on its own and passed once more (for columns that were dependent), so the only dim-long temporaries have the block's width. R
    (float64, on the host) holds the coefficients, so Y itself need not be kept.
    """

    def __init__(self, dim: int, capacity: int, device: torch.device | str, dtype: torch.dtype) -> None:
        self.Q = torch.empty(dim, capacity, dtype=dtype, device=device)
        self.R = torch.zeros(capacity, capacity, dtype=torch.float64)
        self.size = 0

    @property
    def basis(self) -> Tensor:
        return self.Q[:, : self.size]

    def append(self, Y: Tensor) -> Tensor:
        """Extend by the columns of Y (overwritten); returns the new orthonormal columns (a view)."""
        m, b = self.size, Y.shape[1]
        Q = self.basis
        coefficients = torch.zeros(m, b, dtype=torch.float64)
        for _ in range(2):
            c = Q.T @ Y
            Y.addmm_(Q, c, alpha=-1)
            coefficients += c.to("cpu", torch.float64)
        Q_new, R_new = torch.linalg.qr(Y)
        R_new = R_new.to("cpu", torch.float64)
        if m:
            # A column that lay (numerically) in range(Q) leaves rounding noise, which two passes
            # do not make orthogonal to Q; once normalised, one more pass does.
            c = Q.T @ Q_new
            Q_new.addmm_(Q, c, alpha=-1)
            Q_new, R_again = torch.linalg.qr(Q_new)
            coefficients += c.to("cpu", torch.float64) @ R_new
            R_new = R_again.to("cpu", torch.float64) @ R_new
        self.Q[:, m : m + b] = Q_new
        self.R[:m, m : m + b] = coefficients
        self.R[m : m + b, m : m + b] = R_new
        self.size = m + b
        return self.Q[:, m : m + b]

    def project_out(self, X: Tensor) -> Tensor:
        """(I - Q Q^T) X, in place."""
        Q = self.basis
        return X.addmm_(Q, Q.T @ X, alpha=-1)


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
