"""LipSDP-Neuron and LipSDP-Layer over a whole feed-forward graph: residual adds, projection
shortcuts and concatenations inside one matrix inequality (Fazlyab et al., NeurIPS 2019, whose
quadratic constraints hold for any network in which every activation's input is an affine
function of the input and of earlier activations).

Stack the input x and every activation's output h = (h_1, …, h_n) as z = (x, h). A graph of affine
maps and slope-restricted activations is then described by two matrices: the pre-activations
v = R z (row j depends on x and on activations before neuron j only) and the output y = F z. Each
neuron j with slopes in [α_j, β_j] satisfies, for two inputs and the differences δ,
−2α_jβ_j δv_j² + 2(α_j+β_j) δv_j δh_j − 2 δh_j² ≥ 0, so with multipliers λ_j ≥ 0

    M(ρ, λ) = Σ_j λ_j (−2α_jβ_j r_j r_jᵀ + (α_j+β_j)(r_j e_jᵀ + e_j r_jᵀ) − 2 e_j e_jᵀ) + FᵀF − ρ diag(I, 0) ⪯ 0

gives ‖δy‖² ≤ ρ‖δx‖²: L ≤ √ρ. For a chain this is the usual LipSDP matrix; for a residual block
x + f(x) the skip sits inside F and R, which is tighter than 1 + L(f). The input block is reduced
to the rank of x's columns of (R; F), as for chains. As there, the solver's ρ is never reported:
``certify`` recomputes the smallest ρ for the returned multipliers in float64 on the full matrix.
cvxpy is imported only inside ``solve`` (a solver subprocess).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from .lipsdp import Certificate, choose_solver, run_solvers, smallest_rho


@dataclass
class LiftedGraph:
    """A feed-forward graph as v = R z, y = F z over z = (x, h); per-neuron slopes and the
    activation node each neuron belongs to (one multiplier per node in the Layer variant)."""

    r: np.ndarray  # (neurons, n0 + neurons)
    f: np.ndarray  # (outputs, n0 + neurons)
    n0: int
    alphas: np.ndarray
    betas: np.ndarray
    groups: np.ndarray  # activation index of each neuron


def make_problem(graph: LiftedGraph, variant: str, solver: str | None = None) -> dict[str, Any]:
    """A picklable problem for a solver process, with the input block reduced to its rank."""
    if variant not in ("neuron", "layer"):
        raise ValueError(f"unknown LipSDP variant {variant!r}")
    n0 = graph.n0
    columns = np.vstack([graph.r[:, :n0], graph.f[:, :n0]])
    u, s, _ = np.linalg.svd(columns, full_matrices=False)
    keep = s > s[0] * 1e-13 if s.size and s[0] > 0 else np.zeros_like(s, dtype=bool)
    reduced = u[:, keep] * s[keep]  # x's columns in the coordinates of range(V)
    split = graph.r.shape[0]
    r = np.hstack([reduced[:split], graph.r[:, n0:]])
    f = np.hstack([reduced[split:], graph.f[:, n0:]])
    rows = r.shape[1]
    return {"form": "graph", "r": r, "f": f, "n0": int(keep.sum()), "alphas": graph.alphas, "betas": graph.betas,
            "groups": graph.groups.astype(np.float64), "variant": variant, "rows": rows,
            "solver": solver or choose_solver(rows), "fallback": solver is None}


def _coefficients(r: np.ndarray, n0: int, alphas: np.ndarray, betas: np.ndarray, columns: np.ndarray, count: int) -> Any:
    """vec(Σ_j λ_{c(j)} C_j) = coefficients @ λ as a sparse (size², count) matrix, column-major vec."""
    import scipy.sparse

    size = r.shape[1]
    rows, cols, vals = [], [], []
    for j, row in enumerate(r):
        nz = np.flatnonzero(row)
        e = n0 + j
        var = columns[j]
        apb, ab = alphas[j] + betas[j], alphas[j] * betas[j]
        rows += [nz + e * size, e + nz * size, np.array([e + e * size])]
        cols += [np.full(2 * nz.size + 1, var)]
        vals += [apb * row[nz], apb * row[nz], np.array([-2.0])]
        if ab != 0.0:
            p, q = np.meshgrid(nz, nz, indexing="ij")
            rows.append((p + q * size).ravel())
            cols.append(np.full(p.size, var))
            vals.append((-2.0 * ab * np.outer(row[nz], row[nz])).ravel())
    return scipy.sparse.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
                                   shape=(size * size, count))


def _columns(groups: np.ndarray, neuron: bool) -> tuple[np.ndarray, int]:
    if neuron:
        return np.arange(groups.size), groups.size
    return groups.astype(int), int(groups.max()) + 1 if groups.size else 0


def solve(problem: dict[str, Any]) -> dict[str, Any]:
    """Solve the lifted LipSDP with cvxpy; the status, raw ρ and the per-neuron multipliers."""
    import cvxpy as cp

    r, f, n0 = problem["r"], problem["f"], int(problem["n0"])
    alphas, betas = np.asarray(problem["alphas"]), np.asarray(problem["betas"])
    columns, count = _columns(np.asarray(problem["groups"]), problem["variant"] == "neuron")
    size = r.shape[1]
    started = time.perf_counter()
    coefficients = _coefficients(r, n0, alphas, betas, columns, count)
    z = cp.Variable(count + 1, nonneg=True)  # the multipliers, then ρ
    constant = f.T @ f
    rho_part = np.zeros((size, size))
    rho_part[np.arange(n0), np.arange(n0)] = -1.0
    matrix = cp.reshape(coefficients @ z[:count], (size, size), order="F") + constant + z[count] * rho_part
    prob = cp.Problem(cp.Minimize(z[count]), [(matrix + matrix.T) / 2 << 0])
    result = run_solvers(prob, problem, started)
    if result["status"] in ("optimal", "optimal_inaccurate") and z.value is not None:
        values = np.asarray(z.value, dtype=np.float64)
        result["rho"] = float(values[count])
        result["lambdas"] = values[:count][columns]  # per neuron
    return result


def lmi_matrix(graph: LiftedGraph, lambdas: np.ndarray) -> np.ndarray:
    """M(0, λ) in float64 over the full, unreduced input block."""
    m = graph.f.T @ graph.f
    for j, (row, lam) in enumerate(zip(graph.r, lambdas)):
        if lam == 0.0:
            continue
        a, b = graph.alphas[j], graph.betas[j]
        e = graph.n0 + j
        m -= 2.0 * a * b * lam * np.outer(row, row)
        m[:, e] += (a + b) * lam * row
        m[e, :] += (a + b) * lam * row
        m[e, e] -= 2.0 * lam
    return m


def certify(graph: LiftedGraph, lambdas: np.ndarray) -> Certificate:
    """The smallest ρ with M(ρ, λ) ⪯ 0 for these multipliers (negatives clipped), in float64."""
    m0 = lmi_matrix(graph, np.clip(np.asarray(lambdas, dtype=np.float64), 0.0, None))
    rho, reason = smallest_rho(m0, graph.n0)
    if rho is None:
        return Certificate(None, None, reason)
    return Certificate(math.sqrt(rho), rho, "")
