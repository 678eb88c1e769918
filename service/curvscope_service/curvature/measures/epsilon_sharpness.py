"""Keskar et al.'s epsilon-sharpness (ICLR 2017, "On Large-Batch Training for Deep Learning:
Generalization Gap and Sharp Minima", Metric 2.1).

For weights x, loss f and a d x p matrix A (A = I for the full space, a random matrix for a
random subspace), the box is C_eps = {y : |y_i| <= eps (|(A^+ x)_i| + 1)} and

    phi(eps, A) = 100 * (max_{y in C_eps} f(x + A y) - f(x)) / (1 + f(x)),

maximised, as in the paper, by L-BFGS-B (scipy) with a small iteration budget (the paper uses
10 iterations; eps = 1e-3 and 5e-4; a random subspace of p = 100 dimensions). The ascent finds a
local maximum, so the value is a lower bound of phi; ``random_starts`` more ascents from seeded
uniform points of the box show how much the answer depends on the start: the value is the best
of all, and ``start_values`` / ``start_spread`` the best of each and their standard deviation.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch
from scipy.optimize import Bounds, minimize
from torch import Tensor, nn

from ...errors import InvalidInput, ResourceExhausted
from ..operators.base import LossFn, MeanLossOperator

# Keskar et al. use a 100-dimensional subspace; 10x that is as far as the method is meant to go.
MAX_SUBSPACE_DIM = 1000
# Host memory the method may plan for its own float64 arrays: the random d x p matrix A (d
# parameters, p = subspace_dim) and L-BFGS-B's state. 4 GiB holds the paper's p = 100 up to 5.3M
# parameters, and the full space up to 16M.
MAX_WORKSPACE_BYTES = 4 << 30
# scipy's L-BFGS-B keeps 2m + 5 vectors over the variables (m = 10 correction pairs) besides the
# iterate, the bounds and the gradient: ~32 values per variable.
_LBFGSB_VALUES_PER_VARIABLE = 32
# A is drawn and reduced in row blocks of this many values (64 MiB), checking for cancellation
# between blocks: the reduction of a full-size A is ~10^11 flops.
_BLOCK_VALUES = 1 << 23


class PerturbedLoss(MeanLossOperator):
    """The mean loss and its gradient at the selected parameters plus a flat perturbation,
    micro-batched over the data (the operator base's parameter selection, checks and
    micro-batches); the model itself is never modified. ``check`` is the caller's check."""

    def __init__(self, module: nn.Module, inputs: Tensor, targets: Tensor, loss_fn: LossFn, *,
                 param_names: Sequence[str] | None = None, micro_batch_size: int = 256,
                 check: Callable[[], None] | None = None) -> None:
        super().__init__(module, inputs, targets, loss_fn, param_names=param_names,
                         micro_batch_size=micro_batch_size, check=check)
        self.weights = self._flat(self._values)
        self.evaluations = 0

    check = MeanLossOperator._step

    def loss(self, delta: Tensor | None = None) -> float:
        """f(x + delta)."""
        params = self._split(self.weights if delta is None else self.weights + delta)
        total = 0.0
        with torch.no_grad():
            for x, t, w in self._batches:
                self.check()
                total += self._loss_fn(self._forward(params, x), t).item() * w
        self.evaluations += 1
        return total

    def loss_and_gradient(self, delta: Tensor) -> tuple[float, Tensor]:
        """f(x + delta) and its gradient with respect to the weights."""
        flat = (self.weights + delta).requires_grad_(True)
        total, gradient = 0.0, torch.zeros_like(self.weights)
        for x, t, w in self._batches:
            self.check()
            with torch.enable_grad():
                value = self._loss(self._split(flat), x, t, w)
                (part,) = torch.autograd.grad(value, flat)
            total += value.item()
            gradient += part
        self.evaluations += 1
        return total, gradient


def compute_epsilon_sharpness(
    objective: PerturbedLoss,
    *,
    epsilon: float = 1e-3,
    subspace_dim: int = 0,
    max_iterations: int = 10,
    random_starts: int = 0,
    seed: int = 0,
    progress: Callable[[int, int, float], None] | None = None,
) -> dict:
    """The ``epsilon_sharpness`` report block (value in percent), from y = 0 and ``random_starts``
    seeded uniform points of the box."""
    if not (epsilon >= 0 and math.isfinite(epsilon)):
        raise InvalidInput(f"epsilon must be a finite number >= 0, got {epsilon}")
    if subspace_dim < 0 or subspace_dim > objective.dim:
        raise InvalidInput(f"subspace_dim {subspace_dim} must lie between 0 (full space) and the {objective.dim} parameters")
    if subspace_dim > MAX_SUBSPACE_DIM:
        raise InvalidInput(f"subspace_dim {subspace_dim} is over the limit of {MAX_SUBSPACE_DIM} (Keskar et al. use 100)")
    _check_workspace(objective.dim, subspace_dim)
    if max_iterations < 1:
        raise InvalidInput(f"max_iterations must be positive, got {max_iterations}")
    if random_starts < 0:
        raise InvalidInput(f"random_starts must be >= 0, got {random_starts}")
    began = time.perf_counter()
    x = objective.weights.to(torch.float64)
    if subspace_dim:
        a, scale = _random_subspace(objective, x, subspace_dim, seed)
    else:
        a, scale = None, x
    bound = (epsilon * (scale.abs() + 1)).cpu().numpy()
    base = objective.loss()
    best = base
    # L-BFGS-B evaluates about once per iteration; its line search may take a few more.
    max_evaluations = 5 * max_iterations
    total = (random_starts + 1) * max_evaluations + 1

    def negative(y: np.ndarray) -> tuple[float, np.ndarray]:
        nonlocal best, start_best
        step = torch.from_numpy(np.array(y, dtype=np.float64)).to(x.device)
        delta = step if a is None else a @ step
        value, gradient = objective.loss_and_gradient(delta.to(objective.dtype))
        best = max(best, value)
        start_best = max(start_best, value)
        gradient = gradient.to(torch.float64)
        if a is not None:
            gradient = a.T @ gradient
        if progress is not None:
            progress(min(objective.evaluations, total), total, 100 * (best - base) / (1 + base))
        return -value, -gradient.cpu().numpy()

    # The random starts come from their own stream, so the first ascent is the same with or without them.
    generator = np.random.default_rng([seed, 1])
    start_values, iterations = [], 0
    for index in range(random_starts + 1):
        start = generator.uniform(-bound, bound) if index else np.zeros(bound.shape[0])
        start_best = -math.inf
        # Bounds as arrays: a list of (low, high) pairs is two Python floats per parameter
        result = minimize(negative, start, jac=True, method="L-BFGS-B", bounds=Bounds(-bound, bound),
                          options={"maxiter": max_iterations, "maxfun": max_evaluations})
        iterations += int(result.get("nit", 0))
        start_values.append(100 * (start_best - base) / (1 + base))
    block = {
        "value": 100 * (best - base) / (1 + base),
        "epsilon": epsilon,
        "subspace_dim": subspace_dim,
        "loss": base,
        "max_loss": best,
        "iterations": iterations,
        "evaluations": objective.evaluations,
        "seconds": time.perf_counter() - began,
    }
    if random_starts:
        block["start_values"] = start_values
        block["start_spread"] = float(np.std(start_values, ddof=1))
    return block


def _check_workspace(dim: int, subspace_dim: int) -> None:
    """Refuse, before anything is allocated, a run whose own arrays exceed MAX_WORKSPACE_BYTES."""
    variables = subspace_dim or dim
    needed = 8 * (dim * subspace_dim + _LBFGSB_VALUES_PER_VARIABLE * variables)
    if needed <= MAX_WORKSPACE_BYTES:
        return
    fits = min(MAX_SUBSPACE_DIM, dim, MAX_WORKSPACE_BYTES // (8 * (dim + _LBFGSB_VALUES_PER_VARIABLE)))
    if subspace_dim:
        what = f"subspace_dim {subspace_dim} needs a {dim} x {subspace_dim} float64 matrix and the optimiser's state"
        advice = f"use subspace_dim {fits} or less" if fits else "ask for it per layer (--per-layer)"
    else:
        what = f"the full space of {dim} parameters needs the optimiser's state"
        advice = (f"use a random subspace (subspace_dim {min(fits, 100)}; Keskar et al. use 100)" if fits
                  else "ask for it per layer (--per-layer)")
    raise ResourceExhausted(f"{what} ({needed >> 20} MiB), over the limit of {MAX_WORKSPACE_BYTES >> 20} MiB; {advice}")


def _random_subspace(objective: PerturbedLoss, x: Tensor, subspace_dim: int, seed: int) -> tuple[Tensor, Tensor]:
    """A (d x p Gaussian, columns of unit expected norm) and A^+ x, which sets the box (Keskar et al.).

    A^+ x = (A^T A)^+ A^T x, with A^T A and A^T x summed over row blocks as A is drawn, so the
    work stops between blocks when the request is cancelled (a pinv of the whole A could not).
    """
    d = objective.dim
    generator = torch.Generator().manual_seed(seed)
    a = torch.empty(d, subspace_dim, dtype=torch.float64, device=x.device)
    gram = torch.zeros(subspace_dim, subspace_dim, dtype=torch.float64, device=x.device)
    rhs = torch.zeros(subspace_dim, dtype=torch.float64, device=x.device)
    rows = max(1, _BLOCK_VALUES // subspace_dim)
    for start in range(0, d, rows):
        objective.check()
        stop = min(start + rows, d)
        block = torch.randn(stop - start, subspace_dim, generator=generator, dtype=torch.float64) / math.sqrt(d)
        a[start:stop] = block
        block = a[start:stop]
        gram += block.T @ block
        rhs += block.T @ x[start:stop]
    objective.check()
    return a, torch.linalg.pinv(gram, hermitian=True) @ rhs
