"""Hessian trace: Hutchinson vs Hutch++ vs XTrace at equal HVP counts, and PyHessian's trace.

    python benchmarks/bench_trace.py [--threads 1] [--seeds 8] [--budgets 30 99 300] [--models mlp cnn]
    python benchmarks/bench_trace.py --curvlinops-only [--models cnn]

Digits MLP and CNN, 512 samples, float32 products; the truth is the trace of the dense float64
Hessian. For each budget of products: the root-mean-square relative error over the seeds, and
the mean reported standard error relative to the trace. PyHessian's ``trace()`` (Hutchinson that
stops when the running mean changes by less than 1e-3 relative, at most 100 samples) is run on
the same model and batch when the ``pyhessian`` package is installed (``.[bench]``), and so are
curvlinops' ``hutchinson_trace``, ``hutchpp_trace`` and ``xtrace`` on its ``HessianLinearOperator``
at the same budgets (Hutch++ needs a multiple of 3 products, XTrace an even number: the budget is
rounded down). Then each of our estimators seeded with the Ritz pairs of a top-``--seeded``
Lanczos solve at tol 1e-3 (what ``hessian_eigen`` hands on to ``hessian_trace`` in one request),
at the same trace budgets; the solve's own products are printed apart. Then the time of one XTrace estimate with products batched 8 at a time (vmap'd)
vs one vector at a time. --curvlinops-only runs curvlinops' estimators alone (their products cost
about three times ours on the CNN).
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from torch import nn

from curvscope_service.curvature.estimators.trace import METHODS, estimate_trace
from curvscope_service.curvature.solvers.extreme_eigenvalues import compute_hessian_eigen
from models import batch, dense_hessian, operator, trained


def curvlinops_traces(name: str, budgets: list[int], seeds: int, truth: float) -> dict[tuple[str, int], float] | None:
    """{(method, budget): rms relative error} of curvlinops' estimators, or None if not installed."""
    try:
        import curvlinops
    except ImportError:
        return None
    model = trained(name)
    inputs, targets = batch()
    H = curvlinops.HessianLinearOperator(model, nn.CrossEntropyLoss(), list(model.parameters()),
                                         [(inputs, targets)], check_deterministic=False)
    estimators = {"hutchinson": (curvlinops.hutchinson_trace, 1), "hutchpp": (curvlinops.hutchpp_trace, 3),
                  "xtrace": (curvlinops.xtrace, 2)}
    errors = {}
    for method, (estimator, multiple) in estimators.items():
        for budget in budgets:
            squares = 0.0
            for seed in range(seeds):
                torch.manual_seed(seed)
                estimate = estimator(H, budget - budget % multiple).item()
                squares += ((estimate - truth) / truth) ** 2
            errors[method, budget] = math.sqrt(squares / seeds)
    return errors


def pyhessian_trace(name: str, seeds: int, truth: float) -> tuple[float, float] | None:
    """(mean HVPs, rms relative error) of PyHessian's default trace(), or None if not installed."""
    try:
        from pyhessian import hessian
    except ImportError:
        return None
    inputs, targets = batch()
    computer = hessian(trained(name), nn.CrossEntropyLoss(), data=(inputs, targets), cuda=False)
    products, errors = [], []
    for seed in range(seeds):
        torch.manual_seed(seed)
        samples = computer.trace()
        products.append(len(samples))
        errors.append((sum(samples) / len(samples) - truth) / truth)
    return sum(products) / seeds, math.sqrt(sum(e * e for e in errors) / seeds)


def ours(name: str, truth: float, args: argparse.Namespace) -> None:
    """Our estimators plain and seeded, PyHessian's trace(), and XTrace's batched products."""
    op = operator(name)
    op.loss()  # build the retained graphs once, as the engine does
    print(f"{op.dim} parameters")
    print("| HVPs | " + " | ".join(f"{m} rms err (stderr)" for m in METHODS) + " |")
    print("|------|" + "---|" * len(METHODS))
    for budget in args.budgets:
        cells = []
        for method in METHODS:
            results = [estimate_trace(op, method=method, max_products=budget, seed=s) for s in range(args.seeds)]
            rms = math.sqrt(sum((r.estimate - truth) ** 2 for r in results) / len(results)) / abs(truth)
            stderr = sum(r.stderr for r in results) / len(results) / abs(truth)
            cells.append(f"{rms:.2e} ({stderr:.1e})")
        print(f"| {budget} | " + " | ".join(cells) + " |")
    if args.seeded:
        kept = []
        eigen = compute_hessian_eigen(op, top_k=args.seeded, tol=1e-3, max_products=2000, on_ritz=kept.append)
        print(f"seeded with the top {args.seeded} Ritz pairs (Lanczos: {eigen['hvps']} HVPs, "
              f"sum {sum(kept[0].values):.6g})")
        print("| HVPs | " + " | ".join(f"{m} seeded rms err (stderr)" for m in METHODS) + " |")
        for budget in args.budgets:
            cells = []
            for method in METHODS:
                results = [estimate_trace(op, method=method, max_products=budget, seed=s, ritz=kept[0])
                           for s in range(args.seeds)]
                rms = math.sqrt(sum((r.estimate - truth) ** 2 for r in results) / len(results)) / abs(truth)
                stderr = sum(r.stderr for r in results) / len(results) / abs(truth)
                cells.append(f"{rms:.2e} ({stderr:.1e})")
            print(f"| {budget} | " + " | ".join(cells) + " |")
    reference = pyhessian_trace(name, args.seeds, truth)
    if reference is None:
        print("PyHessian: not installed (pip install '.[bench]')")
    else:
        print(f"PyHessian trace(): {reference[0]:.1f} HVPs on average, rms relative error {reference[1]:.2e}")
    for block in (8, 1):
        start = time.perf_counter()
        estimate_trace(op, method="xtrace", max_products=100, block_size=block)
        print(f"XTrace, 100 HVPs, block of {block}: {time.perf_counter() - start:.3f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: stable on a shared box)")
    parser.add_argument("--seeds", type=int, default=8, help="independent runs per method and budget")
    parser.add_argument("--budgets", type=int, nargs="+", default=[30, 99, 300], help="HVP counts compared")
    parser.add_argument("--seeded", type=int, default=10, help="Ritz pairs seeding the trace (0: skip)")
    parser.add_argument("--models", nargs="+", choices=["mlp", "cnn"], default=["mlp", "cnn"])
    parser.add_argument("--curvlinops-only", action="store_true",
                        help="only curvlinops' estimators (on the CNN about 7 minutes at the default budgets)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    for name in args.models:
        truth = dense_hessian(name).trace().item()
        print(f"\n{name}: trace {truth:.6g}")
        if not args.curvlinops_only:
            ours(name, truth, args)
        theirs = curvlinops_traces(name, args.budgets, args.seeds, truth)
        if theirs is None:
            print("curvlinops: not installed (pip install '.[bench]')")
        else:
            print("| HVPs | " + " | ".join(f"curvlinops {m} rms err" for m in METHODS) + " |")
            for budget in args.budgets:
                print(f"| {budget} | " + " | ".join(f"{theirs[m, budget]:.2e}" for m in METHODS) + " |")


if __name__ == "__main__":
    main()
