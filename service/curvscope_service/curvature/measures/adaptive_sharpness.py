"""Worst-case and average-case (adaptive) sharpness: Kwon et al. (ICML 2021, ASAM) and
Andriushchenko et al. (ICML 2023, "A Modern Look at the Relationship between Sharpness and
Generalization").

With c = |w| (adaptive, elementwise) or 1, perturbations delta = c * z with ||z||_p <= rho:

- worst case:   S_max = max_{||z||_p <= rho} f(w + c z) - f(w), by projected gradient ascent
  with the schedule of Andriushchenko et al.'s code (their "m_apgd" default): start at z = 0,
  step 2 rho, momentum 0.75 on the iterates, the best point kept, the step halved at their
  checkpoints (at 22 %, then growing gaps, of the steps) when fewer than 75 % of the steps since
  the last checkpoint improved or nothing changed. Ascent directions: sign of the gradient in
  z for l_inf, the normalised gradient in z for l2 (steepest ascent in the scaled coordinates).
- average case: S_avg = E_z f(w + c z) - f(w), z ~ N(0, rho^2 I) for l2 and U[-rho, rho]^d for
  l_inf, as in their code, over ``steps`` draws, with the standard error of the mean.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch
from torch import Tensor

from ...errors import InvalidInput
from .epsilon_sharpness import PerturbedLoss

NORMS = ("linf", "l2")
MOMENTUM = 0.75
MIN_UPDATE_RATIO = 0.75


def checkpoints(steps: int) -> list[int]:
    """The step indices where the step size may be halved (Andriushchenko et al.'s schedule)."""
    fractions, marks = [0.0, 0.22], [0, math.ceil(steps * 0.22)]
    while marks[-1] < steps and marks[-1] != marks[-2]:
        fractions.append(fractions[-1] + max(fractions[-1] - fractions[-2] - 0.03, 0.06))
        marks.append(math.ceil(fractions[-1] * steps))
    return marks[1:]


def _project(z: Tensor, rho: float, norm: str) -> Tensor:
    if norm == "linf":
        return z.clamp(-rho, rho)
    length = z.norm()
    return z * (rho / length) if length > rho else z


def compute_adaptive_sharpness(
    objective: PerturbedLoss,
    *,
    rho: float,
    steps: int = 20,
    norm: str = "linf",
    adaptive: bool = True,
    average_case: bool = False,
    seed: int = 0,
    progress: Callable[[int, int, float], None] | None = None,
) -> dict:
    """The ``adaptive_sharpness`` report block."""
    if norm not in NORMS:
        raise InvalidInput(f"unknown norm {norm!r}; choose one of {', '.join(NORMS)}")
    if not (rho >= 0 and math.isfinite(rho)):
        raise InvalidInput(f"rho must be a finite number >= 0, got {rho}")
    if steps < 1:
        raise InvalidInput(f"steps must be positive, got {steps}")
    start = time.perf_counter()
    scale = objective.weights.abs() if adaptive else torch.ones_like(objective.weights)
    base = objective.loss()
    block = {"rho": rho, "norm": norm, "adaptive": adaptive, "average_case": average_case, "steps": steps,
             "loss": base}

    def report(step: int, value: float) -> None:
        if progress is not None:
            progress(step, steps, value)

    if average_case:
        generator = torch.Generator().manual_seed(seed)
        losses = []
        for step in range(steps):
            if norm == "l2":
                z = torch.randn(objective.dim, generator=generator, dtype=torch.float64) * rho
            else:
                z = (2 * torch.rand(objective.dim, generator=generator, dtype=torch.float64) - 1) * rho
            losses.append(objective.loss(scale * z.to(scale.device, scale.dtype)))
            report(step + 1, sum(losses) / len(losses) - base)
        mean = sum(losses) / steps
        spread = math.sqrt(sum((x - mean) ** 2 for x in losses) / (steps - 1) / steps) if steps > 1 else math.nan
        block.update({"value": mean - base, "perturbed_loss": mean})
        if math.isfinite(spread):
            block["stderr"] = spread
    else:
        marks = set(checkpoints(steps))
        z = torch.zeros_like(objective.weights)
        previous = z.clone()
        best_z, best = z.clone(), base
        step_size = previous_step_size = 2 * rho
        previous_best, last_mark, updates = base, 0, 0
        for step in range(steps):
            _, gradient = objective.loss_and_gradient(scale * z)
            ascent = gradient * scale  # the gradient in z
            if norm == "linf":
                direction = ascent.sign()
            else:
                direction = ascent / (ascent.norm() + 1e-12)
            candidate = _project(z + step_size * direction, rho, norm)
            # Momentum on the iterates (convex combination of two feasible points: stays feasible).
            z, previous = MOMENTUM * candidate + (1 - MOMENTUM) * previous, z
            value = objective.loss(scale * z)
            if value > best:
                best, best_z, updates = value, z.clone(), updates + 1
            if step in marks:
                too_few = updates < MIN_UPDATE_RATIO * (step - last_mark)
                stalled = previous_step_size == step_size and previous_best == best
                previous_step_size, previous_best, last_mark, updates = step_size, best, step, 0
                if too_few or stalled:
                    step_size /= 2
                    z = best_z.clone()
            report(step + 1, best - base)
        block.update({"value": best - base, "perturbed_loss": best})
    block["seconds"] = time.perf_counter() - start
    return block
