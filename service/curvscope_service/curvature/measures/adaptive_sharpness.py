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

The worst case is a lower bound of the maximum (a local ascent); ``random_starts`` more ascents
from seeded uniform points of the ball show how much the answer depends on the start: the value
is the best of all, ``start_values`` / ``start_spread`` the best of each and their standard
deviation.
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
    random_starts: int = 0,
    seed: int = 0,
    progress: Callable[[int, int, float], None] | None = None,
) -> dict:
    """The ``adaptive_sharpness`` report block; the worst case from z = 0 and ``random_starts``
    seeded uniform points of the ball."""
    if norm not in NORMS:
        raise InvalidInput(f"unknown norm {norm!r}; choose one of {', '.join(NORMS)}")
    if not (rho >= 0 and math.isfinite(rho)):
        raise InvalidInput(f"rho must be a finite number >= 0, got {rho}")
    if steps < 1:
        raise InvalidInput(f"steps must be positive, got {steps}")
    if random_starts < 0 or (random_starts and average_case):
        raise InvalidInput(f"random_starts ({random_starts}) must be >= 0, and applies to the worst case only")
    start = time.perf_counter()
    scale = objective.weights.abs() if adaptive else torch.ones_like(objective.weights)
    base = objective.loss()
    block = {"rho": rho, "norm": norm, "adaptive": adaptive, "average_case": average_case, "steps": steps,
             "loss": base}

    total = steps * (random_starts + 1)

    def report(step: int, value: float) -> None:
        if progress is not None:
            progress(step, total, value)

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
        # The random starts come from their own stream: the ascent from 0 is the same without them.
        generator = torch.Generator().manual_seed(seed + 1)
        start_values = []
        for index in range(random_starts + 1):
            if index:
                z = _random_point(generator, objective.dim, rho, norm).to(scale.device, scale.dtype)
                start_loss = objective.loss(scale * z)
            else:
                z, start_loss = torch.zeros_like(scale), base
            start_values.append(_ascend(objective, scale, z, start_loss, rho, steps, norm,
                                        lambda step, value: report(index * steps + step, value - base)) - base)
        best = max(start_values)
        block.update({"value": best, "perturbed_loss": best + base})
        if random_starts:
            block["start_values"] = start_values
            block["start_spread"] = float(torch.tensor(start_values, dtype=torch.float64).std())
    block["seconds"] = time.perf_counter() - start
    return block


def _random_point(generator: torch.Generator, dim: int, rho: float, norm: str) -> Tensor:
    """A uniform point of the l_inf or l2 ball of radius rho (float64, on the host)."""
    if norm == "linf":
        return (2 * torch.rand(dim, generator=generator, dtype=torch.float64) - 1) * rho
    direction = torch.randn(dim, generator=generator, dtype=torch.float64)
    radius = rho * torch.rand(1, generator=generator, dtype=torch.float64).item() ** (1 / dim)
    return direction * (radius / direction.norm())


def _ascend(objective: PerturbedLoss, scale: Tensor, z: Tensor, start_loss: float, rho: float, steps: int,
            norm: str, report: Callable[[int, float], None]) -> float:
    """The largest f(w + c z) seen by ``steps`` steps of the reference code's ascent from z, where
    the loss is ``start_loss``."""
    marks = set(checkpoints(steps))
    previous = z.clone()
    best_z, best = z.clone(), start_loss
    step_size = previous_step_size = 2 * rho
    previous_best, last_mark, updates = best, 0, 0
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
        report(step + 1, best)
    return best
