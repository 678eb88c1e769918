"""``adaptive_sharpness``: worst-case or average-case sharpness, l_inf or l2, optionally
elementwise-adaptive (Kwon et al. 2021; Andriushchenko et al. 2023)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from ..curvature.measures.adaptive_sharpness import NORMS, compute_adaptive_sharpness
from ..curvature.measures.epsilon_sharpness import PerturbedLoss
from ..errors import InvalidInput
from .base import Analysis, AnalysisContext, EngineLimits

# Andriushchenko et al.'s code: 20 steps (or noise draws); l_inf by default; rho 0.1 for l2 (its
# default) and 0.002 for l_inf (the middle of the ranges their ResNet sweeps use).
DEFAULT_STEPS = 20
DEFAULT_RHO = {"linf": 0.002, "l2": 0.1}
MAX_STEPS = 10_000
MAX_RANDOM_STARTS = 100


SharpnessNorm = StrEnum("SharpnessNorm", [(name.upper(), name) for name in NORMS])


@dataclass(frozen=True)
class AdaptiveSharpnessSpec:
    """The request's options; zeros and None ask for the defaults."""

    rho: float = 0.0
    steps: int = 0
    norm: SharpnessNorm | None = None
    adaptive: bool = False
    average_case: bool = False
    # Worst case: ascents from seeded uniform points of the ball besides the one from z = 0.
    random_starts: int = 0


def normalize(spec: AdaptiveSharpnessSpec, limits: EngineLimits) -> AdaptiveSharpnessSpec:
    norm = spec.norm or SharpnessNorm("linf")
    rho = spec.rho or DEFAULT_RHO[norm]
    steps = spec.steps or DEFAULT_STEPS
    if not (rho > 0 and math.isfinite(rho)):
        raise InvalidInput(f"rho {rho} must be a finite positive number")
    if not 1 <= steps <= MAX_STEPS:
        raise InvalidInput(f"steps {steps} must lie between 1 and {MAX_STEPS}")
    if not 0 <= spec.random_starts <= MAX_RANDOM_STARTS:
        raise InvalidInput(f"random_starts {spec.random_starts} must lie between 0 and {MAX_RANDOM_STARTS}")
    if spec.random_starts and spec.average_case:
        raise InvalidInput("random_starts applies to the worst case; the average case has its stderr over the draws")
    return AdaptiveSharpnessSpec(rho=rho, steps=steps, norm=norm, adaptive=spec.adaptive,
                                 average_case=spec.average_case, random_starts=spec.random_starts)


def run(context: AnalysisContext, spec: AdaptiveSharpnessSpec) -> dict[str, Any]:
    objective = PerturbedLoss(context.model.module, context.data.inputs, context.data.targets, context.loss_fn,
                              param_names=context.param_names, micro_batch_size=context.micro_batch_size,
                              check=context.check)
    return compute_adaptive_sharpness(
        objective, rho=spec.rho, steps=spec.steps, norm=spec.norm, adaptive=spec.adaptive,
        average_case=spec.average_case, random_starts=spec.random_starts, seed=context.seed,
        progress=lambda step, total, estimate: context.progress("adaptive_sharpness", step, total, estimate),
    )


ANALYSIS = Analysis(name="adaptive_sharpness", spec=AdaptiveSharpnessSpec, normalize=normalize, run=run)
