"""Spectral density: SLQ's Wasserstein-1 distance to the exact spectrum against HVPs, and PyHessian's.

    python benchmarks/bench_density.py [--threads 1]

Digits MLP and CNN, 512 samples, float32 products; the truth is the spectrum of the dense
float64 Hessian. W1 is between the quadrature's measure (nodes, weights averaged over probes)
and the uniform measure on the exact eigenvalues, divided by the exact spectral range. Also the
first two moments against the exact ones, the negative mass against the exact share of negative
eigenvalues (which for trained networks is a cloud around zero, so the two need not agree), and
PyHessian's ``density()`` on the same model and batch when ``pyhessian`` is installed.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import scipy.stats
import torch
from torch import nn

from curvscope_service.curvature.estimators.probes import BlockProducts
from curvscope_service.curvature.estimators.slq import slq
from curvscope_service.curvature.estimators.spectral_density import NEGATIVE_TOLERANCE, spectral_masses
from models import batch, dense_hessian, operator, trained

RUNS = ((10, 5), (20, 10), (40, 10), (90, 10))


def w1_over_range(nodes: np.ndarray, weights: np.ndarray, eigenvalues: np.ndarray) -> float:
    distance = scipy.stats.wasserstein_distance(nodes, eigenvalues, weights)
    return distance / (eigenvalues.max() - eigenvalues.min())


def pyhessian_density(name: str, eigenvalues: np.ndarray) -> str:
    try:
        from pyhessian import hessian
    except ImportError:
        return "not installed (pip install '.[bench]')"
    inputs, targets = batch()
    computer = hessian(trained(name), nn.CrossEntropyLoss(), data=(inputs, targets), cuda=False)
    torch.manual_seed(0)
    start = time.perf_counter()
    try:
        nodes, weights = computer.density(iter=90, n_v=10)
    except Exception as error:  # the released code, as published, is what is measured
        return f"density(iter=90, n_v=10) fails: {type(error).__name__}: {str(error).splitlines()[0][:100]}"
    nodes, weights = np.asarray(nodes).reshape(-1), np.asarray(weights).reshape(-1) / len(nodes)
    return (f"density(iter=90, n_v=10): 900 HVPs, W1/range {w1_over_range(nodes, weights, eigenvalues):.2e}, "
            f"{time.perf_counter() - start:.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: stable on a shared box)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    for name in ("mlp", "cnn"):
        eigenvalues = torch.linalg.eigvalsh(dense_hessian(name)).numpy()
        op = operator(name)
        op.loss()
        print(f"\n{name}: {op.dim} parameters, spectrum [{eigenvalues.min():.4g}, {eigenvalues.max():.4g}], "
              f"mean {eigenvalues.mean():.4g}, mean square {np.mean(eigenvalues**2):.4g}, "
              f"negative share {np.mean(eigenvalues < 0):.3f}, below -{NEGATIVE_TOLERANCE:g} max|lambda| "
              f"{np.mean(eigenvalues < -NEGATIVE_TOLERANCE * np.abs(eigenvalues).max()):.3f}")
        print("| steps x probes | HVPs | W1 / range | mean | mean square | negative mass | seconds |")
        print("|---|---|---|---|---|---|---|")
        for steps, probes in RUNS:
            apply = BlockProducts(op, block_size=probes)
            start = time.perf_counter()
            q = slq(apply, op.dim, steps=steps, probes=probes, seed=0)
            seconds = time.perf_counter() - start
            nodes, weights = q.nodes.reshape(-1).numpy(), q.weights.reshape(-1).numpy() / probes
            masses = spectral_masses(q.nodes, q.weights)
            print(f"| {steps} x {probes} | {apply.products} | {w1_over_range(nodes, weights, eigenvalues):.2e} | "
                  f"{(weights * nodes).sum():.4g} | {(weights * nodes**2).sum():.4g} | "
                  f"{masses['negative_mass']:.3f} +- {masses['negative_mass_stderr']:.3f} | {seconds:.2f} |")
        print(f"PyHessian: {pyhessian_density(name, eigenvalues)}")


if __name__ == "__main__":
    main()
