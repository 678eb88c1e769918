"""The ``hessian_eigen`` analysis: extreme eigenvalues of the loss Hessian by Lanczos."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ...errors import InvalidInput
from ..operators.hessian import HessianOperator
from .lanczos import RitzPairs, lanczos


def compute_hessian_eigen(
    operator: HessianOperator,
    *,
    top_k: int = 1,
    bottom_k: int = 0,
    tol: float = 1e-3,
    max_products: int = 500,
    max_basis: int | None = None,
    seed: int = 0,
    progress: Callable[[int, int, float], None] | None = None,
    on_ritz: Callable[[RitzPairs], None] | None = None,
) -> dict:
    """The report block: the ``top_k`` largest and ``bottom_k`` smallest Hessian eigenvalues.

    ``max_basis`` bounds the Lanczos basis, hence the solver's memory (``lanczos.basis_bytes``);
    None takes ``lanczos.default_basis_size``. ``progress(step, total, current_estimate)`` is called after every product with the
    products so far, the budget ``max_products`` and the current largest Ritz value. ``on_ritz``,
    when given, receives the Ritz pairs behind the values (largest then smallest, float64
    vectors), e.g. to deflate a trace estimate of the same operator.
    """
    if top_k < 0 or bottom_k < 0 or top_k + bottom_k == 0:
        raise InvalidInput(f"ask for at least one eigenvalue, got top_k={top_k}, bottom_k={bottom_k}")
    if max(top_k, bottom_k) > operator.dim:
        raise InvalidInput(
            f"cannot compute {max(top_k, bottom_k)} eigenvalues of a Hessian over {operator.dim} parameters"
        )
    if not tol > 0:
        raise InvalidInput(f"the tolerance must be positive, got {tol}")
    if max_products < max(top_k, bottom_k):
        raise InvalidInput(f"max_products={max_products} is below the number of eigenvalues asked for")

    on_step = None
    if progress is not None:
        def on_step(products: int, estimate: float) -> None:
            progress(products, max_products, estimate)

    result = lanczos(
        operator.matvec,
        operator.dim,
        top_k=top_k,
        bottom_k=bottom_k,
        tol=tol,
        max_products=max_products,
        max_basis=max_basis,
        seed=seed,
        dtype=operator.dtype,
        device=operator.device,
        on_step=on_step,
        return_eigenvectors=on_ritz is not None,
        eigenvector_dtype=torch.float64,
    )
    if on_ritz is not None and result.eigenvectors is not None:
        largest, smallest = result.eigenvectors
        on_ritz(RitzPairs(
            values=result.largest + result.smallest,
            vectors=torch.stack(largest + smallest, dim=1),
            residuals=result.largest_residuals + result.smallest_residuals,
        ))
    return {
        "largest": result.largest,
        "smallest": result.smallest,
        "residuals": {"largest": result.largest_residuals, "smallest": result.smallest_residuals},
        "converged": result.converged,
        "hvps": result.products,
        "seconds": result.seconds,
        "tolerance": float(tol),
    }
