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
# Rows of a block taken at a time by ``gram`` (converted to float64: 2 MiB per column) and ``column_dots``.
GRAM_ROWS = 1 << 18


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
    digits) a slice of rows at a time (no block-sized temporary), on the host."""
    dots = torch.zeros(X.shape[1], dtype=torch.float64, device=X.device)
    scratch = torch.empty(min(GRAM_ROWS, X.shape[0]), X.shape[1], dtype=X.dtype, device=X.device)
    for x, y in zip(X.split(GRAM_ROWS), Y.split(GRAM_ROWS)):
        product = torch.mul(x, y, out=scratch[: x.shape[0]])
        dots += product.sum(0, dtype=torch.float64)
    return dots.cpu()


class PackedSigns:
    """Rademacher blocks kept as bits, 8 probes per byte of each coordinate, on the device.

    ``draw(k)`` returns the next k probes as +-1 values in ``dtype`` (the same as ``rademacher``
    from the same generator, stored column by column) and keeps their bits; ``block(i)`` gives
    the i-th block drawn back, so XTrace can revisit its probes for dim * k / 8 bytes instead of
    a float block.
    """

    def __init__(self, generator: torch.Generator, dim: int, device: torch.device | str, dtype: torch.dtype) -> None:
        self.generator, self.dim, self.device, self.dtype = generator, dim, torch.device(device), dtype
        self.blocks: list[tuple[Tensor, int]] = []
        self._weights = 1 << torch.arange(8, device=self.device, dtype=torch.uint8)

    def draw(self, k: int) -> Tensor:
        bits = _bits(self.generator, self.dim, k).to(self.device).to(torch.uint8)  # (k, dim)
        padded = torch.zeros(-(-k // 8) * 8, self.dim, dtype=torch.uint8, device=self.device)
        padded[:k] = bits
        packed = (padded.view(-1, 8, self.dim) * self._weights[:, None]).sum(1, dtype=torch.uint8)
        self.blocks.append((packed, k))
        return self._signs(bits)

    def columns(self, index: int) -> slice:
        """Where the i-th block drawn stands among all the probes (the blocks drawn before it,
        side by side)."""
        start = sum(k for _, k in self.blocks[:index])
        return slice(start, start + self.blocks[index][1])

    def block(self, index: int) -> Tensor:
        packed, k = self.blocks[index]
        return self._signs((packed[:, None] & self._weights[:, None]).ne(0).reshape(-1, self.dim)[:k])

    def _signs(self, bits: Tensor) -> Tensor:
        """(k, dim) booleans as the (dim, k) block of +-1, stored column by column."""
        return bits.to(self.dtype).mul_(2).sub_(1).T


class GrowingBasis:
    """An orthonormal basis Q (dim, up to ``capacity`` columns) of the blocks appended, Y = Q R.

    Q is preallocated in the vectors' dtype on their device, stored column by column (each
    basis vector contiguous, so the products with Q are fast matrix products: a row-major
    basis made them 4-14x slower at 5M entries). Each block is made orthogonal to Q by block
    classical Gram-Schmidt, twice ("twice is enough"), as matrix products, then orthonormalised
    on its own by CholeskyQR2 written straight into Q: the Gram matrices are summed in float64
    (``gram``), where a float32 Householder QR of 20M rows measured an orthogonality error of
    1.3e-2 (CholeskyQR2: 3e-7), and the only dim-long temporary is the block itself. A column
    that lay (numerically) in range(Q) leaves rounding noise, which the passes do not make
    orthogonal to Q; once normalised, one more pass does: it runs when a pivot of the block's R
    fell below ``DEPENDENT`` times the column's norm. A block Cholesky cannot factor (a rank
    deficient one) goes through Householder QR instead. R (float64, on the host) holds the
    coefficients, so Y itself need not be kept.
    """

    # A pivot this small next to its column's norm means the column was (nearly) in range(Q):
    # the rounding left along Q, up to eps |y|, would be amplified past eps / DEPENDENT.
    DEPENDENT = 1e-2

    def __init__(self, dim: int, capacity: int, device: torch.device | str, dtype: torch.dtype) -> None:
        self.Q = torch.empty(capacity, dim, dtype=dtype, device=device).T
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
        for _ in range(2 if m else 0):
            c = Q.T @ Y
            Y.addmm_(Q, c, alpha=-1)
            coefficients += c.to("cpu", torch.float64)
        new = self.Q[:, m : m + b]
        R_new = _orthonormalise(Y, new, Y)
        # |y|^2 = |its part in range(Q)|^2 + |the rest|^2, the rest being new R_new.
        norms = (coefficients.square().sum(0) + R_new.square().sum(0)).sqrt()
        if m and (R_new.diagonal().abs() < self.DEPENDENT * norms).any():
            c = Q.T @ new
            new.addmm_(Q, c, alpha=-1)
            coefficients += c.to("cpu", torch.float64) @ R_new
            R_new = _orthonormalise(new, new, Y) @ R_new
        self.R[:m, m : m + b] = coefficients
        self.R[m : m + b, m : m + b] = R_new
        self.size = m + b
        return new

    def project_out(self, X: Tensor) -> Tensor:
        """(I - Q Q^T) X, in place."""
        Q = self.basis
        return X.addmm_(Q, Q.T @ X, alpha=-1)


def gram(X: Tensor) -> Tensor:
    """X^T X summed in float64, a slice of rows at a time (so no float64 copy of X is made),
    on the host."""
    G = torch.zeros(X.shape[1], X.shape[1], dtype=torch.float64, device=X.device)
    # One scratch block for every slice: a fresh one per slice costs page faults each time (the
    # allocator hands blocks this large straight back to the system).
    scratch = torch.empty(min(GRAM_ROWS, X.shape[0]), X.shape[1], dtype=torch.float64, device=X.device)
    for rows in X.split(GRAM_ROWS):
        rows = scratch[: rows.shape[0]].copy_(rows)
        G.addmm_(rows.T, rows)
    return G.cpu()


def _orthonormalise(X: Tensor, out: Tensor, scratch: Tensor) -> Tensor:
    """Write an orthonormal basis of X's columns into ``out`` (X itself allowed) and return R
    (float64, host) with X = out R: CholeskyQR2, or Householder QR where a Gram matrix is not
    numerically positive definite. ``scratch``, a block of X's shape (X itself allowed), takes
    the product when the source is ``out``; its contents are lost."""
    R = torch.eye(X.shape[1], dtype=torch.float64)
    source = X
    for _ in range(2):
        factor, info = torch.linalg.cholesky_ex(gram(source), upper=True)
        if info.item() != 0:
            break
        target = out if source is not out else scratch
        inverse = torch.linalg.solve_triangular(factor, torch.eye(len(factor), dtype=torch.float64), upper=True)
        torch.mm(source, inverse.to(X.device, X.dtype), out=target)
        if target is not out:
            out.copy_(target)
        source, R = out, factor @ R
    else:
        return R
    # Householder on what is left (X itself on the first pass, out after one Cholesky pass).
    Q_h, R_h = torch.linalg.qr(source)
    out.copy_(Q_h)
    return R_h.to("cpu", torch.float64) @ R


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
