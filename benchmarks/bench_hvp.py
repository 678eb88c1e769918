"""One Hessian-vector product in units of one gradient, every method side by side.

    python benchmarks/bench_hvp.py [--threads 1] [--repeats 30] [--no-compile]

Digits MLP and CNN, 512 samples, float32, one micro-batch of 512. The timings are interleaved
(one round runs every method once) and the median is reported, so a busy machine slows all
rows alike. The retained method's one-time graph build is shown apart, in gradients.
"""

from __future__ import annotations

import argparse
import signal
import time

import torch
from torch import nn
from torch.func import functional_call, grad, jvp

from models import batch, operator, trained


def interleaved_medians(fns: dict, repeats: int) -> dict[str, float]:
    for fn in fns.values():
        fn()
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: sorted(t)[len(t) // 2] for name, t in times.items()}


def compiled_hvp(name: str, dtype: torch.dtype, limit_s: int):
    """torch.compile'd jvp(grad(loss)); (hvp, compile seconds) or (None, why not)."""
    model = trained(name, dtype=dtype)
    x, t = batch(dtype=dtype)
    names = [k for k, _ in model.named_parameters()]
    values = tuple(p.detach() for p in model.parameters())

    def loss(params):
        return nn.functional.cross_entropy(functional_call(model, dict(zip(names, params)), (x,)), t)

    @torch.compile
    def hvp(vs):
        return jvp(grad(loss), (values,), (vs,))[1]

    vs = tuple(torch.randn_like(p) for p in values)

    def alarm(*_):
        raise TimeoutError(f"did not compile within {limit_s} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(limit_s)
    start = time.perf_counter()
    try:
        hvp(vs)
        return (lambda: hvp(vs)), time.perf_counter() - start
    except Exception as error:  # report why and go on with the other methods
        return None, f"{type(error).__name__}: {str(error).splitlines()[0][:80]}"
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: stable on a shared box)")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile row")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype, k = torch.float32, 8

    for name in ("mlp", "cnn"):
        model = trained(name, dtype=dtype)
        x, t = batch(dtype=dtype)

        def gradient() -> None:
            model.zero_grad()
            nn.functional.cross_entropy(model(x), t).backward()

        ops = {m: operator(name, dtype=dtype, micro_batch_size=512, method=m) for m in ("retained", "double_backward", "jvp_grad")}
        auto = operator(name, dtype=dtype, micro_batch_size=512).method
        dim = ops["retained"].dim
        v, V = torch.randn(dim, dtype=dtype), torch.randn(dim, k, dtype=dtype)
        build_start = time.perf_counter()
        ops["retained"].loss()  # builds and keeps the graphs
        build = time.perf_counter() - build_start

        fns = {
            "gradient": gradient,
            "retained": lambda: ops["retained"].matvec(v),
            f"retained matmat x{k} (per vector)": lambda: ops["retained"].matmat(V),
            "double_backward": lambda: ops["double_backward"].matvec(v),
            "jvp_grad eager": lambda: ops["jvp_grad"].matvec(v),
            f"jvp_grad vmap x{k} (per vector)": lambda: ops["jvp_grad"].matmat(V),
        }
        note = "skipped (--no-compile)"
        if not args.no_compile:
            fn, info = compiled_hvp(name, dtype, limit_s=120)
            if fn is None:
                note = f"skipped: {info}"
            else:
                fns["jvp_grad torch.compile"] = fn
                note = f"compiled in {info:.0f} s"
        medians = interleaved_medians(fns, args.repeats)
        unit = medians["gradient"]
        print(f"\n{name}: {dim} parameters, 512 samples, float32, {args.threads} thread(s); "
              f"one gradient = {unit * 1e3:.2f} ms; auto = {auto}")
        print(f"{'method':<34}{'ms':>9}{'gradients':>11}")
        for label, seconds in medians.items():
            per = seconds / k if "per vector" in label else seconds
            print(f"{label:<34}{per * 1e3:>9.2f}{per / unit:>11.2f}")
        print(f"{'retained graph build (once)':<34}{build * 1e3:>9.2f}{build / unit:>11.2f}")
        print(f"jvp_grad torch.compile: {note}")


if __name__ == "__main__":
    main()
