"""LipSDP-Neuron and LipSDP-Layer (Fazlyab, Robey, Hassani, Morari & Pappas, NeurIPS 2019).

For f = W_L φ(W_{L-1} φ(… φ(W_0 x))) with each hidden layer i slope-restricted to [α_i, β_i],
L(f) ≤ √ρ whenever, with multipliers T_i = diag(λ_i) ⪰ 0 (one λ per neuron, or one per layer),

  M(ρ, λ) = Σ_i [v_i; h_i]ᵀ [[−2α_iβ_i T_i, (α_i+β_i) T_i], [(α_i+β_i) T_i, −2 T_i]] [v_i; h_i]
            − ρ‖x‖² + ‖W_L h_L‖²  ⪯ 0,          v_i = W_{i-1} h_{i-1}, h_0 = x,

a block-tridiagonal matrix over (x, h_1, …, h_L). Two things make it faster than the paper's
dense formulation, both exact:
- the input block is reduced to rank(W_0) ≤ n_1 rows: x enters only through W_0 = U S Vᵀ, and
  the directions of x outside range(V) contribute only −ρ‖·‖², so W_0 is replaced by U S
  (an MNIST net's 784 input rows become 50);
- every W_i is scaled to spectral norm 1 (the relaxation is positively homogeneous in each
  W_i) and √ρ is scaled back, which keeps the solver well conditioned.

The solver's ρ is never reported. ``certify`` takes its multipliers (negative entries clipped to
zero) and computes in float64, on the full unreduced matrix, the smallest ρ for which the LMI
holds: ρ* = λ_max(P + Q(−R)⁻¹Qᵀ) with P, Q, R the input, cross and hidden blocks (a Schur
complement; R ≺ 0 is required), then raises it until ``eigvalsh`` confirms M(ρ, λ) ⪯ 0.

This module imports cvxpy only inside ``solve``, which runs in a solver subprocess
(``solver_pool``); the server process uses only ``certify`` and the problem builders.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.linalg

# Measured on 2 cores: CVXOPT is fast and accurate up to an LMI of about 450 rows; SCS (its
# looser optimum certified afterwards) beyond that.
CVXOPT_MAX_ROWS = 450
VARIANTS = ("neuron", "layer")
SOLVERS = ("CVXOPT", "SCS")


@dataclass
class Certificate:
    bound: float | None  # √ρ of the certified ρ, in the network's own scale
    rho: float | None
    reason: str  # why there is no bound, or "" when certified


def lmi_rows(weights: list[np.ndarray], reduced: bool = True) -> int:
    """Rows of the LipSDP matrix: the (reduced) input block plus every hidden neuron."""
    hidden = sum(w.shape[0] for w in weights[:-1])
    first = min(weights[0].shape) if reduced else weights[0].shape[1]
    return first + hidden


def choose_solver(rows: int) -> str:
    return "CVXOPT" if rows <= CVXOPT_MAX_ROWS else "SCS"


def make_problem(
    weights: list[np.ndarray], alphas: list[float], betas: list[float], variant: str, solver: str | None = None,
) -> dict[str, Any]:
    """A picklable problem for a solver process: normalised weights, reduced input block."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown LipSDP variant {variant!r}")
    if len(weights) < 2 or len(alphas) != len(weights) - 1 or len(betas) != len(alphas):
        raise ValueError("LipSDP needs at least one hidden layer and one slope pair per hidden layer")
    norms = [float(np.linalg.norm(w, 2)) for w in weights]
    scaled = [w / n if n > 0 else w for w, n in zip(weights, norms)]
    u, s, _ = np.linalg.svd(scaled[0], full_matrices=False)
    keep = s > s[0] * 1e-13 if s.size and s[0] > 0 else np.zeros_like(s, dtype=bool)
    first = u[:, keep] * s[keep]
    rows = lmi_rows(weights)
    return {
        "weights": [first, *scaled[1:]], "alphas": list(map(float, alphas)), "betas": list(map(float, betas)),
        "variant": variant, "solver": solver or choose_solver(rows), "rows": rows,
    }


def solve(problem: dict[str, Any]) -> dict[str, Any]:
    """Solve one LipSDP problem with cvxpy; returns the status, raw ρ and the multipliers."""
    import cvxpy as cp

    weights, alphas, betas = problem["weights"], problem["alphas"], problem["betas"]
    hidden = [w.shape[0] for w in weights[:-1]]
    started = time.perf_counter()
    if problem["variant"] == "neuron":
        variables = [cp.Variable(n, nonneg=True) for n in hidden]
        lams = variables
    else:
        variables = [cp.Variable(nonneg=True) for _ in hidden]
        lams = [v * np.ones(n) for v, n in zip(variables, hidden)]
    rho = cp.Variable(nonneg=True)
    matrix = _assemble(cp, weights, alphas, betas, lams, rho)
    prob = cp.Problem(cp.Minimize(rho), [matrix << 0])
    options: dict[str, Any] = {}
    if problem["solver"] == "SCS":
        options = {"eps_abs": 1e-7, "eps_rel": 1e-7, "max_iters": 200_000}
    try:
        prob.solve(solver=problem["solver"], **options)
    except cp.error.SolverError as e:
        return {"status": f"solver_error: {str(e).splitlines()[0] if str(e) else type(e).__name__}",
                "seconds": time.perf_counter() - started}
    result: dict[str, Any] = {"status": prob.status, "seconds": time.perf_counter() - started}
    if prob.status in ("optimal", "optimal_inaccurate") and rho.value is not None:
        result["rho"] = float(rho.value)
        values = [np.asarray(v.value, dtype=np.float64).reshape(-1) for v in variables]
        if problem["variant"] == "layer":
            values = [np.full(n, float(v[0])) for v, n in zip(values, hidden)]
        result["lambdas"] = values
    return result


def _assemble(lib: Any, weights: list[Any], alphas: list[float], betas: list[float], lams: list[Any], rho: Any) -> Any:
    """M(ρ, λ) as block rows; ``lib`` is cvxpy (variables) or ``_Dense`` (numbers)."""
    depth = len(lams)
    sizes = [weights[0].shape[1], *[w.shape[0] for w in weights[:-1]]]
    blocks: list[list[Any]] = [[None] * (depth + 1) for _ in range(depth + 1)]
    for i in range(depth + 1):
        for j in range(depth + 1):
            blocks[i][j] = np.zeros((sizes[i], sizes[j]))
    blocks[0][0] = -rho * np.eye(sizes[0])
    for i in range(1, depth + 1):
        w = weights[i - 1]
        lam = lams[i - 1]
        ab, apb = alphas[i - 1] * betas[i - 1], alphas[i - 1] + betas[i - 1]
        if ab != 0.0:
            blocks[i - 1][i - 1] = blocks[i - 1][i - 1] - 2.0 * ab * (w.T @ lib.diag(lam) @ w)
        cross = apb * (w.T @ lib.diag(lam))
        blocks[i - 1][i] = cross
        blocks[i][i - 1] = cross.T
        blocks[i][i] = blocks[i][i] - 2.0 * lib.diag(lam)
    last = weights[-1]
    blocks[depth][depth] = blocks[depth][depth] + last.T @ last
    return lib.bmat(blocks)


class _Dense:
    """The numpy side of ``_assemble``."""

    diag = staticmethod(np.diag)
    bmat = staticmethod(np.block)


def lmi_matrix(weights: list[np.ndarray], alphas: list[float], betas: list[float], lambdas: list[np.ndarray], rho: float) -> np.ndarray:
    """M(ρ, λ) in float64, unreduced (input block of n_0 rows)."""
    return _assemble(_Dense, weights, alphas, betas, lambdas, rho)


def certify(
    weights: list[np.ndarray], alphas: list[float], betas: list[float], lambdas: list[np.ndarray],
) -> Certificate:
    """The smallest ρ with M(ρ, λ) ⪯ 0 for these multipliers, checked in float64; √ρ is a bound."""
    norms = [float(np.linalg.norm(w, 2)) for w in weights]
    if min(norms) == 0.0:
        return Certificate(0.0, 0.0, "")  # a zero layer: the network is constant
    scaled = [w / n for w, n in zip(weights, norms)]
    lams = [np.clip(np.asarray(lam, dtype=np.float64), 0.0, None) for lam in lambdas]
    m0 = lmi_matrix(scaled, alphas, betas, lams, 0.0)
    n0 = scaled[0].shape[1]
    p, q, r = m0[:n0, :n0], m0[:n0, n0:], m0[n0:, n0:]
    try:
        chol = scipy.linalg.cholesky(-r, lower=True)
    except np.linalg.LinAlgError:
        return Certificate(None, None, "the solver's multipliers leave the hidden block indefinite, so they certify no ρ")
    z = scipy.linalg.solve_triangular(chol, q.T, lower=True)
    schur = p + z.T @ z
    rho = max(float(scipy.linalg.eigvalsh((schur + schur.T) / 2.0, subset_by_index=[n0 - 1, n0 - 1])[0]), 0.0)
    # Rounding in the Schur complement can put ρ* a hair low: raise it until the full matrix passes.
    scale = max(rho, float(np.abs(m0).max()), 1e-300)
    for margin in (0.0, 1e-12, 1e-10, 1e-8, 1e-6, 1e-4):
        candidate = rho + margin * scale
        top = float(scipy.linalg.eigvalsh(m0 - candidate * _input_selector(m0.shape[0], n0),
                                          subset_by_index=[m0.shape[0] - 1, m0.shape[0] - 1])[0])
        if top <= 0.0:
            return Certificate(math.sqrt(candidate) * math.prod(norms), candidate * math.prod(norms) ** 2, "")
    return Certificate(None, None, "M(ρ, λ) stayed indefinite in float64 for every ρ tried")


def _input_selector(size: int, n0: int) -> np.ndarray:
    e = np.zeros((size, size))
    e[np.arange(n0), np.arange(n0)] = 1.0
    return e
