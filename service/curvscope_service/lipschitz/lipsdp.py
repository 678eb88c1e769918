"""LipSDP-Neuron and LipSDP-Layer (Fazlyab, Robey, Hassani, Morari & Pappas, NeurIPS 2019).

For f = W_L φ(W_{L-1} φ(… φ(W_0 x))) with each hidden layer i slope-restricted to [α_i, β_i],
L(f) ≤ √ρ whenever, with multipliers T_i = diag(λ_i) ⪰ 0 (one λ per neuron, or one per layer),

  M(ρ, λ) = Σ_i [v_i; h_i]ᵀ [[−2α_iβ_i T_i, (α_i+β_i) T_i], [(α_i+β_i) T_i, −2 T_i]] [v_i; h_i]
            − ρ‖x‖² + ‖W_L h_L‖²  ⪯ 0,          v_i = W_{i-1} h_{i-1}, h_0 = x,

a block-tridiagonal matrix over (x, h_1, …, h_L). Three things make it faster than the paper's
dense formulation, all exact:
- the input block is reduced to rank(W_0) ≤ n_1 rows: x enters only through W_0 = U S Vᵀ, and
  the directions of x outside range(V) contribute only −ρ‖·‖², so W_0 is replaced by U S
  (an MNIST net's 784 input rows become 50);
- every W_i is scaled to spectral norm 1 (the relaxation is positively homogeneous in each
  W_i) and √ρ is scaled back, which keeps the solver well conditioned;
- with SCS, where the layers are narrow against the whole (``cliques_pay``), M ⪯ 0 is posed as
  one LMI per pair of neighbouring blocks (chordal decomposition, ``_clique_constraints``): SCS's
  cost per iteration then follows the pairs of layers instead of the whole matrix.

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

# Measured on 2 shared cores (benchmarks/bench_lipschitz.py): CVXOPT's interior point is exact and
# fastest on small LMIs (2 s for 100 rows) but grows as rows³ x variables (119 s at 364 rows, where
# SCS at 1e-6 takes 20 s); SCS, its optimum certified afterwards, beyond 160 rows.
CVXOPT_MAX_ROWS = 160
# SCS's tolerance: its optimum may sit slightly low, which the certificate corrects upwards.
SCS_EPS = 1e-6
VARIANTS = ("neuron", "layer")


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
        "variant": variant, "solver": solver or choose_solver(rows), "rows": rows, "norms": norms,
        "fallback": solver is None,
    }


def _multiplier_scales(norms: list[float]) -> list[float]:
    """λ of the network's own scale = λ of the normalised problem × these factors (Π² / P_i²,
    P_i = ‖W_0‖⋯‖W_{i-1}‖): the pre-activations of layer i shrink by P_i under normalisation."""
    total = math.prod(norms) ** 2
    return [total / math.prod(norms[:i]) ** 2 for i in range(1, len(norms))]


def solve(problem: dict[str, Any]) -> dict[str, Any]:
    """Solve one LipSDP problem with cvxpy; returns the status, raw ρ and the multipliers."""
    import cvxpy as cp

    weights, alphas, betas = problem["weights"], problem["alphas"], problem["betas"]
    hidden = [w.shape[0] for w in weights[:-1]]
    neuron = problem["variant"] == "neuron"
    started = time.perf_counter()
    count = sum(hidden) if neuron else len(hidden)
    z = cp.Variable(count + 1, nonneg=True)  # the multipliers, then ρ
    coefficients, constant, size = _affine_lmi(weights, alphas, betas, neuron)
    matrix = cp.reshape(coefficients @ z, (size, size), order="F") + constant
    # −2αβ W_iᵀ diag(λ) W_i is dense per neuron: left to cvxpy, and only when α·β ≠ 0
    offsets = np.cumsum([0, weights[0].shape[1], *hidden])
    first = 0
    for i, w in enumerate(weights[:-1]):
        ab = alphas[i] * betas[i]
        lam = z[first:first + hidden[i]] if neuron else z[i] * np.ones(hidden[i])
        first += hidden[i] if neuron else 1
        if ab != 0.0:
            block = -2.0 * ab * (w.T @ cp.diag(lam) @ w)
            matrix = matrix + _embed(cp, block, int(offsets[i]), size)
    sizes = [int(offsets[i + 1] - offsets[i]) for i in range(len(offsets) - 1)]
    chordal = problem.get("chordal", problem["solver"] == "SCS" and cliques_pay(sizes))
    constraints = _clique_constraints(cp, matrix, sizes) if chordal else [(matrix + matrix.T) / 2 << 0]
    prob = cp.Problem(cp.Minimize(z[count]), constraints)
    result = run_solvers(prob, problem, started)
    if result["status"] in ("optimal", "optimal_inaccurate") and z.value is not None:
        values = np.asarray(z.value, dtype=np.float64)
        scales = _multiplier_scales(problem["norms"])
        result["rho"] = float(values[count]) * math.prod(problem["norms"]) ** 2
        if neuron:
            lambdas = np.split(values[:count], np.cumsum(hidden)[:-1])
        else:
            lambdas = [np.full(n, values[i]) for i, n in enumerate(hidden)]
        # in the network's own scale, so that they mean the same thing to any caller
        result["lambdas"] = [lam * scale for lam, scale in zip(lambdas, scales)]
    return result


def run_solvers(prob: Any, problem: dict[str, Any], started: float) -> dict[str, Any]:
    """Solve a cvxpy problem with the problem's solver; an automatic choice falls back to SCS when
    CVXOPT's interior point breaks down (it does on LMIs with a large null space at the optimum,
    e.g. linear activations). The status, the solver used and the seconds since ``started``."""
    import cvxpy as cp

    solvers = [problem["solver"]] + (["SCS"] if problem.get("fallback") and problem["solver"] != "SCS" else [])
    status = ""
    for solver in solvers:
        options: dict[str, Any] = {}
        if solver == "SCS":
            eps = problem.get("eps", SCS_EPS)
            options = {"eps_abs": eps, "eps_rel": eps, "max_iters": 200_000}
        try:
            prob.solve(solver=solver, **options)
        except cp.error.SolverError as e:
            status = f"solver_error: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
            continue
        status = prob.status
        break
    return {"status": status, "seconds": time.perf_counter() - started, "solver": solver}


def cliques_pay(sizes: list[int]) -> bool:
    """Whether one LMI per pair of neighbouring blocks is worth it for SCS: its time per iteration
    is mostly eigendecompositions (cubic in the size), and the pairs bring extra variables and
    more iterations. Measured (benchmarks/bench_lipschitz.py): pairs 1.3x faster at 364 rows over
    three layers of 100 (cubes 0.42 of the whole) and 2.4x at 1088 rows over four of 256 (0.34);
    1.4x slower at 464 rows over two of 200 (0.82), and slower on the small CNN (0.73)."""
    if len(sizes) < 3:
        return False
    pairs = sum((a + b) ** 3 for a, b in zip(sizes[:-1], sizes[1:]))
    return pairs <= 0.5 * sum(sizes) ** 3


def _clique_constraints(cp: Any, matrix: Any, sizes: list[int]) -> list[Any]:
    """M ⪯ 0 for a block-tridiagonal M over blocks of ``sizes``, as one small LMI per pair of
    neighbouring blocks: M ⪯ 0 iff M = Σ_k E_kᵀ S_k E_k with every S_k ⪯ 0 on the cliques
    {k, k+1} of its chordal sparsity pattern (Agler, Helton, McCullough & Rodman 1988). Each
    shared diagonal block D_k is split as Y_k (clique k−1) + (D_k − Y_k) (clique k), Y_k free."""
    offsets = np.cumsum([0, *sizes])
    splits = {k: cp.Variable((sizes[k], sizes[k]), symmetric=True) for k in range(1, len(sizes) - 1)}
    constraints = []
    for k in range(len(sizes) - 1):
        a, b, c = int(offsets[k]), int(offsets[k + 1]), int(offsets[k + 2])
        top = matrix[a:b, a:b] - splits[k] if k in splits else matrix[a:b, a:b]
        bottom = splits[k + 1] if k + 1 in splits else matrix[b:c, b:c]
        clique = cp.bmat([[top, matrix[a:b, b:c]], [matrix[b:c, a:b], bottom]])
        constraints.append((clique + clique.T) / 2 << 0)
    return constraints


def _embed(cp: Any, block: Any, offset: int, size: int) -> Any:
    n = block.shape[0]
    left = np.zeros((size, n))
    left[offset:offset + n, :] = np.eye(n)
    return left @ block @ left.T


def _affine_lmi(
    weights: list[np.ndarray], alphas: list[float], betas: list[float], neuron: bool,
) -> tuple[Any, np.ndarray, int]:
    """The LMI's terms that are sparse in the variables: a (size², variables) matrix C and a
    constant K with vec(M) = C z + vec(K), leaving out the −2αβ terms. One sparse product is
    much faster for cvxpy to compile than a diag(λ) expression per layer."""
    import scipy.sparse

    hidden = [w.shape[0] for w in weights[:-1]]
    sizes = [weights[0].shape[1], *hidden]
    offsets = np.cumsum([0, *sizes])
    size = int(offsets[-1])
    count = sum(hidden) if neuron else len(hidden)
    rows, cols, vals = [], [], []

    def add(r: np.ndarray, c: np.ndarray, var: np.ndarray, v: np.ndarray) -> None:
        rows.append(r + c * size)  # column-major vec
        cols.append(var)
        vals.append(v)

    first = 0
    for i, w in enumerate(weights[:-1]):
        n_out, n_in = w.shape
        var = (first + np.arange(n_out)) if neuron else np.full(n_out, i)
        first += n_out if neuron else 1
        j, a = np.meshgrid(np.arange(n_out), np.arange(n_in), indexing="ij")
        value = (alphas[i] + betas[i]) * w[j, a]
        r, c = offsets[i] + a, offsets[i + 1] + j
        add(r.ravel(), c.ravel(), var[j].ravel(), value.ravel())
        add(c.ravel(), r.ravel(), var[j].ravel(), value.ravel())
        d = offsets[i + 1] + np.arange(n_out)
        add(d, d, var, np.full(n_out, -2.0))
    x = np.arange(sizes[0])
    add(x, x, np.full(sizes[0], count), np.full(sizes[0], -1.0))
    coefficients = scipy.sparse.csr_matrix(
        (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(size * size, count + 1))
    constant = np.zeros((size, size))
    last = weights[-1]
    constant[offsets[-2]:, offsets[-2]:] = last.T @ last
    return coefficients, constant, size


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
    lams = [np.clip(np.asarray(lam, dtype=np.float64), 0.0, None) / scale
            for lam, scale in zip(lambdas, _multiplier_scales(norms))]
    m0 = lmi_matrix(scaled, alphas, betas, lams, 0.0)
    rho, reason = smallest_rho(m0, scaled[0].shape[1])
    if rho is None:
        return Certificate(None, None, reason)
    return Certificate(math.sqrt(rho) * math.prod(norms), rho * math.prod(norms) ** 2, "")


def smallest_rho(m0: np.ndarray, n0: int) -> tuple[float | None, str]:
    """The smallest ρ with M0 − ρ·diag(I_n0, 0) ⪯ 0, checked in float64, or None and why: a Schur
    complement of the hidden block (which must be negative definite), then an eigenvalue check of
    the whole matrix."""
    p, q, r = m0[:n0, :n0], m0[:n0, n0:], m0[n0:, n0:]
    try:
        chol = scipy.linalg.cholesky(-r, lower=True)
    except np.linalg.LinAlgError:
        return None, "the solver's multipliers leave the hidden block indefinite, so they certify no ρ"
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
            return candidate, ""
    return None, "M(ρ, λ) stayed indefinite in float64 for every ρ tried"


def _input_selector(size: int, n0: int) -> np.ndarray:
    e = np.zeros((size, size))
    e[np.arange(n0), np.arange(n0)] = 1.0
    return e
