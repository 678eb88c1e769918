"""Models in memory: lines of user code from an nn.Module to its top-5 eigenvalues (curvscope,
PyHessian, and curvscope's file path before in-memory objects), and the time a training
callback adds to the training thread on the digits MLP.

    python benchmarks/bench_in_memory.py [--steps 20000] [--every 2000] [--threads 1]

Part 1 runs each snippet as written (the lines counted are the lines run) on the trained digits
MLP and its 512-digit batch, and compares its top-5 with the dense float64 Hessian. Part 2
trains the same MLP with SGD (batch 32) with and without a CurvatureMonitor sending its
sharpness to a server in a child process every ``--every`` steps, and times each step of the training
thread; the analyses themselves run in a background thread.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import torch
from torch import nn

from models import batch, dense_hessian, digits, trained

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the suite's ServerProcess
from server_process import ServerProcess  # noqa: E402

SNIPPETS = {
    "curvscope (objects)": """
        import curvscope
        top5 = curvscope.analyze(model, (x, y), eigen=5, local=True).results.hessian_eigen.largest
    """,
    "PyHessian 0.1": """
        from pyhessian import hessian
        top5, _ = hessian(model, torch.nn.CrossEntropyLoss(), data=(x, y), cuda=False).eigenvalues(top_n=5)
    """,
    "curvscope (files, before)": """
        import tempfile, torch, curvscope
        from safetensors.torch import save_file
        folder = tempfile.mkdtemp()
        program = torch.export.export(model, (x[:2],), dynamic_shapes=({0: torch.export.Dim("batch")},))
        torch.export.save(program, f"{folder}/model.pt2")
        save_file({"inputs": x.contiguous(), "targets": y.contiguous()}, f"{folder}/data.safetensors")
        report = curvscope.analyze(f"{folder}/model.pt2", f"{folder}/data.safetensors", eigen=5, local=True)
        top5 = list(report.results.hessian_eigen.largest)
    """,
}


def lines_of_code() -> None:
    model = trained("mlp")
    x, y = batch()
    truth = torch.linalg.eigvalsh(dense_hessian("mlp")).flip(0)[:5]
    print("| code | lines | worst rel. error of top-5 vs dense |")
    print("|---|---|---|")
    for name, snippet in SNIPPETS.items():
        code = textwrap.dedent(snippet).strip()
        if "pyhessian" in code and importlib.util.find_spec("pyhessian") is None:
            print(f"| {name} | {len(code.splitlines())} | (pyhessian not installed: pip install '.[bench]') |")
            continue
        namespace = {"model": model, "x": x, "y": y, "torch": torch}
        torch.manual_seed(0)
        exec(compile(code, name, "exec"), namespace)  # noqa: S102 - the benchmark's own snippets
        top5 = torch.tensor([float(v) for v in namespace["top5"]], dtype=torch.float64)
        error = ((top5 - truth).abs() / truth.abs()).max().item()
        print(f"| {name} | {len(code.splitlines())} | {error:.1e} |")
        model.zero_grad(set_to_none=True)


def training_overhead(steps: int, every: int) -> None:
    from curvscope import Client
    from curvscope.callbacks import CurvatureMonitor
    inputs, targets = digits()
    evaluation = (inputs[:512], targets[:512])

    def train(monitor: CurvatureMonitor | None) -> tuple[list[float], list[float], list[bool]]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        generator = torch.Generator().manual_seed(0)
        step_seconds, submit_seconds, busy = [], [], []
        for step in range(1, steps + 1):
            busy.append(monitor is not None and monitor.busy())
            start = time.perf_counter()
            index = torch.randint(0, inputs.shape[0], (32,), generator=generator)
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(inputs[index]), targets[index]).backward()
            optimizer.step()
            if monitor is not None and step % every == 0:
                before = time.perf_counter()
                monitor.submit(step, model, optimizer.param_groups[0]["lr"], 32)
                submit_seconds.append(time.perf_counter() - before)
            step_seconds.append(time.perf_counter() - start)
        if monitor is not None:
            monitor.close()
        return step_seconds, submit_seconds, busy

    plain, _, _ = train(None)
    # The server in its own process, as on a GPU box: the training process only serialises and waits.
    with tempfile.TemporaryDirectory() as store, ServerProcess(["--store", store, "--threads", "1"]) as server:
        with Client(server.target) as client:
            monitor = CurvatureMonitor(evaluation, client=client, sharpness=True)
            monitored, submits, busy = train(monitor)
            finished = monitor.history
    step = statistics.median(plain)
    later = submits[1:] or [float("nan")]
    print(f"\n{steps} SGD steps (batch 32) of the digits MLP, sharpness every {every} steps on 512 digits:")
    print("| training thread | seconds | x one step |")
    print("|---|---|---|")
    print(f"| one step, no callback (median) | {step:.2e} | 1 |")
    print(f"| one step, with the callback (median) | {statistics.median(monitored):.2e} | "
          f"{statistics.median(monitored) / step:.2f} |")
    print(f"| first analysis: export + weight copy | {submits[0]:.2e} | {submits[0] / step:.0f} |")
    print(f"| later analyses: weight copy (median) | {statistics.median(later):.2e} | "
          f"{statistics.median(later) / step:.3f} |")
    print(f"| whole loop, no callback | {sum(plain):.3f} | |")
    print(f"| whole loop, with the callback | {sum(monitored):.3f} | |")
    print(f"| whole loop, with the callback, less the one export | {sum(monitored) - submits[0]:.3f} | |")
    # Steps over 10 ms are the process waiting for a core (the export step is one of them).
    slow = 0.01
    during = [t for t, b in zip(monitored, busy) if b and t < slow]
    between = [t for t, b in zip(monitored, busy) if not b and t < slow]
    fast_plain = [t for t in plain if t < slow]
    print(f"| mean step under 10 ms, no callback ({len(fast_plain)} steps) | {statistics.fmean(fast_plain):.2e} | |")
    print(f"| mean step under 10 ms, an analysis in flight ({len(during)} steps) | {statistics.fmean(during):.2e} | |")
    print(f"| mean step under 10 ms, none in flight ({len(between)} steps) | {statistics.fmean(between):.2e} | |")
    print(f"steps over 10 ms: {sum(t >= slow for t in plain)} without the callback, "
          f"{sum(t >= slow for t in monitored)} with it")
    print(f"analyses started {monitor.started}, skipped {monitor.skipped}, "
          f"finished {len(finished)} ({sum(f.error is None for f in finished)} without error)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20_000)
    parser.add_argument("--every", type=int, default=2_000)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lines_of_code()
    training_overhead(args.steps, args.every)


if __name__ == "__main__":
    main()
