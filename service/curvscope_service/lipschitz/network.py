"""Graph -> LipSDP chain: a network as affine maps with slope-restricted activations between them.

Consecutive affine layers (Linear, Conv1d, Conv2d, eval-mode BatchNorm, Flatten, average pooling,
dropout in eval mode, input normalisation) form one *segment*; its linear part is read off by
running the segment itself, so BatchNorm folding, padding, stride and pooling are exact without
a rule per layer type. A segment is unrolled to a dense float64 matrix when it has at most
``max_dense_entries`` entries; otherwise it stays an operator (products through the segment).
The chain verdict (which layer breaks it and why) comes from ``chain``.
"""

from __future__ import annotations

import copy
import math
import operator
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import fx, nn

from ..loading import LoadedModel
from .chain import ACTIVATION_MODULES, ACTIVATION_OPS, WEIGHTED_MODULES, graph_chain, is_tensor_valued, module_chain, op_name

MAX_DENSE_ENTRIES = 4_000_000  # 32 MB of float64 per segment


@dataclass(frozen=True)
class Slope:
    """An activation slope-restricted to [alpha, beta]: alpha <= (f(x)-f(y))/(x-y) <= beta."""

    name: str
    alpha: float
    beta: float

    @property
    def lipschitz(self) -> float:
        return max(abs(self.alpha), abs(self.beta))


def _gelu_slopes() -> tuple[float, float]:
    # d/dx x·Φ(x) = Φ(x) + x·φ(x); its extremes are where φ(x)(2 - x²) = 0, i.e. x = ±√2.
    r = math.sqrt(2.0)
    phi = math.exp(-1.0) / math.sqrt(2.0 * math.pi)
    cdf = 0.5 * (1.0 + math.erf(1.0))
    return (1.0 - cdf) - r * phi, cdf + r * phi


def _tanh_gelu_slopes() -> tuple[float, float]:
    # No closed form: the derivative is smooth with one minimum and one maximum, found on a fine
    # grid and refined; widened by 1e-9 so the rounding of the search cannot make the sector too tight.
    from scipy.optimize import minimize_scalar

    x = torch.linspace(-6.0, 6.0, 120_001, dtype=torch.float64, requires_grad=True)
    (d,) = torch.autograd.grad(nn.functional.gelu(x, approximate="tanh").sum(), x)

    def slope(t: float) -> float:
        tt = torch.tensor([t], dtype=torch.float64, requires_grad=True)
        (g,) = torch.autograd.grad(nn.functional.gelu(tt, approximate="tanh").sum(), tt)
        return float(g)

    lo_x, hi_x = float(x[d.argmin()].detach()), float(x[d.argmax()].detach())
    lo = minimize_scalar(slope, bounds=(lo_x - 1e-3, lo_x + 1e-3), method="bounded", options={"xatol": 1e-12}).fun
    hi = -minimize_scalar(lambda t: -slope(t), bounds=(hi_x - 1e-3, hi_x + 1e-3), method="bounded", options={"xatol": 1e-12}).fun
    return float(lo) - 1e-9, float(hi) + 1e-9


def activation_slope(kind: str, *, negative_slope: float = 0.01, approximate: str = "none") -> Slope:
    """The tightest slope sector of a supported activation."""
    if kind == "relu":
        return Slope("relu", 0.0, 1.0)
    if kind == "leaky_relu":
        a = float(negative_slope)
        return Slope("leaky_relu", min(a, 1.0), max(a, 1.0))
    if kind == "tanh":
        return Slope("tanh", 0.0, 1.0)
    if kind == "sigmoid":
        return Slope("sigmoid", 0.0, 0.25)
    if kind == "gelu":
        if approximate == "tanh":
            return Slope("gelu_tanh", *_tanh_gelu_slopes())
        return Slope("gelu", *_gelu_slopes())
    raise ValueError(f"no slope bounds for activation '{kind}'")


def module_slope(leaf: nn.Module) -> Slope:
    """The slope sector of an activation module (its type a key of ``chain.ACTIVATION_MODULES``)."""
    return activation_slope(ACTIVATION_MODULES[type(leaf)], negative_slope=getattr(leaf, "negative_slope", 0.01),
                            approximate=getattr(leaf, "approximate", "none"))


def node_slope(node: fx.Node, op: str) -> Slope:
    """The slope sector of an activation call ``op`` (one of ``chain.ACTIVATION_OPS``) in an exported graph."""
    negative_slope = node.args[1] if op == "leaky_relu" and len(node.args) > 1 else node.kwargs.get("negative_slope", 0.01)
    return activation_slope(op, negative_slope=negative_slope, approximate=node.kwargs.get("approximate", "none"))


@dataclass
class Segment:
    """One affine map x -> A x + b between activations (``forward`` includes b)."""

    name: str
    forward: Callable[[torch.Tensor], torch.Tensor]
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    matrix: np.ndarray | None = None  # A, float64, (out, in) of the flattened shapes

    @property
    def in_dim(self) -> int:
        return math.prod(self.in_shape)

    @property
    def out_dim(self) -> int:
        return math.prod(self.out_shape)

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        """A x for a batch x of shape (batch, *in_shape); the bias taken off."""
        return self.forward(x) - self.forward(torch.zeros_like(x))


@dataclass
class Network:
    """f = S_L ∘ φ_L ∘ ... ∘ φ_1 ∘ S_0: segments with ``len(segments) - 1`` activations."""

    segments: list[Segment]
    activations: list[Slope]
    input_shape: tuple[int, ...]
    dense: bool = field(init=False)

    def __post_init__(self) -> None:
        self.dense = all(s.matrix is not None for s in self.segments)

    @property
    def weights(self) -> list[np.ndarray]:
        return [s.matrix for s in self.segments]  # type: ignore[misc]

    def forward(self, x: torch.Tensor, smooth: float | None = None) -> torch.Tensor:
        """The network on a batch; with ``smooth``, ReLU-like kinks become softplus of that sharpness."""
        for i, segment in enumerate(self.segments):
            x = segment.forward(x)
            if i < len(self.activations):
                x = _apply_activation(self.activations[i], x, smooth)
        return x


@dataclass
class Extraction:
    network: Network | None
    reason: str


def extract_network(model: LoadedModel, max_dense_entries: int = MAX_DENSE_ENTRIES) -> Extraction:
    """The model as a LipSDP chain in float64 on the CPU, or the reason it is not one."""
    module = copy.deepcopy(model.module).to(device="cpu", dtype=torch.float64)
    if isinstance(module, fx.GraphModule):
        chain = graph_chain(module)
        if not chain.found:
            return Extraction(None, chain.reason)
    else:
        chain = module_chain(module)
        if not chain.found:
            return Extraction(None, chain.reason)
    input_shape = model.input_shape or _first_linear_shape(module)
    if input_shape is None:
        return Extraction(None, "the model's input shape is unknown; give input_shape in its config")
    input_shape = tuple(input_shape)
    pieces = _graph_pieces(module, input_shape) if isinstance(module, fx.GraphModule) else _module_pieces(module)
    segments: list[Segment] = []
    activations: list[Slope] = []
    shape = tuple(input_shape)
    for kind, payload in pieces:
        if kind == "affine":
            forward, name = payload
            if len(segments) > len(activations):  # two affine runs with nothing between: compose
                previous = segments.pop()
                forward = _compose(previous.forward, forward)
                name = f"{previous.name}+{name}"
                shape = previous.in_shape
            with torch.no_grad():
                out_shape = tuple(forward(torch.zeros(1, *shape, dtype=torch.float64)).shape[1:])
            segments.append(Segment(name, forward, shape, out_shape))
            shape = out_shape
        else:
            if len(segments) == len(activations):  # an activation first or two in a row: identity map between
                segments.append(Segment("identity", lambda x: x, shape, shape))
            activations.append(payload)
    if len(segments) == len(activations):
        segments.append(Segment("identity", lambda x: x, shape, shape))
    for segment in segments:
        if segment.in_dim * segment.out_dim <= max_dense_entries:
            segment.matrix = unroll(segment)
    return Extraction(Network(segments, activations, tuple(input_shape)), chain.reason)


def _compose(f: Callable, g: Callable) -> Callable:
    return lambda x: g(f(x))


def unroll(segment: Segment, chunk: int = 1024) -> np.ndarray:
    """The segment's matrix A, columns A e_j read off by running it on basis vectors: exact for any affine layer mix."""
    n = segment.in_dim
    columns = []
    with torch.no_grad():
        offset = segment.forward(torch.zeros(1, *segment.in_shape, dtype=torch.float64)).reshape(1, -1)
        for start in range(0, n, chunk):
            stop = min(n, start + chunk)
            basis = torch.zeros(stop - start, n, dtype=torch.float64)
            basis[torch.arange(stop - start), torch.arange(start, stop)] = 1.0
            out = segment.forward(basis.reshape(-1, *segment.in_shape)).reshape(stop - start, -1)
            columns.append((out - offset).T)
    return torch.cat(columns, dim=1).numpy()


def _first_linear_shape(module: nn.Module) -> tuple[int, ...] | None:
    for m in module.modules():
        if isinstance(m, nn.Linear):
            return (m.in_features,)
        if isinstance(m, (*WEIGHTED_MODULES, nn.Flatten)):
            return None
    return None


def _module_pieces(module: nn.Module) -> list[tuple[str, object]]:
    leaves = [(name, m) for name, m in module.named_modules() if not list(m.children())]
    pieces: list[tuple[str, object]] = []
    run: list[tuple[str, nn.Module]] = []
    for name, leaf in leaves:
        if type(leaf) not in ACTIVATION_MODULES:
            run.append((name, leaf))
            continue
        if run:
            pieces.append(("affine", (nn.Sequential(*(m for _, m in run)), "+".join(n for n, _ in run))))
            run = []
        pieces.append(("activation", module_slope(leaf)))
    if run:
        pieces.append(("affine", (nn.Sequential(*(m for _, m in run)), "+".join(n for n, _ in run))))
    return pieces


class SegmentRun(fx.Interpreter):
    """Runs an exported graph from ``start`` (given its value) up to ``stop`` and returns that value."""

    class _Stop(Exception):
        def __init__(self, value: torch.Tensor) -> None:
            self.value = value

    def __init__(self, module: fx.GraphModule, start: fx.Node, stop: fx.Node) -> None:
        super().__init__(module)
        self.start, self.stop = start, stop
        self.input = [n for n in module.graph.nodes if n.op == "placeholder"][-1]
        # only what ``stop`` depends on other than through ``start`` runs (weights, shape queries):
        # not the layers before ``start`` nor other branches
        self.needed: set[fx.Node] = set()
        stack = [stop]
        while stack:
            node = stack.pop()
            if node in self.needed:
                continue
            self.needed.add(node)
            if node is not start:
                stack.extend(node.all_input_nodes)

    def run_node(self, node: fx.Node):
        if node.op == "call_module" and node.target == "_guards_fn":
            return None
        if node.op != "placeholder" and node not in self.needed:
            return None
        value = super().run_node(node)
        if node is self.stop:
            raise self._Stop(value)
        return value

    def __call__(self, x: torch.Tensor, input_shape: tuple[int, ...]) -> torch.Tensor:
        # Nodes before ``start`` run on zeros of the same batch, only so that shape queries on
        # them (a dynamic batch size) see the right batch.
        placeholder = torch.zeros(x.shape[0], *input_shape, dtype=x.dtype)
        env = {} if self.start is self.input else {self.start: x}
        if self.start is self.input:
            placeholder = x
        try:
            self.run(placeholder, initial_env=env)
        except self._Stop as stop:
            return stop.value
        raise AssertionError("segment end not reached")


def _graph_pieces(module: fx.GraphModule, input_shape: tuple[int, ...]) -> list[tuple[str, object]]:
    placeholders = [n for n in module.graph.nodes if n.op == "placeholder"]
    data = set(placeholders[-1:])
    pieces: list[tuple[str, object]] = []
    start = placeholders[-1]
    run: list[fx.Node] = []

    def close_run() -> None:
        if run:
            runner = SegmentRun(module, start, run[-1])
            names = "+".join(n.name for n in run if n.target is not operator.getitem)
            pieces.append(("affine", (lambda x, r=runner: r(x, input_shape), names)))
            run.clear()

    for node in module.graph.nodes:
        if node.op != "call_function" or not any(a in data for a in node.all_input_nodes) or not is_tensor_valued(node):
            continue
        data.add(node)
        op = "getitem" if node.target is operator.getitem else op_name(node)
        if op in ACTIVATION_OPS:
            close_run()
            pieces.append(("activation", node_slope(node, op)))
            start = node
        else:
            run.append(node)
    close_run()
    return pieces


def _apply_activation(slope: Slope, x: torch.Tensor, smooth: float | None) -> torch.Tensor:
    if slope.name == "relu":
        return nn.functional.softplus(x, beta=smooth) if smooth else torch.relu(x)
    if slope.name == "leaky_relu":
        # leaky ReLU = a·x + (1 - a)·relu(x)
        a = slope.alpha if slope.beta == 1.0 else slope.beta
        relu = nn.functional.softplus(x, beta=smooth) if smooth else torch.relu(x)
        return a * x + (1.0 - a) * relu
    if slope.name == "tanh":
        return torch.tanh(x)
    if slope.name == "sigmoid":
        return torch.sigmoid(x)
    return nn.functional.gelu(x, approximate="tanh" if slope.name == "gelu_tanh" else "none")
