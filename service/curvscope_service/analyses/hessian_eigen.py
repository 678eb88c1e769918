"""``hessian_eigen``: the k largest and k smallest eigenvalues by Lanczos."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from ..curvature.operators.curvatures import CURVATURES
from ..curvature.operators.hessian import HessianOperator
from ..curvature.solvers.extreme_eigenvalues import compute_block_eigen, compute_hessian_eigen
from ..curvature.solvers.lanczos import BASIS_BUDGET_BYTES, RitzPairs
from ..errors import InvalidInput
from .base import Analysis, AnalysisContext, EngineLimits

MAX_EIGENVALUES = 100


@dataclass(frozen=True)
class HessianEigenSpec:
    """The request's options; zeros ask for the defaults."""

    top_k: int = 0
    bottom_k: int = 0
    tolerance: float = 0.0
    max_products: int = 0


def normalize(spec: HessianEigenSpec, limits: EngineLimits) -> HessianEigenSpec:
    top_k, bottom_k = spec.top_k, spec.bottom_k
    if top_k == 0 and bottom_k == 0:
        top_k = 1
    tolerance = spec.tolerance or 1e-3
    max_products = spec.max_products or limits.max_products
    if top_k + bottom_k > MAX_EIGENVALUES:
        raise InvalidInput(f"asked for {top_k + bottom_k} eigenvalues; at most {MAX_EIGENVALUES} per request")
    if not (0.0 < tolerance < 1.0) or math.isnan(tolerance):
        raise InvalidInput(f"tolerance {tolerance} must lie in (0, 1)")
    if max_products > limits.max_products:
        raise InvalidInput(f"max_hvps {max_products} is over this server's limit of {limits.max_products}")
    return replace(spec, top_k=top_k, tolerance=tolerance, max_products=max_products)


def run(context: AnalysisContext, spec: HessianEigenSpec) -> dict[str, Any]:
    operator = context.operator()

    def keep(ritz: RitzPairs) -> None:
        context.ritz = ritz

    # The Ritz vectors are kept for a later hessian_trace of the same request when they fit in
    # the memory the Lanczos basis itself may take (float64, k vectors of the operator's size).
    fits = 8 * operator.dim * (spec.top_k + spec.bottom_k) <= BASIS_BUDGET_BYTES
    return compute_hessian_eigen(
        operator, top_k=spec.top_k, bottom_k=spec.bottom_k, tol=spec.tolerance,
        max_products=spec.max_products, max_basis=_planned_basis(context), seed=context.seed,
        progress=lambda step, total, estimate: context.progress("hessian_eigen", step, total, estimate),
        on_ritz=keep if fits else None,
    )


def run_per_layer(context: AnalysisContext, blocks: dict[str, AnalysisContext], spec: HessianEigenSpec) -> dict[str, dict[str, Any]]:
    """``run`` on every parameter block (``blocks``: block name -> ``context.for_block(...)``),
    for the Hessian in lockstep: each step multiplies every pending block's vector against the
    whole model's gradient graph, built once (``compute_block_eigen``), instead of a graph and a
    pass over the data per block. Same seeds and products as separate ``run`` calls, hence the
    same results. Other curvatures solve block by block."""
    operator = context.operator()
    if not isinstance(operator, HessianOperator):
        return {block: run(block_context, spec) for block, block_context in blocks.items()}
    names = list(blocks)
    params = [blocks[name].param_names or [] for name in names]
    sizes = dict(zip(operator.param_names, operator.parameter_sizes))
    wanted = spec.top_k + spec.bottom_k

    def keeper(block_context: AnalysisContext):
        def keep(ritz: RitzPairs) -> None:
            block_context.ritz = ritz
        return keep

    reports = compute_block_eigen(
        operator, params, top_k=spec.top_k, bottom_k=spec.bottom_k, tol=spec.tolerance,
        max_products=spec.max_products, seed=context.seed,
        progress=lambda i, step, total, estimate: blocks[names[i]].progress("hessian_eigen", step, total, estimate),
        on_ritz=[keeper(blocks[name]) if 8 * sum(sizes[p] for p in block) * wanted <= BASIS_BUDGET_BYTES else None
                 for name, block in zip(names, params)],
    )
    return dict(zip(names, reports))


def _planned_basis(context: AnalysisContext) -> int | None:
    """The basis length the memory plan chose for this context (None: the solver's default)."""
    plan = getattr(context, "plan", None)
    return plan("hessian_eigen").get("basis_size") if plan is not None else None


ANALYSIS = Analysis(name="hessian_eigen", spec=HessianEigenSpec, normalize=normalize, run=run,
                    curvatures=tuple(CURVATURES))
