"""``epsilon_sharpness``: Keskar et al.'s box-constrained sharpness, in percent."""

from __future__ import annotations

import math
from typing import Any

from ..curvature.epsilon_sharpness import MAX_SUBSPACE_DIM, PerturbedLoss, compute_epsilon_sharpness
from ..errors import InvalidInput
from .base import Analysis, AnalysisContext, EngineLimits

DEFAULT_EPSILON = 1e-3
DEFAULT_ITERATIONS = 10  # Keskar et al.'s L-BFGS-B budget
MAX_ITERATIONS = 1000


def normalize(spec: dict[str, Any], limits: EngineLimits) -> dict[str, Any]:
    epsilon = float(spec.get("epsilon", 0.0)) or DEFAULT_EPSILON
    iterations = int(spec.get("max_iterations", 0)) or DEFAULT_ITERATIONS
    subspace_dim = int(spec.get("subspace_dim", 0))
    if not (epsilon > 0 and math.isfinite(epsilon)):
        raise InvalidInput(f"epsilon {epsilon} must be a finite positive number")
    if not 1 <= iterations <= MAX_ITERATIONS:
        raise InvalidInput(f"max_iterations {iterations} must lie between 1 and {MAX_ITERATIONS}")
    if not 0 <= subspace_dim <= MAX_SUBSPACE_DIM:
        # refused before the job is queued; the matrix's memory is checked once the model is known
        raise InvalidInput(f"subspace_dim {subspace_dim} must lie between 0 (full space) and {MAX_SUBSPACE_DIM} "
                           "(Keskar et al. use 100)")
    return {"epsilon": epsilon, "max_iterations": iterations, "subspace_dim": subspace_dim}


def run(context: AnalysisContext, spec: dict[str, Any]) -> dict[str, Any]:
    objective = PerturbedLoss(context.model.module, context.data.inputs, context.data.targets, context.loss_fn,
                              param_names=context.param_names, micro_batch_size=context.micro_batch_size,
                              check=context.check)
    return compute_epsilon_sharpness(
        objective, epsilon=spec["epsilon"], subspace_dim=min(spec["subspace_dim"], objective.dim),
        max_iterations=spec["max_iterations"], seed=context.seed,
        progress=lambda step, total, estimate: context.progress("epsilon_sharpness", step, total, estimate),
    )


ANALYSIS = Analysis(name="epsilon_sharpness", normalize=normalize, run=run)
