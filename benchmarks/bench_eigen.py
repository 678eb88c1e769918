"""Extreme Hessian eigenvalues: Lanczos against power iteration with deflation, PyHessian's method.

    python benchmarks/bench_eigen.py [--threads 1]

Digits MLP and CNN, 512 samples, float32 products; the truth is the dense float64 Hessian's
eigendecomposition. For top-1 and top-5 at tol 1e-3: the products each method used, the worst
relative error it reached, its seconds, and for Lanczos the solver overhead = solve seconds /
(products x one product's seconds). The operator's graphs are built before the solve, as the
engine does when it reads the loss for the report.

Rows "power re-impl." are our re-implementation of PyHessian's rule
(``curvature/solvers/power_iteration.py``) on our operator; rows "PyHessian 0.1" run PyHessian itself on
the same model and batch (its own products, full batch) when the ``pyhessian`` package is
installed (``pip install '.[bench]'``), and are left out, with a note, when it is not.
"""

from __future__ import annotations

import argparse
import importlib.util

import torch

from curvscope_service.curvature.solvers.lanczos import lanczos
from curvscope_service.curvature.solvers.power_iteration import power_iteration
from models import batch, dense_hessian, median_seconds, operator, pyhessian_eigen, trained


def worst_error(values: list[float], truth: list[float]) -> float:
    return max(abs(v - t) / abs(t) for v, t in zip(values, truth))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: stable on a shared box)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with_pyhessian = importlib.util.find_spec("pyhessian") is not None
    if not with_pyhessian:
        print("pyhessian is not installed (pip install '.[bench]'): no PyHessian 0.1 rows")

    for name in ("mlp", "cnn"):
        truth = torch.linalg.eigvalsh(dense_hessian(name)).flip(0).tolist()
        op = operator(name)
        op.loss()
        v = torch.randn(op.dim)
        hvp = median_seconds(lambda: op.matvec(v))
        print(f"\n{name}: {op.dim} parameters, one HVP = {hvp * 1e3:.2f} ms, "
              f"top-5 truth {[round(t, 4) for t in truth[:5]]}")
        print(f"{'k':>2} {'method':<18}{'HVPs':>6}{'worst rel err':>15}{'<=1e-3':>8}{'seconds':>9}{'overhead':>10}")
        for k in (1, 5):
            runs = [lanczos(op.matvec, op.dim, top_k=k, tol=1e-3, dtype=op.dtype) for _ in range(3)]
            result = sorted(runs, key=lambda r: r.seconds)[1]
            hvp = median_seconds(lambda: op.matvec(v))
            error = worst_error(result.largest, truth[:k])
            overhead = result.seconds / (result.products * hvp)
            print(f"{k:>2} {'lanczos':<18}{result.products:>6}{error:>15.1e}{str(error <= 1e-3):>8}"
                  f"{result.seconds:>9.3f}{overhead:>10.2f}")
            power = power_iteration(op.matvec, op.dim, top_n=k, tol=1e-3, max_iter=100, dtype=op.dtype)
            error = worst_error(sorted(power.eigenvalues, reverse=True), truth[:k])
            print(f"{k:>2} {'power re-impl.':<18}{power.products:>6}{error:>15.1e}{str(error <= 1e-3):>8}"
                  f"{power.seconds:>9.3f}{'':>10}   {power.products / result.products:.1f}x the HVPs of Lanczos")
            if with_pyhessian:
                values, products, seconds = pyhessian_eigen(trained(name), *batch(), k, 1e-3)
                error = worst_error(sorted(values, reverse=True), truth[:k])
                print(f"{k:>2} {'PyHessian 0.1':<18}{products:>6}{error:>15.1e}{str(error <= 1e-3):>8}"
                      f"{seconds:>9.3f}{'':>10}   {products / result.products:.1f}x the HVPs of Lanczos")


if __name__ == "__main__":
    main()
