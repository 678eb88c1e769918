"""``hessian_eigen``: the k largest and k smallest eigenvalues by Lanczos."""

from __future__ import annotations

import math
from typing import Any

from ..curvature.hessian_eigen import compute_hessian_eigen
from ..curvature.lanczos import BASIS_BUDGET_BYTES, RitzPairs
from ..errors import InvalidInput
from .base import Analysis, AnalysisContext, EngineLimits

MAX_EIGENVALUES = 100


def normalize(spec: dict[str, Any], limits: EngineLimits) -> dict[str, Any]:
    top_k = int(spec.get("top_k", 0))
    bottom_k = int(spec.get("bottom_k", 0))
    if top_k == 0 and bottom_k == 0:
        top_k = 1
    tolerance = float(spec.get("tolerance", 0.0)) or 1e-3
    max_hvps = int(spec.get("max_hvps", 0)) or limits.max_hvps
    if top_k + bottom_k > MAX_EIGENVALUES:
        raise InvalidInput(f"asked for {top_k + bottom_k} eigenvalues; at most {MAX_EIGENVALUES} per request")
    if not (0.0 < tolerance < 1.0) or math.isnan(tolerance):
        raise InvalidInput(f"tolerance {tolerance} must lie in (0, 1)")
    if max_hvps > limits.max_hvps:
        raise InvalidInput(f"max_hvps {max_hvps} is over this server's limit of {limits.max_hvps}")
    return {"top_k": top_k, "bottom_k": bottom_k, "tolerance": tolerance, "max_hvps": max_hvps}


def run(context: AnalysisContext, spec: dict[str, Any]) -> dict[str, Any]:
    operator = context.operator()

    def keep(ritz: RitzPairs) -> None:
        context.ritz = ritz

    # The Ritz vectors are kept for a later hessian_trace of the same request when they fit in
    # the memory the Lanczos basis itself may take (float64, k vectors of the operator's size).
    fits = 8 * operator.dim * (spec["top_k"] + spec["bottom_k"]) <= BASIS_BUDGET_BYTES
    return compute_hessian_eigen(
        operator, top_k=spec["top_k"], bottom_k=spec["bottom_k"], tol=spec["tolerance"],
        max_hvps=spec["max_hvps"], seed=context.seed,
        progress=lambda step, total, estimate: context.progress("hessian_eigen", step, total, estimate),
        on_ritz=keep if fits else None,
    )


ANALYSIS = Analysis(name="hessian_eigen", normalize=normalize, run=run,
                    curvatures=("hessian", "ggn", "fisher", "empirical_fisher"))
