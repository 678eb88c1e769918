"""Sharpness a = lambda_max(H) and the gradient-descent stability verdict a <= 2 / eta.

Near a minimum, GD with learning rate eta multiplies the error along an eigenvector of H with
eigenvalue lambda by (1 - eta lambda); it stays bounded iff |1 - eta lambda| <= 1, so for the
top eigenvalue a iff a <= 2 / eta (Wu, Ma & E 2018, Sec. 2; the "edge of stability" 2 / eta).
"""

from __future__ import annotations

import math
from collections.abc import Callable

from ...errors import InvalidInput
from ..operators.hessian import HessianOperator
from ..solvers.extreme_eigenvalues import compute_hessian_eigen


def gd_verdict(sharpness: float, learning_rate: float) -> dict:
    """``gd_stable`` and ``margin`` = 2 / eta - a for a learning rate > 0; nothing for 0."""
    if learning_rate < 0 or not math.isfinite(learning_rate):
        raise InvalidInput(f"learning_rate must be a finite non-negative number, got {learning_rate}")
    if learning_rate == 0:
        return {}
    margin = 2 / learning_rate - sharpness
    return {"gd_stable": margin >= 0, "margin": margin}


def compute_sharpness(
    operator: HessianOperator,
    *,
    learning_rate: float = 0.0,
    tol: float = 1e-3,
    max_products: int = 500,
    seed: int = 0,
    earlier_eigen: dict | None = None,
    progress: Callable[[int, int, float], None] | None = None,
) -> dict:
    """The ``sharpness`` report block.

    ``earlier_eigen`` is a ``hessian_eigen`` block of the same operator: its largest eigenvalue
    is reused when it converged to at least this tolerance, so that a request with both pays
    for one solve.
    """
    if (earlier_eigen and earlier_eigen.get("converged") and earlier_eigen.get("largest")
            and earlier_eigen.get("tolerance", math.inf) <= tol):
        value, converged, products, source = float(earlier_eigen["largest"][0]), True, 0, "hessian_eigen"
    else:
        eigen = compute_hessian_eigen(operator, top_k=1, tol=tol, max_products=max_products, seed=seed,
                                      progress=progress)
        value, converged, products, source = eigen["largest"][0], eigen["converged"], eigen["hvps"], "lanczos"
    return {"value": value, "learning_rate": learning_rate, "converged": converged, "hvps": products,
            "source": source, **gd_verdict(value, learning_rate)}
