"""tr(A) of a curvature operator by one of the stochastic estimators, chosen by name.

- ``hutchinson``: Girard-Hutchinson with Rademacher probes, the reference.
- ``hutchpp``: Hutch++ (Meyer, Musco, Musco & Woodruff 2021): a sketch of the top of the spectrum
  taken exactly, Hutchinson on the rest.
- ``xtrace``: XTrace (Epperly, Tropp & Webber 2024): Hutch++'s split made exchangeable, every
  probe used both for the sketch and for the residual.

Seeding with Ritz pairs (``ritz``): when Lanczos already ran on the same operator, its Ritz
vectors Y (orthonormal, dim x k) split the trace without any further product,

    tr(A) = tr(Y^T A Y) + tr((I - P) A (I - P)),   P = Y Y^T,

(the cross terms tr(P A (I - P)) vanish), and tr(Y^T A Y) = sum_i theta_i exactly, converged or
not. The estimator then runs on the deflated operator (I - P) A (I - P), one product per
vector as before, whose variance no longer carries the eigenvalues found; the standard error
is that of the deflated part. For tr(A^2): ||A||_F^2 = ||Y^T A Y||_F^2 + 2 ||(I - P) A Y||_F^2 +
||(I - P) A (I - P)||_F^2 = sum_i theta_i^2 + 2 sum_i r_i^2 + (the estimated rest), with r_i the
Ritz residual norms ((I - P) A y_i = A y_i - theta_i y_i because Y^T A Y = diag(theta)).
"""

from __future__ import annotations

import math
import time

import torch
from torch import Tensor

from ...errors import InvalidInput
from .hutchinson import hutchinson
from ..solvers.lanczos import RitzPairs
from .hutchpp import hutchpp
from ..operators.base import CurvatureOperator
from .probes import Apply, BlockProducts, Progress, TraceEstimate, TraceSettings
from .xtrace import xtrace

ESTIMATORS = {"hutchinson": hutchinson, "hutchpp": hutchpp, "xtrace": xtrace}
METHODS = tuple(ESTIMATORS)
# Fewest products each estimator runs on (Hutch++: sketch, its products, one residual probe).
MIN_PRODUCTS = {"hutchinson": 1, "hutchpp": 3, "xtrace": 2}


def estimate_trace(
    operator: CurvatureOperator,
    *,
    method: str = "xtrace",
    max_products: int = 100,
    relative_tolerance: float = 0.0,
    frobenius: bool = False,
    seed: int = 0,
    block_size: int = 8,
    product_width: int | None = None,
    progress: Progress | None = None,
    ritz: RitzPairs | None = None,
) -> TraceEstimate:
    """tr(A) of ``operator`` (anything with ``matmat``, ``dim``, ``dtype``, ``device``).

    ``max_products`` bounds the operator products; with ``relative_tolerance`` > 0 the estimator
    stops earlier once its standard error is at most that fraction of the (whole) estimate.
    The estimator takes ``block_size`` vectors at a time; they go through the operator
    ``product_width`` at a time (default: the whole block in one batched product).
    ``progress(products, max_products, current estimate)`` runs after every block. ``ritz``:
    Ritz pairs of the same operator (from ``lanczos``) to deflate, see the module docstring;
    ``TraceEstimate.seeded`` is then their number.
    """
    if method not in ESTIMATORS:
        raise InvalidInput(f"unknown trace method '{method}'; choose one of {', '.join(METHODS)}")
    minimum = MIN_PRODUCTS[method]
    if max_products < minimum:
        raise InvalidInput(f"{method} needs at least {minimum} products, got a budget of {max_products}")
    if not (0.0 <= relative_tolerance < 1.0):
        raise InvalidInput(f"relative_tolerance {relative_tolerance} must lie in [0, 1)")
    if block_size < 1 or (product_width is not None and product_width < 1):
        raise InvalidInput(f"block_size and product_width must be positive, got {block_size} and {product_width}")

    start = time.perf_counter()
    apply: Apply = BlockProducts(operator, product_width or block_size)
    counter = apply
    offset = 0.0
    if ritz is not None:
        # One conversion to the vectors' dtype; every projection is then two matrix products.
        Y = _checked_ritz(ritz, operator.dim, operator.dtype).to(operator.device, operator.dtype)
        apply = _deflated(apply, Y)
        offset = math.fsum(ritz.values)
    result = ESTIMATORS[method](apply, operator.dim, TraceSettings(
        max_products=max_products, relative_tolerance=relative_tolerance, frobenius=frobenius, seed=seed,
        device=operator.device, dtype=operator.dtype, block_size=block_size, progress=progress, offset=offset,
    ))
    if ritz is not None:
        result.seeded = len(ritz.values)
        if result.frobenius_squared is not None:
            result.frobenius_squared += math.fsum(t * t for t in ritz.values) + 2 * math.fsum(
                r * r for r in ritz.residuals)
    result.products = counter.products
    result.seconds = time.perf_counter() - start
    return result


# Ritz vectors must be orthonormal to this accuracy for tr(Y^T A Y) = sum theta_i: 1e-8 from a
# float64 Krylov basis, this many rounding units of a coarser one (a float32 basis: 1.2e-4).
RITZ_ORTHONORMALITY = 1e-8
RITZ_ORTHONORMALITY_UNITS = 1000


def _checked_ritz(ritz: RitzPairs, dim: int, dtype: torch.dtype = torch.float64) -> Tensor:
    Y = ritz.vectors
    k = len(ritz.values)
    if Y.dtype != torch.float64 or Y.dim() != 2 or Y.shape != (dim, k) or len(ritz.residuals) != k:
        raise ValueError(f"Ritz vectors must be a float64 ({dim}, {k}) block with {k} values and residuals, "
                         f"got {Y.dtype} {tuple(Y.shape)}")
    gram = Y.T @ Y
    tolerance = max(RITZ_ORTHONORMALITY, RITZ_ORTHONORMALITY_UNITS * torch.finfo(dtype).eps)
    if (gram - torch.eye(k, dtype=Y.dtype, device=Y.device)).abs().max().item() > tolerance:
        raise ValueError("Ritz vectors are not orthonormal")
    return Y


def _deflated(apply: Apply, Y: Tensor) -> Apply:
    """X -> (I - Y Y^T) A (I - Y Y^T) X, one product of A per column."""

    def project(X: Tensor) -> Tensor:
        return X.addmm(Y, Y.T @ X, alpha=-1)

    return lambda X: project(apply(project(X)))
