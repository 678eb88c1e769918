"""Top-1 and top-5 Hessian eigenvalues of a ResNet with BatchNorm: curvscope vs PyHessian vs curvlinops.

    python benchmarks/bench_race.py [--threads 1] [--samples 32] [--tols 1e-3 1e-4]

One model and one batch for all three libraries: ``models.resnet()`` (308,650 parameters, every
conv followed by BatchNorm, residual blocks) after 10 Adam steps on ``samples`` random 3x32x32
images with random labels, in eval mode, mean cross-entropy, float32 products.

- curvscope: ``lanczos`` (thick-restart Lanczos, residual test ||H y - theta y|| <= tol |theta|)
  on ``HessianOperator`` (retained graph, built before the clock starts).
- PyHessian 0.1: ``hessian(...).eigenvalues(top_n=k, tol=tol)``, its deflated power iteration
  with its own rule (stop when the estimate changes by less than tol, relative; at most 100
  products per eigenvalue). Its graph is built in the constructor, before the clock starts.
  Products are counted by wrapping ``pyhessian.hessian.hessian_vector_product``.
- curvlinops 3.0.1: ``HessianLinearOperator(...).to_scipy(float64)`` and
  ``scipy.sparse.linalg.eigsh(k, which="LA", tol=tol)`` (ARPACK's implicitly restarted Lanczos,
  stopping on the Ritz residual), products counted by a wrapping ``LinearOperator``.
  ``check_deterministic=False``: its check would spend products before the race.

Truth: a long float64 Lanczos run (tol 1e-10) on the float64 copy of the same model; its
largest residual is printed and must be far below the tolerances raced. Each solve runs once
(the table's seconds vary by about 10 % between runs on a shared machine; the products do not).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator, eigsh
from torch import nn

from curvscope_service.curvature.operators.hessian import HessianOperator
from curvscope_service.curvature.solvers.lanczos import lanczos
from models import curvlinops_eigen, median_seconds, pyhessian_eigen, random_images, trained_resnet

STEPS = 10


def worst_error(values: list[float], truth: list[float]) -> float:
    return max(abs(v - t) / abs(t) for v, t in zip(sorted(values, reverse=True), truth))


def ours(model: nn.Module, inputs, targets, k: int, tol: float) -> tuple[list[float], int, float]:
    op = HessianOperator(model, inputs, targets, nn.functional.cross_entropy)
    op.loss()  # builds the retained graph
    start = time.perf_counter()
    result = lanczos(op.matvec, op.dim, top_k=k, tol=tol, max_products=2000, dtype=op.dtype)
    return result.largest, result.products, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: stable on a shared box)")
    parser.add_argument("--samples", type=int, default=32, help="random images in the batch")
    parser.add_argument("--tols", type=float, nargs="+", default=[1e-3, 1e-4], help="relative tolerances raced")
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 5], help="numbers of top eigenvalues")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    inputs, targets = random_images(args.samples)
    model = trained_resnet(args.samples, steps=STEPS)
    dim = sum(p.numel() for p in model.parameters())

    exact = HessianOperator(trained_resnet(args.samples, steps=STEPS, dtype=torch.float64),
                            inputs.double(), targets, nn.functional.cross_entropy)
    exact.loss()
    reference = lanczos(exact.matvec, exact.dim, top_k=max(args.ks), bottom_k=max(args.ks), tol=1e-10,
                        max_products=3000)
    truth = reference.largest
    # Power iteration finds the eigenvalues largest in magnitude, whatever their sign.
    by_magnitude = sorted(reference.largest + reference.smallest, key=abs, reverse=True)
    print(f"resnet: {dim} parameters, {args.samples} samples, loss {exact.loss():.4f}")
    print(f"truth (float64 Lanczos, {reference.products} products, converged {reference.converged}): "
          f"{[f'{t:.6g}' for t in truth]}, worst relative residual "
          f"{max(r / abs(t) for r, t in zip(reference.largest_residuals, truth)):.1e}; smallest "
          f"{[f'{t:.6g}' for t in reference.smallest]}")
    del exact

    op = HessianOperator(model, inputs, targets, nn.functional.cross_entropy)
    op.loss()
    v = torch.randn(op.dim)
    print(f"one HVP (curvscope, retained graph): {median_seconds(lambda: op.matvec(v), repeats=10) * 1e3:.1f} ms")
    del op

    solvers = {"curvscope Lanczos": ours, "PyHessian power": pyhessian_eigen, "curvlinops + eigsh": curvlinops_eigen}
    print("\n| tol | k | library | HVPs | seconds | s / HVP | worst rel. error | reached tol |")
    print("|-----|---|---------|------|---------|---------|------------------|-------------|")
    for tol in args.tols:
        for k in args.ks:
            rows = {}
            for name, solve in solvers.items():
                values, products, seconds = solve(model, inputs, targets, k, tol)
                error = worst_error(values, truth[:k])
                rows[name] = (products, seconds)
                print(f"| {tol:.0e} | {k} | {name} | {products} | {seconds:.2f} | {seconds / products:.3f} "
                      f"| {error:.1e} | {'yes' if error <= tol else 'no'} |", flush=True)
                if error > tol:
                    magnitude = worst_error(values, sorted(by_magnitude[:k], reverse=True))
                    print(f"  ({name} returned {[f'{x:.6g}' for x in values]}; against the {k} largest in "
                          f"magnitude its worst relative error is {magnitude:.1e})")
            base_products, base_seconds = rows["curvscope Lanczos"]
            for name, (products, seconds) in rows.items():
                if name != "curvscope Lanczos":
                    print(f"|     |   | {name} / curvscope | {products / base_products:.1f}x | "
                          f"{seconds / base_seconds:.1f}x | | | |")


if __name__ == "__main__":
    main()
