"""LipSDP solve time and bound/naive ratio per solver, curvscope's certified formulation against a
plain cvxpy formulation written as in the paper, on random ReLU nets and a small CNN.

    python benchmarks/bench_lipschitz.py [--threads 1] [--max-plain-rows 200] [--max-cvxopt-rows 300]
    python benchmarks/bench_lipschitz.py --large    # 1,024 hidden neurons, SCS, per layer pair or whole

Random weights (seed 0, N(0, 1/fan_in)). "ours" = the reduced, normalised, sparse LMI solved and
then certified in float64 (the certificate's time included); "plain" = the dense [A; B]ᵀ Q [A; B]
formulation with diag(λ) expressions and the same solver, its raw √ρ. Both run in this process
(the service runs the same solve in a subprocess). Solves above the row limits are skipped so
the whole run stays within a few minutes on two cores.

--large instead solves two nets of 1,024 hidden neurons (1,088 LMI rows) with SCS, once with the
LMI posed per pair of neighbouring layers and once whole (the default picks per
`lipsdp.cliques_pay`): about 25 minutes.
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import scipy.linalg
import torch
from torch import nn

from curvscope_service.lipschitz import lipsdp
from curvscope_service.lipschitz.eclipse_fast import eclipse_fast
from curvscope_service.lipschitz.network import Slope, extract_network
from curvscope_service.loading.checkpoint import LoadedModel, parameter_blocks

MLPS = [[64, 32, 10], [64, 64, 64, 10], [64, 100, 100, 100, 10], [64, 200, 200, 10]]
LARGE_MLPS = [[64, 256, 256, 256, 256, 10], [64, 512, 512, 10]]


def random_mlp(widths: list[int], seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((b, a)) / math.sqrt(a) for a, b in zip(widths[:-1], widths[1:])]


def small_cnn() -> list[np.ndarray]:
    """Conv(1->4, 3x3, stride 2) ReLU Conv(4->8, 3x3, stride 2) ReLU Linear on 8x8 inputs, unrolled."""
    torch.manual_seed(0)
    module = nn.Sequential(nn.Conv2d(1, 4, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(4, 8, 3, stride=2, padding=1),
                           nn.ReLU(), nn.Flatten(), nn.Linear(8 * 2 * 2, 10)).eval()
    model = LoadedModel(module, "safetensors", "sequential", (1, 8, 8), None, 0, parameter_blocks(module), None)
    return extract_network(model).network.weights


def plain(weights: list[np.ndarray], solver: str) -> float:
    import cvxpy as cp

    hidden = [w.shape[0] for w in weights[:-1]]
    n0, n = weights[0].shape[1], sum(hidden)
    ab = np.vstack([np.hstack([scipy.linalg.block_diag(*weights[:-1]), np.zeros((n, hidden[-1]))]),
                    np.hstack([np.zeros((n, n0)), np.eye(n)])])
    lam, rho = cp.Variable(n, nonneg=True), cp.Variable(nonneg=True)
    t = cp.diag(lam)
    q = cp.bmat([[np.zeros((n, n)), t], [t, -2 * t]])
    corner = np.zeros((n0 + n, n0 + n))
    corner[-hidden[-1]:, -hidden[-1]:] = weights[-1].T @ weights[-1]
    first = np.zeros((n0 + n, n0 + n))
    first[:n0, :n0] = np.eye(n0)
    m = ab.T @ q @ ab - rho * first + corner
    problem = cp.Problem(cp.Minimize(rho), [(m + m.T) / 2 << 0])
    options = {"eps_abs": lipsdp.SCS_EPS, "eps_rel": lipsdp.SCS_EPS, "max_iters": 200_000} if solver == "SCS" else {}
    problem.solve(solver=solver, **options)
    return math.sqrt(rho.value) if problem.status == "optimal" else float("nan")


def ours(weights: list[np.ndarray], solver: str, chordal: bool | None = None) -> float:
    k = len(weights) - 1
    problem = lipsdp.make_problem(weights, [0.0] * k, [1.0] * k, "neuron", solver)
    if chordal is not None:
        problem["chordal"] = chordal
    result = lipsdp.solve(problem)
    if result["status"] != "optimal":
        return float("nan")
    return lipsdp.certify(weights, [0.0] * k, [1.0] * k, result["lambdas"]).bound or float("nan")


def timed(fn, *args) -> tuple[float, float]:
    started = time.perf_counter()
    value = fn(*args)
    return value, time.perf_counter() - started


def large() -> None:
    print("| network | LMI rows | naive | SCS per layer pair: s, bound / naive | SCS whole: s, bound / naive | speed-up |")
    print("|---|---|---|---|---|---|")
    for widths in LARGE_MLPS:
        weights = random_mlp(widths)
        naive = math.prod(np.linalg.norm(w, 2) for w in weights)
        split, t_split = timed(ours, weights, "SCS", True)
        whole, t_whole = timed(ours, weights, "SCS", False)
        print(f"| {widths} | {lipsdp.lmi_rows(weights)} | {naive:.4g} | {t_split:.1f} s, {split / naive:.5f} | "
              f"{t_whole:.1f} s, {whole / naive:.5f} | {t_whole / t_split:.1f}x |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max-plain-rows", type=int, default=200)
    parser.add_argument("--max-cvxopt-rows", type=int, default=300)
    parser.add_argument("--large", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.large:
        large()
        return
    cases = [(str(w), random_mlp(w)) for w in MLPS] + [("CNN 1x8x8", small_cnn())]
    for solver in ("CVXOPT", "SCS"):  # warm: imports and first-call set-up are not timed
        ours(random_mlp([4, 3, 2]), solver)
        plain(random_mlp([4, 3, 2]), solver)
    print("| network | LMI rows (plain -> ours) | naive | ECLipsE-Fast / naive | solver | ours: s, bound / naive | plain: s, sqrt(rho) / naive | speed-up |")
    print("|---|---|---|---|---|---|---|---|")
    for name, weights in cases:
        naive = math.prod(np.linalg.norm(w, 2) for w in weights)
        fast = eclipse_fast(weights, [Slope("relu", 0.0, 1.0)] * (len(weights) - 1))
        rows_plain, rows_ours = lipsdp.lmi_rows(weights, reduced=False), lipsdp.lmi_rows(weights)
        for solver in ("CVXOPT", "SCS"):
            if solver == "CVXOPT" and rows_ours > args.max_cvxopt_rows:
                print(f"| {name} | {rows_plain} -> {rows_ours} | {naive:.4g} | {fast / naive:.4f} | {solver} | skipped (over {args.max_cvxopt_rows} rows) | | |")
                continue
            bound, t_ours = timed(ours, weights, solver)
            if rows_plain <= args.max_plain_rows:
                raw, t_plain = timed(plain, weights, solver)
                plain_cell, speed = f"{t_plain:.2f} s, {raw / naive:.5f}", f"{t_plain / t_ours:.1f}x"
            else:
                plain_cell, speed = "skipped", ""
            print(f"| {name} | {rows_plain} -> {rows_ours} | {naive:.4g} | {fast / naive:.4f} | {solver} | "
                  f"{t_ours:.2f} s, {bound / naive:.5f} | {plain_cell} | {speed} |", flush=True)


if __name__ == "__main__":
    main()
