"""The ``hessian_eigen`` analysis: extreme eigenvalues of the loss Hessian by Lanczos."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ...errors import InvalidInput
from ..operators.hessian import HessianOperator
from .lanczos import (BASIS_BUDGET_BYTES, EigenResult, RitzPairs, basis_bytes, default_basis_size, lanczos,
                      lanczos_steps)


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
    None takes ``lanczos.default_basis_size``. ``progress(step, total, current_estimate)`` is
    called after every product with the products so far, the budget ``max_products`` and the
    current largest Ritz value. ``on_ritz``, when given, receives the Ritz pairs behind the
    values (largest then smallest, float64 vectors), e.g. to deflate a trace estimate of the
    same operator.
    """
    _check_request(operator.dim, top_k, bottom_k, tol, max_products)
    on_step = None
    if progress is not None:
        def on_step(products: int, estimate: float) -> None:
            progress(products, max_products, estimate)

    result = lanczos(
        operator.matvec, operator.dim, top_k=top_k, bottom_k=bottom_k, tol=tol, max_products=max_products,
        max_basis=max_basis, seed=seed, dtype=operator.dtype, device=operator.device, on_step=on_step,
        return_eigenvectors=on_ritz is not None, eigenvector_dtype=torch.float64,
    )
    return _report(result, tol, on_ritz)


def compute_block_eigen(
    operator: HessianOperator,
    blocks: Sequence[Sequence[str]],
    *,
    top_k: int = 1,
    bottom_k: int = 0,
    tol: float = 1e-3,
    max_products: int = 500,
    max_basis: int | None = None,
    seed: int = 0,
    budget_bytes: int = BASIS_BUDGET_BYTES,
    progress: Callable[[int, int, int, float], None] | None = None,
    on_ritz: Sequence[Callable[[RitzPairs], None] | None] | None = None,
) -> list[dict]:
    """``compute_hessian_eigen`` of the Hessian of each block alone (``blocks``: lists of the
    operator's parameter names), the solves in lockstep on the whole operator's graph
    (``lockstep_lanczos``): the same report blocks as separate solves on per-block operators,
    with one pass over the data per step for all blocks instead of one per block.
    ``progress(block index, step, total, estimate)``; ``on_ritz[i]`` as compute_hessian_eigen's."""
    sizes = dict(zip(operator.param_names, operator.parameter_sizes))
    dims = [sum(sizes[name] for name in block) for block in blocks]
    for dim in dims:
        _check_request(dim, top_k, bottom_k, tol, max_products)
    callbacks = list(on_ritz) if on_ritz is not None else [None] * len(blocks)

    def products(ids: list[int], vectors: list[torch.Tensor]) -> list[torch.Tensor]:
        return operator.diagonal_block_products([blocks[i] for i in ids], vectors)

    on_step = None
    if progress is not None:
        def on_step(i: int, step: int, estimate: float) -> None:
            progress(i, step, max_products, estimate)

    results = lockstep_lanczos(
        products, dims, budget_bytes=budget_bytes, dtype=operator.dtype, max_basis=max_basis, on_step=on_step,
        return_eigenvectors=[c is not None for c in callbacks], top_k=top_k, bottom_k=bottom_k, tol=tol,
        max_products=max_products, seed=seed, device=operator.device, eigenvector_dtype=torch.float64,
    )
    return [_report(result, tol, callback) for result, callback in zip(results, callbacks)]


def _check_request(dim: int, top_k: int, bottom_k: int, tol: float, max_products: int) -> None:
    if top_k < 0 or bottom_k < 0 or top_k + bottom_k == 0:
        raise InvalidInput(f"ask for at least one eigenvalue, got top_k={top_k}, bottom_k={bottom_k}")
    if max(top_k, bottom_k) > dim:
        raise InvalidInput(f"cannot compute {max(top_k, bottom_k)} eigenvalues of a Hessian over {dim} parameters")
    if not tol > 0:
        raise InvalidInput(f"the tolerance must be positive, got {tol}")
    if max_products < max(top_k, bottom_k):
        raise InvalidInput(f"max_products={max_products} is below the number of eigenvalues asked for")


def _report(result: EigenResult, tol: float, on_ritz: Callable[[RitzPairs], None] | None) -> dict:
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
        # One floor for the whole spectrum (eps of the products' precision times ||H||), given
        # per end so that each residual list is read against its own entry.
        "residual_floor": {"largest": result.residual_floor, "smallest": result.residual_floor},
    }


BlockProducts = Callable[[list[int], list[torch.Tensor]], list[torch.Tensor]]


def lockstep_lanczos(
    products: BlockProducts,
    dims: Sequence[int],
    *,
    budget_bytes: int = BASIS_BUDGET_BYTES,
    dtype: torch.dtype = torch.float32,
    max_basis: int | None = None,
    on_step: Callable[[int, int, float], None] | None = None,
    return_eigenvectors: Sequence[bool] | bool = False,
    **options: Any,
) -> list[EigenResult]:
    """One Lanczos solve per operator, all advanced together: ``products(ids, vectors)`` returns
    A_i v_i for every pending solve i at once (e.g. ``HessianOperator.diagonal_block_products``:
    one pass over the data for all the per-layer Hessians). Each solve is ``lanczos`` with the
    same ``options`` (``top_k``, ``tol``, ``seed``, ...), so the results equal separate solves'.

    Solves run in groups whose bases together fit ``budget_bytes`` (a solve whose own basis is
    larger runs alone), in order. ``on_step(i, products, estimate)`` follows solve i's steps.
    Each result's ``seconds`` is its own bookkeeping plus an equal share of each batched call.
    ``return_eigenvectors``: for every solve, or one flag per solve.
    """
    if isinstance(return_eigenvectors, bool):
        return_eigenvectors = [return_eigenvectors] * len(dims)
    wanted = options.get("top_k", 1) + options.get("bottom_k", 0)
    sizes = [min(dim, max_basis or default_basis_size(dim, wanted, dtype)) for dim in dims]
    results: list[EigenResult | None] = [None] * len(dims)
    group: list[int] = []
    used = 0
    for i, (dim, size) in enumerate(zip(dims, sizes)):
        need = basis_bytes(dim, size, dtype)
        if group and used + need > budget_bytes:
            _run_group(products, group, dims, sizes, dtype, on_step, return_eigenvectors, options, results)
            group, used = [], 0
        group.append(i)
        used += need
    _run_group(products, group, dims, sizes, dtype, on_step, return_eigenvectors, options, results)
    return [r for r in results if r is not None]


def _run_group(products: BlockProducts, group: list[int], dims: Sequence[int], sizes: list[int], dtype: torch.dtype,
               on_step: Callable[[int, int, float], None] | None, eigenvectors: Sequence[bool], options: dict[str, Any],
               results: list[EigenResult | None]) -> None:
    solves = {
        i: lanczos_steps(dims[i], max_basis=sizes[i], dtype=dtype, return_eigenvectors=eigenvectors[i], **options,
                         on_step=None if on_step is None else (lambda k, estimate, i=i: on_step(i, k, estimate)))
        for i in group
    }
    pending = {i: next(solve) for i, solve in solves.items()}
    shared = dict.fromkeys(group, 0.0)
    while pending:
        ids = list(pending)
        start = time.perf_counter()
        outs = products(ids, [pending[i] for i in ids])
        share = (time.perf_counter() - start) / len(ids)
        for i, out in zip(ids, outs):
            shared[i] += share
            try:
                pending[i] = solves[i].send(out)
            except StopIteration as done:
                result: EigenResult = done.value
                result.seconds += shared[i]
                results[i] = result
                del pending[i]
