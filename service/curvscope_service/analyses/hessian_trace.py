"""``hessian_trace``: tr(H) (and optionally tr(H^2)) by XTrace, Hutch++ or Hutchinson.

When ``hessian_eigen`` ran earlier in the same request on the same operator, its Ritz pairs
seed the estimate: their values are taken exactly and the estimator runs on the deflated
operator (``curvature/trace.py``); ``seeded_eigenpairs`` in the result says how many.
"""

from __future__ import annotations

import math
from typing import Any

from ..curvature.trace import METHODS, estimate_trace
from ..errors import InvalidInput
from .base import Analysis, AnalysisContext, EngineLimits

# XTrace measured best at equal products (benchmarks/bench_trace.py).
DEFAULT_METHOD = "xtrace"
# Products of a fixed-budget run; an adaptive run may use up to the server's max_hvps.
DEFAULT_PRODUCTS = 100
# The API's enum names (TRACE_METHOD_*), lowercased, for the estimators' names.
METHOD_NAMES = {"": DEFAULT_METHOD, "unspecified": DEFAULT_METHOD, "hutch_plus_plus": "hutchpp"}


def normalize(spec: dict[str, Any], limits: EngineLimits) -> dict[str, Any]:
    name = str(spec.get("method", "") or "").lower().removeprefix("trace_method_")
    method = METHOD_NAMES.get(name, name)
    if method not in METHODS:
        raise InvalidInput(f"unknown trace method '{spec.get('method')}'; choose one of {', '.join(METHODS)}")
    tolerance = float(spec.get("relative_tolerance", 0.0))
    if not (0.0 <= tolerance < 1.0) or math.isnan(tolerance):
        raise InvalidInput(f"relative_tolerance {tolerance} must lie in [0, 1) (0 = use the whole budget)")
    max_hvps = int(spec.get("max_hvps", 0)) or (limits.max_hvps if tolerance else min(DEFAULT_PRODUCTS, limits.max_hvps))
    if max_hvps > limits.max_hvps:
        raise InvalidInput(f"max_hvps {max_hvps} is over this server's limit of {limits.max_hvps}")
    minimum = {"hutchinson": 1, "xtrace": 2, "hutchpp": 3}[method]
    if max_hvps < minimum:
        raise InvalidInput(f"{method} needs max_hvps of at least {minimum}, got {max_hvps}")
    return {"method": method, "max_hvps": max_hvps, "relative_tolerance": tolerance,
            "frobenius": bool(spec.get("frobenius", False))}


def run(context: AnalysisContext, spec: dict[str, Any]) -> dict[str, Any]:
    result = estimate_trace(
        context.operator(), method=spec["method"], max_products=spec["max_hvps"],
        relative_tolerance=spec["relative_tolerance"], frobenius=spec["frobenius"], seed=context.seed,
        progress=lambda step, total, estimate: context.progress("hessian_trace", step, total, estimate),
        ritz=context.ritz,
    )
    report = {"estimate": result.estimate, "stderr": result.stderr, "method": result.method,
              "hvps": result.products, "seconds": result.seconds, "seeded_eigenpairs": result.seeded}
    if result.frobenius_squared is not None:
        report["frobenius_squared"] = result.frobenius_squared
        report["frobenius_squared_stderr"] = result.frobenius_squared_stderr
    return report


ANALYSIS = Analysis(name="hessian_trace", normalize=normalize, run=run,
                    curvatures=("hessian", "ggn", "fisher", "empirical_fisher"))
