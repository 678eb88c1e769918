"""tr(A) of a curvature operator by one of the stochastic estimators, chosen by name.

- ``hutchinson``: Girard-Hutchinson with Rademacher probes, the reference.
- ``hutchpp``: Hutch++ (Meyer, Musco, Musco & Woodruff 2021): a sketch of the top of the spectrum
  taken exactly, Hutchinson on the rest.
- ``xtrace``: XTrace (Epperly, Tropp & Webber 2024): Hutch++'s split made exchangeable, every
  probe used both for the sketch and for the residual.
"""

from __future__ import annotations

import time

from ..errors import InvalidInput
from .hutchinson import hutchinson
from .hutchpp import hutchpp
from .trace_probes import BlockProducts, Operator, Progress, TraceEstimate
from .xtrace import xtrace

ESTIMATORS = {"hutchinson": hutchinson, "hutchpp": hutchpp, "xtrace": xtrace}
METHODS = tuple(ESTIMATORS)


def estimate_trace(
    operator: Operator,
    *,
    method: str = "xtrace",
    max_products: int = 100,
    relative_tolerance: float = 0.0,
    frobenius: bool = False,
    seed: int = 0,
    block_size: int = 8,
    progress: Progress | None = None,
) -> TraceEstimate:
    """tr(A) of ``operator`` (anything with ``matmat``, ``dim``, ``dtype``, ``device``).

    ``max_products`` bounds the operator products; with ``relative_tolerance`` > 0 the estimator
    stops earlier once its standard error is at most that fraction of the estimate.
    ``progress(products, max_products, current estimate)`` runs after every block.
    """
    if method not in ESTIMATORS:
        raise InvalidInput(f"unknown trace method '{method}'; choose one of {', '.join(METHODS)}")
    minimum = {"hutchinson": 1, "hutchpp": 3, "xtrace": 2}[method]
    if max_products < minimum:
        raise InvalidInput(f"{method} needs at least {minimum} products, got a budget of {max_products}")
    if not (0.0 <= relative_tolerance < 1.0):
        raise InvalidInput(f"relative_tolerance {relative_tolerance} must lie in [0, 1)")
    if block_size < 1:
        raise InvalidInput(f"block_size must be positive, got {block_size}")

    start = time.perf_counter()
    apply = BlockProducts(operator, block_size)
    result = ESTIMATORS[method](
        apply, operator.dim, max_products=max_products, relative_tolerance=relative_tolerance,
        frobenius=frobenius, seed=seed, device=operator.device, block_size=block_size, progress=progress,
    )
    result.products = apply.products
    result.seconds = time.perf_counter() - start
    return result
