"""``hessian_trace``: tr(H) (and optionally tr(H^2)) by XTrace, Hutch++ or Hutchinson.

When ``hessian_eigen`` ran earlier in the same request on the same operator, its Ritz pairs
seed the estimate: their values are taken exactly and the estimator runs on the deflated
operator (``curvature/estimators/trace.py``); ``seeded_eigenpairs`` in the result says how many.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Any

from ..curvature.estimators.trace import MIN_PRODUCTS, estimate_trace
from ..curvature.operators.curvatures import CURVATURES
from ..errors import InvalidInput
from .base import Analysis, AnalysisContext, EngineLimits

# XTrace measured best at equal products (benchmarks/bench_trace.py).
DEFAULT_METHOD = "xtrace"
# Products of a fixed-budget run; an adaptive run may use up to the server's max_hvps.
DEFAULT_PRODUCTS = 100
# Probes per batched product when the memory plan does not lower it.
DEFAULT_BLOCK = 8


class TraceMethod(StrEnum):
    """The API's TraceMethod (member names) as the estimators' names (values)."""

    HUTCHINSON = "hutchinson"
    HUTCH_PLUS_PLUS = "hutchpp"
    XTRACE = "xtrace"


@dataclass(frozen=True)
class HessianTraceSpec:
    """The request's options; zeros and None ask for the defaults."""

    method: TraceMethod | None = None
    max_products: int = 0
    relative_tolerance: float = 0.0
    frobenius: bool = False


def normalize(spec: HessianTraceSpec, limits: EngineLimits) -> HessianTraceSpec:
    method = spec.method or TraceMethod(DEFAULT_METHOD)
    tolerance = spec.relative_tolerance
    if not (0.0 <= tolerance < 1.0) or math.isnan(tolerance):
        raise InvalidInput(f"relative_tolerance {tolerance} must lie in [0, 1) (0 = use the whole budget)")
    max_products = spec.max_products or (
        limits.max_products if tolerance else min(DEFAULT_PRODUCTS, limits.max_products))
    if max_products > limits.max_products:
        raise InvalidInput(f"max_hvps {max_products} is over this server's limit of {limits.max_products}")
    minimum = MIN_PRODUCTS[method]
    if max_products < minimum:
        raise InvalidInput(f"{method} needs max_hvps of at least {minimum}, got {max_products}")
    return replace(spec, method=method, max_products=max_products)


def run(context: AnalysisContext, spec: HessianTraceSpec) -> dict[str, Any]:
    result = estimate_trace(
        context.operator(), method=spec.method, max_products=spec.max_products,
        relative_tolerance=spec.relative_tolerance, frobenius=spec.frobenius, seed=context.seed,
        block_size=context.plan("hessian_trace").get("block_size", DEFAULT_BLOCK),
        product_width=context.plan("hessian_trace").get("product_width"),
        progress=lambda step, total, estimate: context.progress("hessian_trace", step, total, estimate),
        ritz=context.ritz,
    )
    report = {"estimate": result.estimate, "stderr": result.stderr, "method": result.method,
              "hvps": result.products, "seconds": result.seconds, "seeded_eigenpairs": result.seeded}
    if result.frobenius_squared is not None:
        report["frobenius_squared"] = result.frobenius_squared
        report["frobenius_squared_stderr"] = result.frobenius_squared_stderr
    return report


ANALYSIS = Analysis(name="hessian_trace", spec=HessianTraceSpec, normalize=normalize, run=run,
                    curvatures=tuple(CURVATURES))
