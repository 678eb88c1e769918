"""``hessian_density``: the spectral density by stochastic Lanczos quadrature."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

from ..curvature.estimators.probes import BlockProducts
from ..curvature.estimators.slq import BASIS_BUDGET_BYTES, slq
from ..curvature.estimators.spectral_density import NEGATIVE_TOLERANCE, SIGMA, broadened_density, spectral_masses
from ..curvature.operators.curvatures import CURVATURES
from ..errors import InvalidInput
from .base import Analysis, AnalysisContext, EngineLimits

# Ghorbani, Krishnan & Xiao (2019) use 80-90 steps and 10 probes.
DEFAULT_STEPS = 90
DEFAULT_PROBES = 10
DEFAULT_GRID_POINTS = 1000
MAX_GRID_POINTS = 100_000


@dataclass(frozen=True)
class HessianDensitySpec:
    """The request's options; zeros (and None) ask for the defaults."""

    lanczos_steps: int = 0
    num_probes: int = 0
    grid_points: int = 0
    sigma: float = 0.0
    # Eigenvalues within this fraction of max|lambda| of zero are near zero, not negative;
    # None asks for the default (NEGATIVE_TOLERANCE), 0 counts every negative node.
    negative_tolerance: float | None = None


def normalize(spec: HessianDensitySpec, limits: EngineLimits) -> HessianDensitySpec:
    steps = spec.lanczos_steps or DEFAULT_STEPS
    probes = spec.num_probes or DEFAULT_PROBES
    grid_points = spec.grid_points or DEFAULT_GRID_POINTS
    sigma = spec.sigma or SIGMA
    tolerance = NEGATIVE_TOLERANCE if spec.negative_tolerance is None else spec.negative_tolerance
    if steps < 1:
        raise InvalidInput(f"lanczos_steps must be positive, got {steps}")
    if probes < 2:
        raise InvalidInput(f"num_probes must be at least 2 (the standard errors come from the spread over the "
                           f"probes), got {probes}")
    if steps * probes > limits.max_products:
        raise InvalidInput(f"lanczos_steps x num_probes = {steps * probes} products is over this server's "
                           f"limit of {limits.max_products}")
    if not (2 <= grid_points <= MAX_GRID_POINTS):
        raise InvalidInput(f"grid_points {grid_points} must lie in [2, {MAX_GRID_POINTS}]")
    if not (0.0 < sigma < 1.0) or math.isnan(sigma):
        raise InvalidInput(f"sigma {sigma} (the broadening width relative to the spectral range) must lie in (0, 1)")
    if not (0.0 <= tolerance < 1.0) or math.isnan(tolerance):
        raise InvalidInput(f"negative_tolerance {tolerance} (the fraction of max|eigenvalue| counted as zero) must "
                           f"lie in [0, 1)")
    return HessianDensitySpec(lanczos_steps=steps, num_probes=probes, grid_points=grid_points, sigma=sigma,
                              negative_tolerance=tolerance)


def run(context: AnalysisContext, spec: HessianDensitySpec) -> dict[str, Any]:
    start = time.perf_counter()
    operator = context.operator()
    plan = context.plan("hessian_density")
    # The plan runs the probes in groups whose Krylov bases fit; each step is one batched product.
    apply = BlockProducts(operator, block_size=plan.get("probe_group", spec.num_probes))
    quadrature = slq(
        apply, operator.dim, steps=spec.lanczos_steps, probes=spec.num_probes, seed=context.seed,
        device=operator.device, dtype=operator.dtype,
        basis_budget_bytes=plan.get("basis_budget_bytes", BASIS_BUDGET_BYTES),
        progress=lambda step, total, estimate: context.progress("hessian_density", step, total, estimate),
    )
    curve = broadened_density(quadrature.nodes, quadrature.weights, grid_points=spec.grid_points,
                              sigma=spec.sigma)
    masses = spectral_masses(quadrature.nodes, quadrature.weights, tolerance=spec.negative_tolerance)
    return {**curve, **masses, "nodes": quadrature.nodes.reshape(-1).tolist(),
            "weights": quadrature.weights.reshape(-1).tolist(), "hvps": apply.products,
            "seconds": time.perf_counter() - start}


# Not per layer by default: a density costs probes x steps products per block.
ANALYSIS = Analysis(name="hessian_density", spec=HessianDensitySpec, normalize=normalize, run=run, per_layer=False,
                    curvatures=tuple(CURVATURES))
