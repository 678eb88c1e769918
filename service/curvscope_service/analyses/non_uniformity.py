"""``non_uniformity``: s = sqrt(lambda_max(Sigma)) and the SGD linear-stability verdict (Wu, Ma & E)."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Any

import torch

from ..curvature.measures.non_uniformity import METHODS, compute_non_uniformity
from ..curvature.operators.hessian import HessianOperator
from ..curvature.operators.per_sample import PerSampleGaussNewton, PerSampleHessians
from ..errors import InvalidInput, Unimplemented
from .base import Analysis, AnalysisContext, EngineLimits
from .sharpness import TOLERANCE as SHARPNESS_TOLERANCE

DEFAULT_TOLERANCE = 1e-3
# Each Sigma product costs several HVPs (benchmarks/README.md): a budget per eigen solve.
MAX_PRODUCTS = 300


NonUniformityMethod = StrEnum("NonUniformityMethod", [(name.upper(), name) for name in METHODS])


@dataclass(frozen=True)
class NonUniformitySpec:
    """The request's options; zeros and None ask for the defaults."""

    learning_rate: float = 0.0
    batch_size: int = 0
    max_samples: int = 0
    tolerance: float = 0.0
    method: NonUniformityMethod | None = None


def normalize(spec: NonUniformitySpec, limits: EngineLimits) -> NonUniformitySpec:
    learning_rate, batch_size, max_samples = spec.learning_rate, spec.batch_size, spec.max_samples
    tolerance = spec.tolerance or DEFAULT_TOLERANCE
    if learning_rate < 0 or not math.isfinite(learning_rate):
        raise InvalidInput(f"learning_rate {learning_rate} must be a finite number >= 0 (0 = no verdict)")
    if batch_size < 0 or max_samples < 0:
        raise InvalidInput("batch_size and max_samples must be >= 0")
    if not (0.0 < tolerance < 1.0):
        raise InvalidInput(f"tolerance {tolerance} must lie in (0, 1)")
    if max_samples == 1:
        raise InvalidInput("max_samples must be 0 (all) or at least 2: Sigma is a variance over samples")
    return replace(spec, tolerance=tolerance, method=spec.method or NonUniformityMethod("exact"))


def run(context: AnalysisContext, spec: NonUniformitySpec) -> dict[str, Any]:
    model, data = context.model, context.data
    if model.fixed_batch_size:
        raise Unimplemented(
            f"non_uniformity needs per-sample products, but this model was exported with a fixed batch size "
            f"of {model.fixed_batch_size}; export it with a dynamic batch dimension")
    n = data.num_samples
    if spec.batch_size > n:
        raise InvalidInput(f"batch_size {spec.batch_size} is larger than the {n} samples of the data")
    inputs, targets = data.inputs, data.targets
    subsampled = 0 < spec.max_samples < n
    if subsampled:
        keep = torch.randperm(n, generator=torch.Generator().manual_seed(context.seed))[:spec.max_samples]
        keep = keep.sort().values.to(targets.device)
        inputs, targets = tuple(x[keep] for x in inputs), targets[keep]
    loss_fn = context.loss_for(targets) if subsampled else context.loss_fn
    common = dict(param_names=context.param_names, micro_batch_size=context.micro_batch_size, check=context.check)
    sharpness = None
    if spec.method == "exact":
        hessian = context.operator() if not subsampled else HessianOperator(
            model.module, inputs, targets, loss_fn, retain_max_samples=context.limits.retain_max_samples,
            **common)
        operator = PerSampleHessians(model.module, inputs, targets, loss_fn, hessian=hessian, **common)
        if not subsampled:
            sharpness = _earlier_sharpness(context.earlier, spec.tolerance)
    else:
        operator = PerSampleGaussNewton(model.module, inputs, targets, loss_fn, **common)
    return compute_non_uniformity(
        operator, learning_rate=spec.learning_rate, batch_size=spec.batch_size, num_samples=n,
        tol=spec.tolerance, max_products=min(MAX_PRODUCTS, context.limits.max_products), seed=context.seed,
        sharpness=sharpness,
        progress=lambda step, total, estimate: context.progress("non_uniformity", step, total, estimate),
    )


def _earlier_sharpness(earlier: dict[str, Any], tol: float) -> tuple[float, bool] | None:
    """lambda_max(H) of the same request, when solved to this tolerance at least."""
    eigen = earlier.get("hessian_eigen")
    if eigen and eigen.get("converged") and eigen.get("largest") and eigen.get("tolerance", math.inf) <= tol:
        return float(eigen["largest"][0]), True
    sharpness = earlier.get("sharpness")
    if sharpness and sharpness.get("converged") and SHARPNESS_TOLERANCE <= tol:
        return float(sharpness["value"]), True
    return None


ANALYSIS = Analysis(name="non_uniformity", spec=NonUniformitySpec, normalize=normalize, run=run)
