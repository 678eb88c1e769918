"""The memory plan of a run: what each analysis will hold, chosen to fit a ceiling, and the peak
each one measured.

Before any analysis starts the engine asks ``plan_run`` for a plan. The ceiling is the device's
memory on a server with a GPU, the machine's available memory otherwise (cgroup limits
included), or ``--memory-budget`` / the request's ``memory_budget_bytes`` when lower. Each
analysis' footprint is an explicit model,

    resident (the model's parameters and buffers, the batch)
    + the product's cost: what the operator keeps between products (retained gradient graphs)
      plus what one batched product of w vectors allocates, base + w * per_vector, measured by
      ``calibrate`` from three products on the batch itself (widths 1, 1, 3), so activations,
      the curvature and the product method are all in it
    + the vectors the algorithm holds: parameters x bytes per entry x (basis, sketch, probe
      blocks, Ritz vectors kept for a later trace),

and the plan picks the block sizes (probes per batched product), the Krylov basis length and
the SLQ probe groups that fit, or refuses with RESOURCE_EXHAUSTED saying what would fit (a
smaller product budget, fewer steps, or a larger ceiling). Precision is the request's: every
vector is kept in the parameters' dtype, which the choices report as ``vector_dtype``.

``PeakMeter`` measures: on CUDA, torch's peak allocated memory; on the CPU, the resident tensors
plus the growth of the process' peak resident set (Linux's VmHWM, reset through
/proc/self/clear_refs) over what it was before the analyses.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from curvscope._sizes import format_bytes

from .errors import ResourceExhausted

# Share of the measured free memory the plan may fill: allocator fragmentation and what the
# model does not count (Python objects, libraries' workspaces) need the rest.
CEILING_SHARE = 0.9
# The widest block the trace estimators take at a time when memory allows: their basis
# products are matrix products of this width (the batched product also measured fastest at 8
# vectors on the digits models, see DESIGN.md).
TRACE_BLOCK = 8
# Products go through the operator that many at a time only where calibration measured the
# batched product this much faster per vector; otherwise one at a time, which holds a single
# product's intermediates (on all-MiniLM-L6-v2, 8 at a time ran 14 % slower per vector).
BATCHING_GAIN = 1.15
# Krylov basis of hessian_eigen: up to this many vectors, at least wanted + this many (the
# solver's own default rule; fewer vectors mean more restarts, not a different answer).
MAX_BASIS = 160
MIN_BASIS_MARGIN = 10
# Per-sample tensors of non_uniformity (operators/per_sample.py's budgets, in elements).
PER_SAMPLE_ELEMENTS = (1 << 25) + 4 * (1 << 24)


# -- the ceiling ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Budget:
    """The ceiling a run is planned under and where it came from."""

    bytes: int
    source: str


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _cgroup_room() -> int | None:
    """What the process' cgroup (v2) still allows, when it sets a limit."""
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit == "max":
            return None
        return max(0, int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text().strip()))
    except (OSError, ValueError):
        return None


def free_memory(device: str) -> tuple[int, str]:
    """Memory the run can still take on ``device`` (bytes) and what it measured: a CUDA device's
    free memory plus what torch already holds there (the model, counted by the plan), or the
    machine's available memory (within the cgroup's limit)."""
    if device.startswith("cuda"):
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return free + torch.cuda.memory_allocated(torch.device(device)), "device"
    candidates = [room for room in (_meminfo_available(), _cgroup_room()) if room is not None]
    if not candidates:
        candidates = [os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")]
    return min(candidates), "machine"


def resolve_budget(device: str, resident_bytes: int, *, server_bytes: int = 0, request_bytes: int = 0) -> Budget:
    """The ceiling: ``server_bytes`` (--memory-budget) when set, which overrides what was
    measured, else the device's or machine's free memory (plus the resident tensors on the CPU,
    already loaded and counted by the plan); a request's ``memory_budget_bytes`` lowers it."""
    if server_bytes:
        budget = Budget(server_bytes, "--memory-budget")
    else:
        free, source = free_memory(device)
        if not device.startswith("cuda"):
            free += resident_bytes
        budget = Budget(int(free * CEILING_SHARE), source)
    if request_bytes and request_bytes < budget.bytes:
        budget = Budget(request_bytes, "request")
    return budget


# -- measuring -----------------------------------------------------------------------------

# glibc's mallopt parameter, and the size from which freed blocks go straight back to the system.
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 1 << 20
_heap_retention_limited = False


def limit_heap_retention() -> None:
    """Have glibc map every allocation of 1 MiB or more on its own, so that freeing it returns
    it to the system. Its default threshold adapts upward to 32 MiB, after which the per-vector
    tensors of each product (activations' gradients, parameter-sized vectors: 1-30 MB) are
    carved from the heap and stay resident when freed: a 0.9M-parameter trace measured 517 MB
    against 376 MB with the fixed threshold, and ran no slower. Once per process; nothing where
    the C library is not glibc."""
    global _heap_retention_limited
    if _heap_retention_limited:
        return
    _heap_retention_limited = True
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        if libc is not None and hasattr(libc, "mallopt"):
            libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
    except OSError:
        pass



def _status_kib(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class PeakMeter:
    """Peak memory of stretches of work, relative to a baseline taken at construction.

    ``peak()`` is the bytes above the baseline since the last ``reset()``: torch's peak
    allocated memory on CUDA; on the CPU the peak resident set (VmHWM, reset by writing 5 to
    /proc/self/clear_refs) minus the baseline RSS, or where that cannot be reset, ru_maxrss
    growth (which then only ever grows).
    """

    def __init__(self, device: str) -> None:
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        if self.cuda:
            torch.cuda.synchronize(self.device)
            self.baseline = torch.cuda.memory_allocated(self.device)
        else:
            limit_heap_retention()
            self.baseline = _status_kib("VmRSS:") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        self.resettable = self.cuda or self._clear_refs()
        self.reset()

    @staticmethod
    def _clear_refs() -> bool:
        try:
            Path("/proc/self/clear_refs").write_text("5")
            return _status_kib("VmHWM:") is not None
        except OSError:
            return False

    def reset(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.resettable:
            self._clear_refs()

    def peak(self) -> int:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            return max(0, torch.cuda.max_memory_allocated(self.device) - self.baseline)
        if self.resettable:
            return max(0, (_status_kib("VmHWM:") or 0) - self.baseline)
        return max(0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - self.baseline)

    def measure(self, work: Callable[[], Any]) -> tuple[Any, int]:
        """``work()`` and the peak above the baseline while it ran."""
        self.reset()
        result = work()
        return result, self.peak()


# -- the product's cost ----------------------------------------------------------------------


@dataclass(frozen=True)
class ProductCost:
    """Bytes of one batched product of w vectors: ``base`` (graphs the operator keeps, and what
    a product allocates whatever its width) + w * ``per_vector``; ``speedup``: how much faster
    per vector the 3-wide product ran than a single one (1: batching buys nothing)."""

    base: int
    per_vector: int
    speedup: float = 1.0

    def __call__(self, width: int) -> int:
        return self.base + width * self.per_vector


# Products ``calibrate`` spends: widths 1, 1 and 3.
CALIBRATION_PRODUCTS = 5


def calibrate(operator: Any, meter: PeakMeter) -> ProductCost:
    """Measure the product's cost on the operator itself: products of widths 1 (building what
    the operator keeps), 1 and 3, in memory and in time. These CALIBRATION_PRODUCTS count in
    ``operator.products`` (and in the server's product metric), not in any analysis' ``hvps``.
    The per vector cost is at least the tangent and the output (2 vectors)."""
    vector = operator.dim * _itemsize(operator.dtype)
    generator = torch.Generator().manual_seed(0)
    seconds: dict[int, float] = {}

    def product(width: int) -> Callable[[], None]:
        V = torch.randn(operator.dim, width, generator=generator, dtype=operator.dtype).to(operator.device)

        def run() -> None:
            started = time.perf_counter()
            operator.matmat(V)
            if operator.device.type == "cuda":
                torch.cuda.synchronize(operator.device)
            seconds[width] = time.perf_counter() - started
        return run

    _, first = meter.measure(product(1))
    _, one = meter.measure(product(1))
    _, three = meter.measure(product(3))
    per_vector = max(2 * vector, (three - one) // 2)
    return ProductCost(base=max(first, one) - per_vector if max(first, one) > per_vector else 0,
                       per_vector=per_vector, speedup=3 * seconds[1] / max(seconds[3], 1e-9))


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


# -- the plan --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    """What the plan of one analysis knows: the operator's size, the bytes per entry of its
    vectors, the resident tensors, the product's cost (None: the analysis needs no products)
    and the Ritz vectors an earlier hessian_eigen keeps for a later trace."""

    dim: int
    itemsize: int
    resident: int
    product: ProductCost | None
    ritz_bytes: int = 0

    @property
    def vector(self) -> int:
        return self.dim * self.itemsize

    def products(self, width: int) -> int:
        return self.product(width) if self.product is not None else 0


@dataclass
class AnalysisPlan:
    """One analysis' planned footprint (bytes, everything included) and the choices behind it."""

    analysis: str
    block: str
    peak_bytes: int
    choices: dict[str, int | str] = field(default_factory=dict)
    measured_bytes: int = 0
    # The resident tensors counted in both figures (the CPU's measure adds its growth to them).
    resident: int = 0


def _refuse(analysis: str, what: str, needs: int, budget: Budget, fits: str) -> ResourceExhausted:
    return ResourceExhausted(
        f"{analysis}: {what} needs {format_bytes(needs)} of memory, over the {format_bytes(budget.bytes)} "
        f"ceiling ({budget.source}); {fits}")


def _largest(fits: Callable[[int], bool], low: int, high: int) -> int | None:
    """The largest n in [low, high] with fits(n) (fits is monotone), or None."""
    if high < low or not fits(low):
        return None
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if fits(middle) else (low, middle - 1)
    return low


TRACE_NAMES = {"xtrace": "XTrace", "hutchpp": "Hutch++", "hutchinson": "Hutchinson"}


def product_width(block: int, shape: Shape) -> int:
    """Vectors per batched product for blocks of ``block``: all of them where calibration
    measured batching worth BATCHING_GAIN, else one."""
    return block if shape.product is not None and shape.product.speedup >= BATCHING_GAIN else 1


def trace_bytes(method: str, max_products: int, block: int, frobenius: bool, shape: Shape, seeded: int = 0,
                adaptive: bool = False) -> int:
    """Peak of estimate_trace: the sketch (XTrace: Q, the probes' sign bits, and A Q for tr(A^2);
    Hutch++: Q), the Ritz vectors converted for deflation, and what is in flight for a block of
    ``block`` vectors besides: the larger of what one product of ``product_width`` vectors
    allocates and the float64 slice of the block its Gram matrix is summed from, plus

    - XTrace: one block (its peak comes with the last block, whose Q columns are not written
      yet while its probes and their products, or its Z, are in flight), two when adaptive (the
      probes stay until Q^T W after the block is orthonormalised);
    - Hutch++ and Hutchinson: two (the probes and their products, beside a full sketch)."""
    V, dim = shape.vector, shape.dim
    if method == "xtrace":
        m = min(max_products // 2, dim)
        held = m * V * (2 if frobenius else 1) + m * dim // 8
    elif method == "hutchpp":
        held = min(max_products // 3, dim) * V
    else:
        held = 0
    from .curvature.estimators.probes import GRAM_ROWS

    gram_rows = min(dim, GRAM_ROWS) * block * 8  # the block's rows in float64, a slice at a time
    blocks = 1 if method == "xtrace" and not adaptive else 2
    flight = blocks * block * V + max(shape.products(product_width(block, shape)), gram_rows)
    return shape.resident + shape.ritz_bytes + held + seeded * V + flight


def plan_trace(spec: Any, shape: Shape, budget: Budget, seeded: int) -> AnalysisPlan:
    method, total = str(spec.method), spec.max_products

    def needs(products: int, block: int) -> int:
        return trace_bytes(method, products, block, spec.frobenius, shape, seeded, spec.relative_tolerance > 0)

    width = _largest(lambda w: needs(total, w) <= budget.bytes, 1, TRACE_BLOCK)
    if width is None:
        from .curvature.estimators.trace import MIN_PRODUCTS
        fitting = _largest(lambda p: needs(p, 1) <= budget.bytes, MIN_PRODUCTS[method], total)
        probes = {"xtrace": total // 2, "hutchpp": total // 3}.get(method, total)
        what = f"{TRACE_NAMES[method]} with {total} products" + (f" ({probes} probes)" if method != "hutchinson" else "")
        if fitting and method == "xtrace":
            fitting -= fitting % 2  # two products a probe: an odd budget leaves one unused
        if fitting and fitting >= MIN_PRODUCTS[method]:
            counted = {"xtrace": f" ({fitting // 2} probes)", "hutchpp": f" ({fitting // 3} sketch vectors)"}
            fits = (f"{fitting} products{counted.get(method, '')} fit in {format_bytes(budget.bytes)}: "
                    f"set max_hvps={fitting} or raise --memory-budget")
        else:
            fits = "no product budget fits: raise --memory-budget or use a smaller batch"
        raise _refuse("hessian_trace", what, needs(total, 1), budget, fits)
    return AnalysisPlan("hessian_trace", "", needs(total, width),
                        {"block_size": width, "product_width": product_width(width, shape)})


def density_bytes(steps: int, group: int, width: int, shape: Shape) -> int:
    """Peak of slq: the Krylov bases of a group of probes ((steps + 1) vectors each), then the
    larger of the step's product and its reorthogonalisation (three vectors a probe: the
    product, the projection, the corrected vector)."""
    steps = min(steps, shape.dim)
    return shape.resident + group * (steps + 1) * shape.vector + max(shape.products(width), 3 * group * shape.vector)


def plan_density(spec: Any, shape: Shape, budget: Budget) -> AnalysisPlan:
    steps, probes = spec.lanczos_steps, spec.num_probes
    group = _largest(lambda g: density_bytes(steps, g, g, shape) <= budget.bytes, 1, probes)
    if group is None:
        fitting = _largest(lambda s: density_bytes(s, 1, 1, shape) <= budget.bytes, 1, steps)
        fits = (f"{fitting} Lanczos steps fit: set lanczos_steps={fitting} or raise --memory-budget"
                if fitting else "raise --memory-budget or use a smaller batch")
        raise _refuse("hessian_density", f"SLQ with {steps} steps", density_bytes(steps, 1, 1, shape), budget, fits)
    basis = group * (min(steps, shape.dim) + 1) * shape.vector
    return AnalysisPlan("hessian_density", "", density_bytes(steps, group, group, shape),
                        {"probe_group": group, "basis_budget_bytes": basis})


def eigen_bytes(basis: int, wanted: int, keeps_ritz: bool, shape: Shape) -> int:
    """Peak of Lanczos: the basis and two more vectors (the product's output and its
    orthogonalisation), the float64 Ritz vectors handed to a later trace, and one product."""
    ritz = wanted * shape.dim * 8 if keeps_ritz else 0
    return shape.resident + (basis + 2) * shape.vector + ritz + shape.products(1)


def plan_eigen(name: str, wanted: int, keeps_ritz: bool, shape: Shape, budget: Budget) -> AnalysisPlan:
    low = min(wanted + MIN_BASIS_MARGIN, max(shape.dim, wanted + 2))
    high = max(low, min(MAX_BASIS, shape.dim + 1))
    basis = _largest(lambda b: eigen_bytes(b, wanted, keeps_ritz, shape) <= budget.bytes, wanted + 2, high)
    if basis is None:
        raise _refuse(name, f"Lanczos for {wanted} eigenvalues", eigen_bytes(wanted + 2, wanted, keeps_ritz, shape),
                      budget, "ask for fewer eigenvalues, use a smaller batch, or raise --memory-budget")
    # A basis of the solver's default length when it fits (more vectors: fewer restarts).
    default = max(low, min(high, 512 * 2**20 // max(shape.vector, 1)))
    basis = min(basis, max(default, wanted + 2))
    return AnalysisPlan(name, "", eigen_bytes(basis, wanted, keeps_ritz, shape), {"basis_size": basis})


def plan_generic(name: str, vectors: int, extra: int, shape: Shape, budget: Budget) -> AnalysisPlan:
    """Analyses whose memory is a few vectors and one product (power iterations, gradient
    ascent) or, without data, a few copies of the weights."""
    needs = shape.resident + vectors * shape.vector + extra + shape.products(1)
    if needs > budget.bytes:
        raise _refuse(name, "the analysis", needs, budget, "use a smaller batch or raise --memory-budget")
    return AnalysisPlan(name, "", needs)


def plan_analysis(name: str, spec: Any, shape: Shape, budget: Budget, *, eigen_earlier: bool,
                  trace_later: bool, seeded: int) -> AnalysisPlan:
    """The plan of one analysis under ``budget``; raises ResourceExhausted when nothing fits."""
    if name == "hessian_trace":
        return plan_trace(spec, shape, budget, seeded)
    if name == "hessian_density":
        return plan_density(spec, shape, budget)
    if name == "hessian_eigen":
        return plan_eigen(name, spec.top_k + spec.bottom_k, trace_later, shape, budget)
    if name == "sharpness" and not eigen_earlier:
        return plan_eigen(name, 1, False, shape, budget)
    if name == "non_uniformity":
        samples = PER_SAMPLE_ELEMENTS * shape.itemsize
        return plan_generic(name, MIN_BASIS_MARGIN + 32, min(samples, 64 * shape.vector), shape, budget)
    if shape.product is None:
        return plan_generic(name, 3, 0, shape, budget)
    return plan_generic(name, 8, 0, shape, budget)


def resident_bytes(module: torch.nn.Module, tensors: list[torch.Tensor]) -> int:
    """Bytes of the model's parameters and buffers and the batch's tensors."""
    held = {id(t): t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers(), *tensors]}
    return sum(held.values())


def summary(plans: list[AnalysisPlan], budget: Budget, dtype: torch.dtype) -> dict[str, Any]:
    """The report's ``run`` section."""
    choices: dict[str, str] = {"vector_dtype": str(dtype).removeprefix("torch.")}
    for plan in plans:
        for key, value in plan.choices.items():
            prefix = f"{plan.analysis}[{plan.block}]" if plan.block else plan.analysis
            choices[f"{prefix}.{key}"] = str(value)
    return {
        "planned_peak_bytes": max((p.peak_bytes for p in plans), default=0),
        "measured_peak_bytes": max((p.measured_bytes for p in plans), default=0),
        "choices": choices,
        "memory_budget_bytes": budget.bytes,
        "memory_budget_source": budget.source,
        "analyses": [{"analysis": p.analysis, "block": p.block, "planned_peak_bytes": p.peak_bytes,
                      "measured_peak_bytes": p.measured_bytes} for p in plans],
    }


__all__ = ["CALIBRATION_PRODUCTS", "AnalysisPlan", "Budget", "PeakMeter", "ProductCost", "Shape", "calibrate", "format_bytes",
           "plan_analysis", "resident_bytes", "resolve_budget", "summary"]

