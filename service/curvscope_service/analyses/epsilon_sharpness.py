"""``epsilon_sharpness``: Keskar et al.'s box-constrained sharpness, in percent."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ..curvature.measures.epsilon_sharpness import MAX_SUBSPACE_DIM, PerturbedLoss, compute_epsilon_sharpness
from ..errors import InvalidInput
from .base import Analysis, AnalysisContext, EngineLimits

DEFAULT_EPSILON = 1e-3
DEFAULT_ITERATIONS = 10  # Keskar et al.'s L-BFGS-B budget
MAX_ITERATIONS = 1000
MAX_RANDOM_STARTS = 100


@dataclass(frozen=True)
class EpsilonSharpnessSpec:
    """The request's options; zeros ask for the defaults (subspace_dim 0: the full space)."""

    epsilon: float = 0.0
    subspace_dim: int = 0
    max_iterations: int = 0
    # Ascents from seeded uniform points of the box besides the one from y = 0.
    random_starts: int = 0


def normalize(spec: EpsilonSharpnessSpec, limits: EngineLimits) -> EpsilonSharpnessSpec:
    epsilon = spec.epsilon or DEFAULT_EPSILON
    iterations = spec.max_iterations or DEFAULT_ITERATIONS
    subspace_dim = spec.subspace_dim
    if not (epsilon > 0 and math.isfinite(epsilon)):
        raise InvalidInput(f"epsilon {epsilon} must be a finite positive number")
    if not 1 <= iterations <= MAX_ITERATIONS:
        raise InvalidInput(f"max_iterations {iterations} must lie between 1 and {MAX_ITERATIONS}")
    if not 0 <= subspace_dim <= MAX_SUBSPACE_DIM:
        # refused before the job is queued; the matrix's memory is checked once the model is known
        raise InvalidInput(f"subspace_dim {subspace_dim} must lie between 0 (full space) and {MAX_SUBSPACE_DIM} "
                           "(Keskar et al. use 100)")
    if not 0 <= spec.random_starts <= MAX_RANDOM_STARTS:
        raise InvalidInput(f"random_starts {spec.random_starts} must lie between 0 and {MAX_RANDOM_STARTS}")
    return EpsilonSharpnessSpec(epsilon=epsilon, subspace_dim=subspace_dim, max_iterations=iterations,
                                random_starts=spec.random_starts)


def run(context: AnalysisContext, spec: EpsilonSharpnessSpec) -> dict[str, Any]:
    objective = PerturbedLoss(context.model.module, context.data.inputs, context.data.targets, context.loss_fn,
                              param_names=context.param_names, micro_batch_size=context.micro_batch_size,
                              check=context.check)
    return compute_epsilon_sharpness(
        objective, epsilon=spec.epsilon, subspace_dim=min(spec.subspace_dim, objective.dim),
        max_iterations=spec.max_iterations, random_starts=spec.random_starts, seed=context.seed,
        progress=lambda step, total, estimate: context.progress("epsilon_sharpness", step, total, estimate),
    )


ANALYSIS = Analysis(name="epsilon_sharpness", spec=EpsilonSharpnessSpec, normalize=normalize, run=run)
