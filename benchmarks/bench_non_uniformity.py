"""Cost of one Sigma product (Wu, Ma & E's non-uniformity) in units of one full-batch HVP, and
its memory as the batch grows.

    python benchmarks/bench_non_uniformity.py [--threads 1] [--repeats 5] [--n 512] [--memory]
    python benchmarks/bench_non_uniformity.py --versus-authors [--models mlp,cnn,wide]

Digits MLP (2,410 parameters), CNN (1,946) and a wide MLP 64-384-64-10 (50,250), float32,
cross-entropy, micro-batch 256. Rows: the full-batch HVP (the unit; HessianOperator's auto
method), the exact Sigma product (per-sample gradient graphs kept: H_i v for all samples, then
one backward pass with the centred cotangents; its one-time build on the first product is shown
apart), the Gauss-Newton Sigma product (two replays of the linearised forward and two backward
passes; its set-up of the per-sample J_i J_i^T blocks, forward graphs and linearisation is shown
apart), and a plain vmap of per-sample jvp-of-grad products applied twice, the baseline the issue
measured at 9-23x. Timings are interleaved medians. With --memory, each (method, n) runs in a
fresh subprocess that reports its resident set size during its first product.

--versus-authors compares whole estimates of s, in Wu, Ma & E's own setting (mean squared error
against one-hot targets): `compute_non_uniformity` at its default tolerance 1e-3 against the
procedure of the authors' code (leiwu0/sgd.stability: a Sigma product as a loop over samples,
two single-sample HVPs each, minus one full-batch H(Hv); at most 10 power steps, stopping when the
estimate moves by less than 1e-4 relative), both against float64 Lanczos at 1e-10 on the same
model and data. The loop is written here from their description, not copied.
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import subprocess
import sys
import threading
import time

import torch
from torch import nn
from torch.func import functional_call, grad, jvp, vmap

from models import batch, trained

MEMORY_SIZES = (256, 1024, 4096)


def wide() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 384), nn.Tanh(), nn.Linear(384, 64), nn.Tanh(),
                         nn.Linear(64, 10)).eval()


def model(name: str) -> nn.Module:
    return wide() if name == "wide" else trained(name)


def operators(name: str, n: int, micro_batch: int):
    from curvscope_service.curvature.operators.hessian import HessianOperator
    from curvscope_service.curvature.operators.per_sample import PerSampleGaussNewton, PerSampleHessians

    net = model(name)
    inputs, targets = batch(n)
    loss = nn.functional.cross_entropy
    hessian = HessianOperator(net, inputs, targets, loss, micro_batch_size=micro_batch)
    exact = PerSampleHessians(net, inputs, targets, loss, hessian=hessian, micro_batch_size=micro_batch)
    start = time.perf_counter()
    gauss_newton = PerSampleGaussNewton(net, inputs, targets, loss, micro_batch_size=micro_batch)
    setup = time.perf_counter() - start
    return net, inputs, targets, hessian, exact, gauss_newton, setup


def first_product(operator, v) -> float:
    """Seconds of the first Sigma product, which builds what later products reuse."""
    start = time.perf_counter()
    operator.sigma_parts(v)
    return time.perf_counter() - start


def naive_sigma(net: nn.Module, inputs, targets, micro_batch: int):
    """The plain form: vmap of per-sample jvp(grad) for H_i v and again for H_i (H_i v)."""
    names = [k for k, _ in net.named_parameters()]
    values = tuple(p.detach() for p in net.parameters())

    def sample_loss(params, x, t):
        return nn.functional.cross_entropy(functional_call(net, dict(zip(names, params)), (x[None],)), t[None])

    def hvp(x, t, vs):
        return jvp(lambda p: grad(sample_loss)(p, x, t), (values,), (vs,))[1]

    per_sample = vmap(hvp, in_dims=(0, 0, None))
    twice = vmap(hvp, in_dims=(0, 0, 0))

    def product(v):
        vs = tuple(part.reshape(p.shape) for part, p in zip(v.split([p.numel() for p in values]), values))
        out = torch.zeros_like(v)
        for x, t in zip(inputs.split(micro_batch), targets.split(micro_batch)):
            out += torch.cat([p.reshape(p.shape[0], -1) for p in twice(x, t, per_sample(x, t, vs))], 1).sum(0)
        return out

    return product


def authors_power_method(net: nn.Module, inputs, targets, loss, steps: int = 10, tol: float = 1e-4,
                         seed: int = 0) -> tuple[float, int]:
    """s and the number of HVPs by the authors' procedure (see the module docstring)."""
    params = [p for p in net.parameters()]

    def hvp(x, t, v):
        grads = torch.autograd.grad(loss(net(x), t), params, create_graph=True)
        flat = torch.cat([g.reshape(-1) for g in grads])
        return torch.cat([h.reshape(-1) for h in torch.autograd.grad(flat @ v, params)])

    hvps = 0

    def sigma(v):
        nonlocal hvps
        squares, mean = torch.zeros_like(v), torch.zeros_like(v)
        for i in range(len(inputs)):
            x, t = inputs[i:i + 1], targets[i:i + 1]
            hv = hvp(x, t, v)
            squares += hvp(x, t, hv)
            mean += hv
        hvps += 2 * len(inputs) + 1
        # Single-sample losses average over the sample's outputs only, as the mean loss does
        # over all samples, so the mean of H_i v is H v.
        return squares / len(inputs) - hvp(inputs, targets, mean / len(inputs))

    v = torch.randn(sum(p.numel() for p in params), generator=torch.Generator().manual_seed(seed))
    v, estimate = v / v.norm(), 0.0
    for _ in range(steps):
        product = sigma(v)
        previous, estimate = estimate, float(product @ v)
        v = product / product.norm()
        if abs(estimate - previous) < tol * abs(estimate):
            break
    return max(estimate, 0.0) ** 0.5, hvps


def versus_authors(name: str, n: int, micro_batch: int) -> None:
    from curvscope_service.curvature.measures.non_uniformity import compute_non_uniformity
    from curvscope_service.curvature.operators.hessian import HessianOperator
    from curvscope_service.curvature.operators.per_sample import PerSampleHessians
    from curvscope_service.curvature.solvers.lanczos import lanczos
    from curvscope_service.losses import mse

    inputs, labels = batch(n)
    targets = nn.functional.one_hot(labels, 10).to(inputs.dtype)
    net = model(name)

    def sigma_operator(module, x, t):
        hessian = HessianOperator(module, x, t, mse, micro_batch_size=micro_batch)
        return PerSampleHessians(module, x, t, mse, hessian=hessian, micro_batch_size=micro_batch)

    exact64 = sigma_operator(copy.deepcopy(net).double(), inputs.double(), targets.double())
    truth = lanczos(lambda v: exact64.sigma_parts(v)[1], exact64.dim, top_k=1, tol=1e-10, max_products=400,
                    dtype=torch.float64).largest[0] ** 0.5

    start = time.perf_counter()
    ours = compute_non_uniformity(sigma_operator(net, inputs, targets), sharpness=(0.0, True))
    ours_seconds = time.perf_counter() - start
    start = time.perf_counter()
    authors, authors_hvps = authors_power_method(net, inputs, targets, mse)
    authors_seconds = time.perf_counter() - start
    print(f"| {name:5} | {truth:.6g} | {ours['value']:.6g} ({(ours['value'] - truth) / truth:+.1e}) | "
          f"{ours_seconds:6.2f} s | {authors:.6g} ({(authors - truth) / truth:+.1e}) | {authors_seconds:6.2f} s, "
          f"{authors_hvps} HVPs | {authors_seconds / ours_seconds:5.1f}x |", flush=True)


def interleaved_medians(fns: dict, repeats: int) -> dict[str, float]:
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: sorted(t)[len(t) // 2] for name, t in times.items()}


def timings(name: str, n: int, micro_batch: int, repeats: int) -> None:
    net, inputs, targets, hessian, exact, gauss_newton, gn_setup = operators(name, n, micro_batch)
    v = torch.randn(hessian.dim, generator=torch.Generator().manual_seed(0))
    hessian.matvec(v)  # the full-batch operator's retained graphs, built once per analysis
    gn_setup += first_product(gauss_newton, v)
    exact_first = first_product(exact, v)
    naive = naive_sigma(net, inputs, targets, micro_batch)
    medians = interleaved_medians({
        "hvp": lambda: hessian.matvec(v),
        "exact": lambda: exact.sigma_parts(v),
        "gauss_newton": lambda: gauss_newton.sigma_parts(v),
        "naive": lambda: naive(v),
    }, repeats)
    unit = medians["hvp"]
    exact_setup = max(exact_first - medians["exact"], 0.0)
    print(f"| {name:5} | {hessian.dim:6,} | {unit * 1e3:5.1f} ms | {medians['exact'] / unit:5.1f} | "
          f"{exact_setup / unit:6.1f} | {medians['gauss_newton'] / unit:5.1f} | {gn_setup / unit:6.1f} | "
          f"{medians['naive'] / unit:5.1f} |", flush=True)


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def child(name: str, method: str, n: int, micro_batch: int, threads: int) -> None:
    torch.set_num_threads(threads)
    _, _, _, hessian, exact, gauss_newton, _ = operators(name, n, micro_batch)
    operator = exact if method == "exact" else gauss_newton
    v = torch.randn(hessian.dim)
    hessian.matvec(v)  # the full-batch graphs are built once per analysis, not per product
    # The process' lifetime peak is set by training the model, so sample the resident set size
    # while the product runs instead.
    before, peak, running = rss_mib(), [0.0], [True]

    def sample() -> None:
        while running[0]:
            peak[0] = max(peak[0], rss_mib())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample)
    sampler.start()
    operator.sigma_parts(v, square=True)
    running[0] = False
    sampler.join()
    print(json.dumps({"before": before, "after": max(peak[0], rss_mib())}))


def memory(name: str, micro_batch: int, threads: int) -> None:
    print(f"\n{name}, micro-batch {micro_batch}: RSS in MiB, peak during one Sigma product (growth)")
    print("| samples | exact | gauss_newton |\n|---|---|---|")
    for n in MEMORY_SIZES:
        cells = []
        for method in ("exact", "gauss_newton"):
            out = subprocess.run([sys.executable, __file__, "--child", name, method, str(n), str(micro_batch),
                                  str(threads)], capture_output=True, text=True, check=True).stdout
            peak = json.loads(out.strip().splitlines()[-1])
            cells.append(f"{peak['after']:.0f} (+{peak['after'] - peak['before']:.0f})")
        print(f"| {n} | {cells[0]} | {cells[1]} |", flush=True)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        name, method, n, micro_batch, threads = sys.argv[2:7]
        child(name, method, int(n), int(micro_batch), int(threads))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--n", type=int, default=512)
    parser.add_argument("--micro-batch", type=int, default=256)
    parser.add_argument("--models", default="mlp,cnn,wide")
    parser.add_argument("--memory", action="store_true")
    parser.add_argument("--versus-authors", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.versus_authors:
        print(f"{args.n} samples, mse on one-hot targets, float32, {args.threads} thread(s)")
        print("| model | s, float64 truth | ours (rel. error) | ours | authors' procedure (rel. error) | "
              "authors' time | time ratio |")
        print("|---|---|---|---|---|---|---|")
        for name in filter(None, args.models.split(",")):
            versus_authors(name, args.n, args.micro_batch)
        return
    print(f"{args.n} samples, float32, {args.threads} thread(s); Sigma product cost in full-batch HVPs")
    print("| model | params | one HVP | exact | exact set-up | Gauss-Newton | GN set-up | plain vmap |")
    print("|-------|--------|---------|-------|--------------|--------------|-----------|------------|")
    for name in filter(None, args.models.split(",")):
        timings(name, args.n, args.micro_batch, args.repeats)
    if args.memory:
        memory("cnn", args.micro_batch, args.threads)


if __name__ == "__main__":
    main()
