"""Peak memory of one Hessian-vector product as the batch grows, at a fixed micro-batch size.

    python benchmarks/bench_memory.py [--model cnn] [--micro-batch 256] [--threads 1]

Each (method, batch size) runs in a fresh subprocess that reports its peak resident set size
(resource.getrusage ru_maxrss) before and after one product on the digits model; the growth
is what the product costs. double_backward should stay flat; retained grows with the batch.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

SIZES = (512, 1024, 2048, 4096, 8192)
METHODS = ("double_backward", "retained")


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def child(model: str, method: str, n: int, micro_batch: int, threads: int) -> None:
    import torch

    from models import operator

    torch.set_num_threads(threads)
    op = operator(model, n=n, micro_batch_size=micro_batch, method=method, retain_max_samples=max(SIZES))
    v = torch.randn(op.dim)
    before = peak_mib()
    op.matvec(v)
    print(json.dumps({"before": before, "after": peak_mib()}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="cnn", choices=("mlp", "cnn"))
    parser.add_argument("--micro-batch", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--child", nargs=2, metavar=("METHOD", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.model, args.child[0], int(args.child[1]), args.micro_batch, args.threads)
        return

    print(f"{args.model}, micro-batch {args.micro_batch}, float32: peak RSS in MiB (growth during one HVP)")
    print(f"{'samples':>8}" + "".join(f"{m:>26}" for m in METHODS))
    for n in SIZES:
        cells = []
        for method in METHODS:
            command = [sys.executable, __file__, "--model", args.model, "--micro-batch", str(args.micro_batch),
                       "--threads", str(args.threads), "--child", method, str(n)]
            out = json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout.splitlines()[-1])
            cells.append(f"{out['after']:.0f} (+{out['after'] - out['before']:.0f})")
        print(f"{n:>8}" + "".join(f"{c:>26}" for c in cells))


if __name__ == "__main__":
    main()
