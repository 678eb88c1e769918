"""Per-layer top eigenvalues: every block solved separately vs all blocks in lockstep on one graph.

    python benchmarks/bench_per_layer.py [--threads 1] [--samples 32] [--top-k 1]

``models.resnet()`` (308,650 parameters, 17 parameter blocks: convs, BatchNorms, the head) after
10 Adam steps on ``samples`` random images, eval mode, cross-entropy, float32, tol 1e-3.

- separate: what ``--per-layer`` did before: one ``HessianOperator`` per block (its own kept
  gradient graph of the whole forward pass) and one ``compute_hessian_eigen`` each.
- lockstep: ``compute_block_eigen`` on the whole model's operator: one kept graph, every step
  multiplies all pending blocks' vectors against it (``diagonal_block_products``).

Both solve the same block Hessians with the same seeds: the table checks that the eigenvalues
agree and prints products and wall and CPU seconds (graph builds included; CPU seconds are the
figure to read on a shared machine). ``--method double_backward`` rebuilds the graph for every
product, as the operator does past ``retain_max_samples``: there one build per step serves all
blocks in lockstep.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from curvscope_service.curvature.operators.hessian import HessianOperator
from curvscope_service.curvature.solvers.extreme_eigenvalues import compute_block_eigen, compute_hessian_eigen
from curvscope_service.loading.checkpoint import parameter_blocks
from models import random_images, trained_resnet


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: stable on a shared box)")
    parser.add_argument("--samples", type=int, default=32, help="random images in the batch")
    parser.add_argument("--top-k", type=int, default=1, help="largest eigenvalues per block")
    parser.add_argument("--method", default="retained", choices=["retained", "double_backward"],
                        help="Hessian products: kept graphs, or a graph rebuilt per product (big batches)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    inputs, targets = random_images(args.samples)
    model = trained_resnet(args.samples, steps=10)
    blocks = list(parameter_blocks(model).values())
    loss = nn.functional.cross_entropy
    print(f"resnet: {sum(p.numel() for p in model.parameters())} parameters, {len(blocks)} blocks, "
          f"{args.samples} samples, top-{args.top_k} at 1e-3")

    runs = {}
    wall, cpu = time.perf_counter(), time.process_time()
    whole = HessianOperator(model, inputs, targets, loss, method=args.method)
    lockstep = compute_block_eigen(whole, blocks, top_k=args.top_k, tol=1e-3, max_products=2000)
    runs["lockstep"] = (lockstep, time.perf_counter() - wall, time.process_time() - cpu)
    del whole

    wall, cpu = time.perf_counter(), time.process_time()
    separate = []
    for block in blocks:
        op = HessianOperator(model, inputs, targets, loss, param_names=block, method=args.method)
        separate.append(compute_hessian_eigen(op, top_k=args.top_k, tol=1e-3, max_products=2000))
    runs["separate"] = (separate, time.perf_counter() - wall, time.process_time() - cpu)

    worst = max(abs(a - b) / abs(b) for x, y in zip(lockstep, separate) for a, b in zip(x["largest"], y["largest"]))
    print(f"\n| per-layer solve ({args.method}) | HVPs | wall s | CPU s |")
    print("|-----------------|------|--------|-------|")
    for name, (reports, wall, cpu) in runs.items():
        print(f"| {name} | {sum(r['hvps'] for r in reports)} | {wall:.1f} | {cpu:.1f} |")
    print(f"\nlargest relative difference between the two runs' eigenvalues: {worst:.1e}; "
          f"separate / lockstep CPU: {runs['separate'][2] / runs['lockstep'][2]:.2f}x")


if __name__ == "__main__":
    main()
