"""The naive bound of a network that is not a plain chain: residual blocks and max pooling.

A bound U(v) on the ℓ2 Lipschitz constant of the map from the input to each value v of the
graph, propagated in topological order by rules that are each sound on their own:

- a run of affine operations, each with one data input (Linear, Conv, eval BatchNorm, average
  pooling, reshapes, adding or multiplying by a constant): U(end) = ‖A‖₂ · U(start), A the run's
  linear part, read off by running the run itself (as for a chain's segments);
- a slope-restricted activation: U = max(|α|, |β|) · U(input);
- max pooling with kernel k, stride s and dilation d per spatial axis:
  U = √N · U(input), N = Π min(k, ⌈(d(k−1)+1)/s⌉). Every input element lies in at most N windows,
  and |max_w x − max_w y| ≤ max_{i∈w} |x_i − y_i|, so ‖mp(x) − mp(y)‖² ≤ N‖x − y‖². (In ℓ∞ max
  pooling is 1-Lipschitz; in ℓ2 overlapping windows count each element several times.)
- softmax: U = U(input) / 2 (its Jacobian's Gershgorin bound); hardtanh, clamp, abs: U = U(input);
- a join of two paths, add or sub with alpha a: U = U(a) + |a| · U(b) (triangle inequality);
- a concatenation: U = √(Σ U(part)²), a part counted as often as it occurs.

For a residual block y = s(x) + f(x) this is U(y) = U(x)·(‖s‖ + L(f)) with L(f) the product of
norms and slopes inside the block, 1 + L(f) for an identity skip: the naive bound is the product
over the top-level chain of layer norms and of (‖skip‖ + L(block)) per block. Anything else (a
product of two data paths, attention's softmax, an unknown op) stops the bound with its reason.
"""

from __future__ import annotations

import copy
import functools
import math
import operator
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from torch import fx, nn

from ..loading.torch_export import argument
from .chain import (ACTIVATION_MODULES, ACTIVATION_OPS, AFFINE_MODULES, AFFINE_OPS, OP_REASONS, is_nested_sequential,
                    is_tensor_valued, live_users, op_name)
from .eclipse_fast import eclipse_fast
from .lipsdp_graph import LiftedGraph
from .naive import spectral_norm
from .network import MAX_DENSE_ENTRIES, Segment, SegmentRun, Slope, module_slope, node_slope, unroll

# ops affine in their data argument besides the chain's own
_MORE_AFFINE_OPS = {
    "mean", "unsqueeze", "squeeze", "permute", "transpose", "t", "neg", "constant_pad_nd", "slice", "select", "expand", "repeat",
}
# affine in each tensor argument separately (the other arguments constant): data may sit anywhere
_AFFINE_IN_ANY_ARGUMENT = {"linear", "conv1d", "conv2d", "convolution", "mm", "matmul", "addmm", "mul", "add", "sub"}
_ELEMENTWISE_WITH_CONSTANT = {"add", "sub", "mul", "div"}
_MAX_POOLS = {"max_pool1d": 1, "max_pool2d": 2, "max_pool2d_with_indices": 2, "max_pool3d": 3, "max_pool3d_with_indices": 3}
# other ops of one data input with a known ℓ2 Lipschitz constant. Softmax: its Jacobian diag(p) − ppᵀ
# is symmetric with row i's Gershgorin bound p_i(1 − p_i) + p_i Σ_{j≠i} p_j = 2p_i(1 − p_i) ≤ 1/2.
_LIPSCHITZ_OPS = {"softmax": 0.5, "_softmax": 0.5, "hardtanh": 1.0, "clamp": 1.0, "clamp_min": 1.0, "clamp_max": 1.0, "abs": 1.0}
# bilinear: with two data arguments a product of two paths
_BILINEAR_OPS = {"mul", "matmul", "mm", "bmm", "baddbmm", "linear", "conv1d", "conv2d", "convolution", "addmm", "einsum"}


def max_pool_factor(kernel: Any, stride: Any, dilation: Any, dims: int) -> tuple[float, int]:
    """(√N, N): the ℓ2 Lipschitz constant bound of max pooling, N the most windows an element is in."""
    def per_axis(value: Any, default: list[int]) -> list[int]:
        if value is None or (isinstance(value, (list, tuple)) and len(value) == 0):
            return default
        values = list(value) if isinstance(value, (list, tuple)) else [value]
        return [int(v) for v in values] * dims if len(values) == 1 else [int(v) for v in values]

    k = per_axis(kernel, [1] * dims)
    s = per_axis(stride, k)
    d = per_axis(dilation, [1] * dims)
    count = math.prod(min(ki, math.ceil((di * (ki - 1) + 1) / si)) for ki, si, di in zip(k, s, d))
    return math.sqrt(count), count


# The whole-graph LipSDP is read off densely: at most this many neurons, and coordinates (input
# entries and neurons) per basis-vector run.
MAX_LIFTED_NEURONS = 1200
MAX_LIFTED_COORDINATES = 6000
# (piece key, weights W_0 … W_L, slopes) -> an upper bound of that chain piece, or None for its norms
PieceBounder = Callable[[tuple[str, str], list[np.ndarray], list[Slope]], "float | None"]
# how ``GraphBound.combine`` combines the chain pieces' bounds, in the words of a report's note
COMBINED_BY_THE_NAIVE_RULES = "combined by the naive bound's rules (a residual block as ‖skip‖ + L(block), max pooling as √N)"


@dataclass
class Join:
    """A residual add or a concatenation. With ``block_input`` (the node every path of the join
    starts from), ``terms`` are the paths' bounds from there, the shortest path (the skip) first;
    without, from the network's input."""

    name: str
    op: str
    block_input: str | None
    terms: list[float]

    def describe(self) -> str:
        if self.op == "cat":
            return f"'{self.name}' (concatenation): √(Σ parts²)"
        if self.block_input is None:
            return f"'{self.name}' ({self.op}): the sum of its paths' bounds"
        skip, block = self.terms
        kind = "identity skip 1" if skip == 1.0 else f"shortcut of norm {skip:.6g}"
        return f"'{self.name}' over '{self.block_input}': {kind} + L(block) {block:.6g} = {skip + block:.6g}"


@dataclass
class GraphBound:
    """The naive bound of a non-chain network, what it is made of, and a smoothed forward for the ascent."""

    value: float | None
    reason: str  # why it is not a chain, or why no bound applies
    exact: bool = True
    joins: list[Join] = field(default_factory=list)
    pools: list[str] = field(default_factory=list)
    forward_fn: Callable[[torch.Tensor, float | None], torch.Tensor] | None = None
    # the same rules with each chain piece (affine maps and activations between joins and pools)
    # bounded by ECLipsE-Fast instead of its product of norms; None when it was not computed
    eclipse: float | None = None
    eclipse_pieces: int = 0  # pieces bounded by ECLipsE-Fast (the rest by their norms: no activation, or not dense)
    # the chain pieces with an activation and dense weights: (key, W_0 … W_L, slopes), and the
    # function that combines a bound per piece (a callback key, weights, slopes -> bound or None)
    pieces: list[tuple[tuple[str, str], list[np.ndarray], list[Slope]]] = field(default_factory=list)
    combine: Callable[[PieceBounder], float] | None = None
    # reads the whole graph off as one LipSDP (affine maps, joins and activations only; not too
    # large), once and only when asked: it runs the graph on a basis-vector batch
    lift: Callable[[], LiftedGraph | None] | None = None

    @property
    def lifted(self) -> LiftedGraph | None:
        return self.lift() if self.lift is not None else None

    def forward(self, x: torch.Tensor, smooth: float | None = None) -> torch.Tensor:
        assert self.forward_fn is not None
        return self.forward_fn(x, smooth)

    def describe(self) -> str:
        parts = []
        if self.joins:
            parts.append(f"{len(self.joins)} join(s) bounded by the sum of their paths: " + "; ".join(j.describe() for j in self.joins))
        if self.pools:
            parts.append("max pooling bounded by √N, N the most windows an element lies in: " + "; ".join(self.pools))
        return ". ".join(parts)


def bound_graph(module: nn.Module, input_shape: tuple[int, ...], max_dense_entries: int = MAX_DENSE_ENTRIES,
                check: Callable[[], None] | None = None) -> GraphBound:
    """The naive bound of an exported graph or a nested nn.Sequential, or why there is none;
    ``check`` is called before every layer norm (it raises to cancel)."""
    module = copy.deepcopy(module).to(device="cpu", dtype=torch.float64)
    if isinstance(module, fx.GraphModule):
        walk = _GraphWalk(module, tuple(input_shape), max_dense_entries)
        walk.check = check
        bound = walk.run()
        attention = attention_product(module)
        if bound.value is None and attention and attention not in bound.reason:
            # the walk stops at its first obstacle; attention is the one no rule can ever bound
            bound.reason += (f"; and the attention product '{attention}' (q·kᵀ, a product of two data paths) has no "
                             "global Lipschitz constant")
        return bound
    if is_nested_sequential(module):
        return _sequential_bound(module, tuple(input_shape), max_dense_entries, check)
    return GraphBound(None, f"{type(module).__name__} is not an nn.Sequential, so its data flow is unknown; export it as .pt2")


_ATTENTION_OPS = {"scaled_dot_product_attention", "_scaled_dot_product_attention_math",
                  "_scaled_dot_product_flash_attention_for_cpu"}


def attention_product(module: fx.GraphModule) -> str | None:
    """The first node that multiplies two data-dependent tensors (attention's q·kᵀ), or None."""
    dependent: set[fx.Node] = set()
    for node in module.graph.nodes:
        if node.op == "placeholder":
            dependent.add(node)
            continue
        inputs = [n for n in node.all_input_nodes if n in dependent]
        if not inputs:
            continue
        dependent.add(node)
        op = op_name(node) if node.op == "call_function" else ""
        if op in _ATTENTION_OPS or (op in {"matmul", "bmm", "mm", "baddbmm", "einsum"} and len(set(inputs)) > 1):
            return node.name
    return None


def _segment(forward: Callable, name: str, in_shape: tuple[int, ...], max_dense_entries: int) -> tuple[float, bool, np.ndarray | None]:
    """(‖A‖₂, exact, A or None when too large to unroll) of an affine map's linear part A."""
    with torch.no_grad():
        out_shape = tuple(forward(torch.zeros(1, *in_shape, dtype=torch.float64)).shape[1:])
    segment = Segment(name, forward, in_shape, out_shape)
    if segment.in_dim * segment.out_dim <= max_dense_entries:
        segment.matrix = unroll(segment)
    norm, exact = spectral_norm(segment)
    return norm, exact, segment.matrix


def _smooth_activation(slope: Slope, x: torch.Tensor, smooth: float | None, exact: Callable[[], torch.Tensor]) -> torch.Tensor:
    if smooth and slope.name == "relu":
        return nn.functional.softplus(x, beta=smooth)
    if smooth and slope.name == "leaky_relu":
        a = slope.alpha if slope.beta == 1.0 else slope.beta
        return a * x + (1.0 - a) * nn.functional.softplus(x, beta=smooth)
    return exact()


# --------------------------------------------------------------------------------------------- #
# nn.Sequential: a chain whose only non-chain layers are max pooling


_POOL_MODULES = {nn.MaxPool1d: 1, nn.MaxPool2d: 2, nn.MaxPool3d: 3}


def _sequential_bound(module: nn.Sequential, input_shape: tuple[int, ...], max_dense_entries: int,
                      check: Callable[[], None] | None = None) -> GraphBound:
    """A chain cut by max pools into chain pieces: the product of the pieces' bounds and the pools' √N."""
    leaves = [(name, m) for name, m in module.named_modules() if not list(m.children())]
    groups: list[tuple[float, None] | tuple[None, tuple[tuple[str, str], list, list[float], list[Slope]]]] = []
    pools: list[str] = []
    exact = True
    run: list[tuple[str, nn.Module]] = []
    items: list[tuple[str, Any, float]] = []  # the open piece: ("W", matrix or None, norm) and ("act", slope, lipschitz)
    names: list[str] = []
    shape = input_shape

    def close_run() -> None:
        nonlocal shape, exact
        if run:
            if check is not None:
                check()
            seq = nn.Sequential(*(m for _, m in run))
            norm, is_exact, matrix = _segment(seq, "+".join(n for n, _ in run), shape, max_dense_entries)
            with torch.no_grad():
                shape = tuple(seq(torch.zeros(1, *shape, dtype=torch.float64)).shape[1:])
            items.append(("W", matrix, norm))
            exact &= is_exact
            run.clear()

    def identity_unless_affine() -> None:
        if not items or items[-1][0] != "W":
            items.append(("W", np.eye(math.prod(shape)), 1.0))

    def close_piece() -> None:
        close_run()
        if items:
            identity_unless_affine()
            weights = [m for kind, m, _ in items if kind == "W"]
            norms = [n for kind, _, n in items if kind == "W"]
            slopes = [m for kind, m, _ in items if kind == "act"]
            groups.append((None, ((names[0], names[-1]), weights, norms, slopes)))
            items.clear()
            names.clear()

    for name, leaf in leaves:
        if isinstance(leaf, AFFINE_MODULES):
            if isinstance(leaf, (nn.BatchNorm1d, nn.BatchNorm2d)) and leaf.training:
                return GraphBound(None, f"layer '{name}' (BatchNorm) is in training mode")
            run.append((name, leaf))
            names.append(name)
        elif type(leaf) in ACTIVATION_MODULES:
            close_run()
            identity_unless_affine()
            slope = module_slope(leaf)
            items.append(("act", slope, slope.lipschitz))
            names.append(name)
        elif type(leaf) in _POOL_MODULES:
            close_piece()
            factor, count = max_pool_factor(leaf.kernel_size, leaf.stride, leaf.dilation, _POOL_MODULES[type(leaf)])
            groups.append((factor, None))
            pools.append(f"'{name}' √{count} = {factor:.6g}")
            with torch.no_grad():
                shape = tuple(leaf(torch.zeros(1, *shape, dtype=torch.float64)).shape[1:])
        else:
            return GraphBound(None, f"layer '{name}' ({type(leaf).__name__}): it is neither affine, a supported "
                                    "slope-restricted activation nor max pooling; no upper bound is known for it")
    close_piece()

    def combine(bounder: PieceBounder) -> float:
        total = 1.0
        for factor, piece in groups:
            if piece is None:
                total *= factor  # type: ignore[operator]
                continue
            key, weights, norms, slopes = piece
            naive = math.prod(norms) * math.prod(a.lipschitz for a in slopes)
            value = bounder(key, weights, slopes) if slopes and all(w is not None for w in weights) else None
            total *= naive if value is None else min(naive, value)
        return total

    pieces = [(key, weights, slopes) for _, piece in groups if piece is not None
              for key, weights, _, slopes in [piece] if slopes and all(w is not None for w in weights)]
    eclipse_pieces = [key for key, _, slopes in pieces if all(a.alpha >= 0 for a in slopes)]
    eclipse = combine(lambda key, weights, slopes: eclipse_fast(weights, slopes) if key in eclipse_pieces else None)

    smoothable = {
        id(leaf): module_slope(leaf) for _, leaf in leaves if ACTIVATION_MODULES.get(type(leaf)) in ("relu", "leaky_relu")
    }

    def forward(x: torch.Tensor, smooth: float | None) -> torch.Tensor:
        for _, leaf in leaves:
            slope = smoothable.get(id(leaf))
            x = _smooth_activation(slope, x, smooth, lambda x=x, leaf=leaf: leaf(x)) if slope else leaf(x)
        return x

    return GraphBound(combine(lambda *piece: None), "", exact, [], pools, forward,
                      eclipse if exact else None, len(eclipse_pieces), pieces, combine)


# --------------------------------------------------------------------------------------------- #
# exported graphs


class _Unsupported(Exception):
    pass


class _GraphWalk:
    def __init__(self, module: fx.GraphModule, input_shape: tuple[int, ...], max_dense_entries: int) -> None:
        self.module, self.input_shape, self.max_dense = module, input_shape, max_dense_entries
        self.input = [n for n in module.graph.nodes if n.op == "placeholder"][-1]
        self.data: set[fx.Node] = {self.input}
        self.kind: dict[fx.Node, str] = {self.input: "input"}
        self.data_inputs: dict[fx.Node, list[fx.Node]] = {}
        self.run_start: dict[fx.Node, fx.Node] = {}  # affine node -> the node its affine run starts from
        self.piece_start: dict[fx.Node, fx.Node] = {}  # affine or activation node -> where its chain piece starts
        self.norms: dict[tuple[fx.Node, fx.Node], float] = {}
        self.matrices: dict[tuple[fx.Node, fx.Node], np.ndarray | None] = {}
        self.order: list[fx.Node] = []
        self.output: fx.Node = self.input
        self.check: Callable[[], None] | None = None
        self.factor: dict[fx.Node, float] = {}  # activation or pool -> its Lipschitz constant
        self.alpha: dict[fx.Node, float] = {}
        self.slopes: dict[fx.Node, Slope] = {}
        self.exact = True
        self.pools: list[str] = []
        self.shapes = self._shapes()

    def _shapes(self) -> dict[fx.Node, tuple[int, ...]]:
        shapes: dict[fx.Node, tuple[int, ...]] = {}

        class Record(fx.Interpreter):
            def run_node(inner, node):  # noqa: N805
                if node.op == "call_module" and node.target == "_guards_fn":
                    return None
                value = super(Record, inner).run_node(node)
                if isinstance(value, torch.Tensor):
                    shapes[node] = tuple(value.shape[1:])
                return value

        with torch.no_grad():
            Record(self.module).run(torch.zeros(1, *self.input_shape, dtype=torch.float64))
        return shapes

    # classification --------------------------------------------------------------------------

    def _occurrences(self, node: fx.Node) -> list[fx.Node]:
        found: list[fx.Node] = []
        fx.node.map_arg((node.args, node.kwargs), lambda a: found.append(a) if a in self.data else None)
        return found

    def _classify(self, node: fx.Node) -> str:
        op = "getitem" if node.target is operator.getitem else op_name(node)
        occurrences = self._occurrences(node)
        unique = list(dict.fromkeys(occurrences))
        self.data_inputs[node] = unique
        first_is_data = bool(node.args) and node.args[0] in self.data
        if op == "getitem":
            source = node.args[0]
            if self.kind.get(source) == "pool":
                if node.args[1] != 0:
                    raise _Unsupported(f"'{node.name}': the indices of max pooling are not a Lipschitz function of the input")
                return "alias"
            return "affine"
        if op in _MAX_POOLS and len(unique) == 1 and first_is_data:
            return "pool"
        if op in ACTIVATION_OPS and len(unique) == 1 and first_is_data:
            return "activation"
        if op in _LIPSCHITZ_OPS and len(unique) == 1 and first_is_data and len(occurrences) == 1:
            return "lipschitz"
        if op in ("add", "sub") and len(unique) == 2:
            return "join"
        if op == "cat" and unique:
            return "cat"
        if op == "div" and node.kwargs.get("rounding_mode") is not None:
            raise _Unsupported(f"'{node.name}' (div, rounding mode {node.kwargs['rounding_mode']}): a rounded division is not continuous")
        if op == "_to_copy" and node.kwargs.get("dtype") is not None and not node.kwargs["dtype"].is_floating_point:
            raise _Unsupported(f"'{node.name}' (_to_copy to {node.kwargs['dtype']}): a cast to integers is not continuous")
        if len(unique) == 1:
            if op in _ELEMENTWISE_WITH_CONSTANT and op in ("mul", "div") and len(occurrences) > 1:
                raise _Unsupported(f"'{node.name}' ({op}): a product of the data with itself is not affine")
            if op in ("add", "sub") or op in _AFFINE_IN_ANY_ARGUMENT and len(occurrences) == 1:
                return "affine"
            if (op in AFFINE_OPS or op in _MORE_AFFINE_OPS or op == "div") and first_is_data and len(occurrences) == 1:
                return "affine"
        why = OP_REASONS.get(op, "it is neither affine, a supported slope-restricted activation, max pooling nor a residual add")
        if op in _BILINEAR_OPS and len(unique) > 1:
            why = "a product of two data paths (a gate, attention's q·kᵀ) has no global Lipschitz constant"
        elif len(unique) > 1:
            why = "it combines two data paths in a way that has no bound here"
        raise _Unsupported(f"'{node.name}' ({op}): {why}; no upper bound is known for it")

    # bounds -----------------------------------------------------------------------------------

    def _run_norm(self, start: fx.Node, end: fx.Node) -> float:
        key = (start, end)
        if key not in self.norms:
            if self.check is not None:
                self.check()
            runner = SegmentRun(self.module, start, end)
            forward = lambda x, r=runner: r(x, self.input_shape)  # noqa: E731
            norm, exact, matrix = _segment(forward, f"{start.name}->{end.name}", self.shapes[start], self.max_dense)
            self.norms[key], self.matrices[key] = norm, matrix
            self.exact &= exact
        return self.norms[key]

    def _piece(self, start: fx.Node, end: fx.Node) -> tuple[list[np.ndarray | None], list[float], list[Slope]]:
        """The chain piece start -> end as weights W_0 … W_L (None: too large to unroll), their norms,
        and the L activations' slopes between them."""
        nodes = [end]
        while self.data_inputs[nodes[-1]][0] is not start:
            nodes.append(self.data_inputs[nodes[-1]][0])
        nodes.reverse()
        activations = [v for v in nodes if self.kind[v] == "activation"]
        weights: list[np.ndarray | None] = []
        norms: list[float] = []
        previous = start
        for boundary in [*activations, None]:  # the affine run before each activation, then the last
            at = nodes.index(boundary) if boundary is not None else len(nodes)
            upto = nodes[at - 1] if at > 0 else start
            if upto is previous or self.kind[upto] == "activation":  # no affine op between: the identity
                weights.append(np.eye(math.prod(self.shapes[previous])))
                norms.append(1.0)
            else:
                norms.append(self._run_norm(previous, upto))
                weights.append(self.matrices[(previous, upto)])
            previous = boundary
        return weights, norms, [self.slopes[v] for v in activations]

    def _piece_bound(self, start: fx.Node, end: fx.Node, bounder: PieceBounder) -> float:
        """The piece's product of norms and slopes, or the ``bounder``'s bound when it gives a smaller
        one (only asked for a piece with an activation whose every affine part unrolls)."""
        weights, norms, slopes = self._piece(start, end)
        naive = math.prod(norms) * math.prod(a.lipschitz for a in slopes)
        if not slopes or any(w is None for w in weights):
            return naive
        value = bounder((start.name, end.name), weights, slopes)  # type: ignore[arg-type]
        return naive if value is None else min(naive, value)

    def combine(self, bounder: PieceBounder) -> float:
        """U(output) with every chain piece bounded by ``bounder`` (where it gives a bound) and
        combined by the same rules as the naive bound."""
        (value,) = self._bounds(self.order, {self.input: 1.0}, [self.output], bounder=bounder)
        return value

    def _bounds(self, nodes: list[fx.Node], sources: dict[fx.Node, float], wanted: list[fx.Node],
                bounder: PieceBounder | None = None) -> list[float]:
        """U of each ``wanted`` node, propagated through ``nodes`` (in order) from U of the ``sources``;
        _Unsupported if one depends on data from outside them. With a ``bounder``, whole chain pieces
        (affine maps and activations) are bounded at once by ``_piece_bound``."""
        pieces = bounder is not None
        u = dict(sources)
        inside = set(nodes)
        lazy = ("affine", "activation") if pieces else ("affine",)

        def of(v: fx.Node) -> float:
            if v not in u:
                if v not in inside or self.kind[v] not in lazy:
                    raise _Unsupported(f"'{v.name}' is reached from outside")
                if pieces:
                    start = self.piece_start[v]
                    u[v] = self._piece_bound(start, v, bounder) * of(start)  # type: ignore[arg-type]
                else:
                    start = self.run_start[v]
                    u[v] = self._run_norm(start, v) * of(start)
            return u[v]

        for node in nodes:
            kind, inputs = self.kind[node], self.data_inputs[node]
            if node in u or kind in lazy:
                continue  # bounded when used: runs (pieces) merge into one
            if kind in ("activation", "pool", "lipschitz"):
                u[node] = self.factor[node] * of(inputs[0])
            elif kind == "alias":
                u[node] = of(inputs[0])
            elif kind == "join":
                a, b = inputs
                u[node] = of(a) + abs(self.alpha[node]) * of(b)
            elif kind == "cat":  # every occurrence: cat([x, x]) is √2-Lipschitz
                u[node] = math.sqrt(sum(of(v) ** 2 for v in self._occurrences(node)))
        return [of(v) for v in wanted]

    def run(self) -> GraphBound:
        order: list[fx.Node] = []
        try:
            for node in self.module.graph.nodes:
                if node.op != "call_function" or not any(a in self.data for a in node.all_input_nodes) or not is_tensor_valued(node):
                    continue
                kind = self._classify(node)
                self.data.add(node)
                self.kind[node] = kind
                order.append(node)
                inputs = self.data_inputs[node]
                op = op_name(node) if node.target is not operator.getitem else "getitem"
                if kind in ("affine", "activation"):
                    (source,) = inputs
                    extend = self.kind.get(source) in ("affine", "activation") and live_users(source) == [node]
                    self.piece_start[node] = self.piece_start[source] if extend else source
                if kind == "affine":
                    (source,) = inputs
                    extend = self.kind.get(source) == "affine" and live_users(source) == [node]
                    self.run_start[node] = self.run_start[source] if extend else source
                elif kind == "activation":
                    self.slopes[node] = node_slope(node, op)
                    self.factor[node] = self.slopes[node].lipschitz
                elif kind == "lipschitz":
                    self.factor[node] = _LIPSCHITZ_OPS[op]
                elif kind == "pool":
                    factor, count = max_pool_factor(argument(node, "kernel_size"), argument(node, "stride"),
                                                    argument(node, "dilation"), _MAX_POOLS[op])
                    self.factor[node] = factor
                    self.pools.append(f"'{node.name}' √{count} = {factor:.6g}")
                elif kind == "join":
                    alpha = node.kwargs.get("alpha", 1)
                    if len(self._occurrences(node)) != 2 or not isinstance(alpha, (int, float)):
                        raise _Unsupported(f"'{node.name}' ({op}): a join of this form is not supported")
                    self.alpha[node] = float(alpha)
            outputs = [a for a in self._output_args() if a in self.data]
            if len(outputs) != 1:
                raise _Unsupported("the model has no single tensor output that depends on its input")
            (output,) = outputs
            self.order, self.output = order, output
            (value,) = self._bounds(order, {self.input: 1.0}, [output])
            joins = [self._join(node, order) for node in order if self.kind[node] in ("join", "cat")]
            pieces: list[tuple[tuple[str, str], list[np.ndarray], list[Slope]]] = []
            self.combine(lambda key, weights, slopes: pieces.append((key, weights, slopes)))
            eclipse_pieces = [key for key, _, slopes in pieces if all(a.alpha >= 0 for a in slopes)]
            eclipse = self.combine(lambda key, weights, slopes: eclipse_fast(weights, slopes) if key in eclipse_pieces else None)
        except _Unsupported as why:
            return GraphBound(None, str(why), forward_fn=self._forward)
        return GraphBound(value, "", self.exact, joins, self.pools, self._forward,
                          eclipse if self.exact else None, len(eclipse_pieces), pieces, self.combine, functools.cache(self._lifted))

    def _lifted(self) -> LiftedGraph | None:
        """The graph as v = R z, y = F z over z = (x, every activation's output), read off by running
        it on basis vectors with each activation's output replaced by free coordinates; None when
        the graph holds anything but affine maps, joins and activations, or is too large."""
        activations = [v for v in self.order if self.kind[v] == "activation"]
        if not activations or any(self.kind[v] not in ("affine", "activation", "join", "cat") for v in self.order):
            return None
        sizes = [math.prod(self.shapes[v]) for v in activations]
        n0, hidden = math.prod(self.input_shape), sum(sizes)
        if hidden > MAX_LIFTED_NEURONS or n0 + hidden > MAX_LIFTED_COORDINATES:
            return None
        if self.check is not None:
            self.check()
        offsets = np.cumsum([n0, *sizes])
        z = torch.cat([torch.zeros(1, n0 + hidden), torch.eye(n0 + hidden)]).to(torch.float64)
        free = {v: z[:, a:b].reshape(-1, *self.shapes[v]) for v, a, b in zip(activations, offsets[:-1], offsets[1:])}
        with torch.no_grad():
            pre, output = _Lifted(self.module, free, self.output).run(z[:, :n0].reshape(-1, *self.input_shape))
        values = torch.cat([*(pre[v].reshape(len(z), -1) for v in activations), output.reshape(len(z), -1)], 1)
        linear = (values[1:] - values[:1]).T.numpy()  # (neurons + outputs, n0 + neurons)
        slopes = [self.slopes[v] for v in activations]
        per_neuron = np.repeat(np.arange(len(activations)), sizes)
        return LiftedGraph(linear[:hidden].copy(), linear[hidden:].copy(), n0,
                           np.array([slopes[k].alpha for k in per_neuron]), np.array([slopes[k].beta for k in per_neuron]),
                           per_neuron)

    def _output_args(self) -> list[fx.Node]:
        out = next(n for n in self.module.graph.nodes if n.op == "output")
        found: list[fx.Node] = []
        fx.node.map_arg(out.args, found.append)
        return found

    def _join(self, node: fx.Node, order: list[fx.Node]) -> Join:
        """The join's paths relative to the nearest common ancestor, when every path starts there."""
        inputs = self.data_inputs[node]
        ancestors = [self._ancestors(v) for v in inputs]
        common = set.intersection(*ancestors)
        position = {v: i for i, v in enumerate([self.input, *order])}
        for start in sorted(common, key=position.get, reverse=True)[:1]:
            region = [v for v in order if position[v] > position[start] and v in set.union(*ancestors)]
            try:
                terms = self._bounds(region, {start: 1.0}, inputs)
            except _Unsupported:
                break
            if self.kind[node] == "join":
                terms[1] *= abs(self.alpha[node])
                lengths = [len(a) for a in ancestors]
                terms = [terms[0], terms[1]] if lengths[0] <= lengths[1] else [terms[1], terms[0]]
            return Join(node.name, op_name(node), start.name, terms)
        terms = self._bounds(order, {self.input: 1.0}, inputs)
        if self.kind[node] == "join":
            terms[1] *= abs(self.alpha[node])
        return Join(node.name, op_name(node), None, terms)

    def _ancestors(self, node: fx.Node) -> set[fx.Node]:
        seen, stack = set(), [node]
        while stack:
            v = stack.pop()
            if v in seen:
                continue
            seen.add(v)
            stack.extend(self.data_inputs.get(v, []))
        return seen

    def _forward(self, x: torch.Tensor, smooth: float | None = None) -> torch.Tensor:
        return _SmoothRun(self.module, self.slopes, smooth).run(x)


class _Lifted(fx.Interpreter):
    """The graph with every activation's output replaced by a given tensor; records the
    activations' inputs (pre-activations) and the output."""

    def __init__(self, module: fx.GraphModule, free: dict[fx.Node, torch.Tensor], output: fx.Node) -> None:
        super().__init__(module)
        self.free, self.output_node = free, output  # not ``output``: the Interpreter's method
        self.pre: dict[fx.Node, torch.Tensor] = {}
        self.result: torch.Tensor | None = None

    def run_node(self, node: fx.Node):
        if node.op == "call_module" and node.target == "_guards_fn":
            return None
        if node in self.free:
            self.pre[node] = self.fetch_args_kwargs_from_env(node)[0][0]
            value = self.free[node]
        else:
            value = super().run_node(node)
        if node is self.output_node:
            self.result = value
        return value

    def run(self, x: torch.Tensor):  # type: ignore[override]
        super().run(x)
        assert self.result is not None
        return self.pre, self.result


class _SmoothRun(fx.Interpreter):
    """The graph with its ReLU-like activations replaced by softplus of sharpness ``smooth``."""

    def __init__(self, module: fx.GraphModule, slopes: dict[fx.Node, Slope], smooth: float | None) -> None:
        super().__init__(module)
        self.slopes, self.smooth = slopes, smooth

    def run_node(self, node: fx.Node):
        if node.op == "call_module" and node.target == "_guards_fn":
            return None
        slope = self.slopes.get(node)
        if slope is not None and self.smooth:
            args, kwargs = self.fetch_args_kwargs_from_env(node)
            return _smooth_activation(slope, args[0], self.smooth, lambda: node.target(*args, **kwargs))
        return super().run_node(node)

    def run(self, x: torch.Tensor):  # type: ignore[override]
        out = super().run(x)
        return out[0] if isinstance(out, (tuple, list)) else out
