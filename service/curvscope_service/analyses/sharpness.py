"""``sharpness``: lambda_max of the loss Hessian and the GD stability verdict a <= 2 / eta."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ..curvature.measures.sharpness import compute_sharpness
from ..errors import InvalidInput
from .base import Analysis, AnalysisContext, EngineLimits

TOLERANCE = 1e-3


@dataclass(frozen=True)
class SharpnessSpec:
    """The request's options (learning rate 0: no verdict)."""

    learning_rate: float = 0.0


def normalize(spec: SharpnessSpec, limits: EngineLimits) -> SharpnessSpec:
    if spec.learning_rate < 0 or not math.isfinite(spec.learning_rate):
        raise InvalidInput(f"learning_rate {spec.learning_rate} must be a finite number >= 0 (0 = no verdict)")
    return spec


def run(context: AnalysisContext, spec: SharpnessSpec) -> dict[str, Any]:
    # hessian_eigen of the same request (whole model only: per-layer contexts have no earlier).
    return compute_sharpness(
        context.operator(), learning_rate=spec.learning_rate, tol=TOLERANCE,
        max_products=context.limits.max_products, seed=context.seed,
        earlier_eigen=context.earlier.get("hessian_eigen"),
        progress=lambda step, total, estimate: context.progress("sharpness", step, total, estimate),
    )


ANALYSIS = Analysis(name="sharpness", spec=SharpnessSpec, normalize=normalize, run=run)
