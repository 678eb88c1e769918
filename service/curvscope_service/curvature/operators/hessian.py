"""Matrix-free products with the Hessian of the mean loss over a data batch.

H = d^2/dtheta^2 (1/n) sum_i loss_i, taken with respect to a chosen subset of the parameters
(the others held constant), the model in whatever mode the caller left it (eval: BatchNorm
uses its running statistics). The batch is cut into micro-batches whose losses, weighted by
their share of the batch, add up to the mean loss, so memory is bounded by one micro-batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.func import grad, jvp, vmap

from ...errors import InvalidInput
from .base import Inputs, LossFn, MeanLossOperator

METHODS = ("auto", "retained", "double_backward", "jvp_grad")


class HessianOperator(MeanLossOperator):
    """Exact Hessian-vector products of the mean loss, micro-batched over the data.

    Methods (all exact, they differ in speed and memory):

    - ``retained``: the gradient graph of every micro-batch is built once (create_graph) and
      kept; a product is one backward pass through each kept graph. Fastest (1.1-1.5
      gradients per product on CPU, benchmarks/README.md); memory grows with the batch, hence
      only up to ``retain_max_samples`` samples.
    - ``double_backward``: forward, gradient graph and backward again for every product and
      micro-batch; memory bounded by one micro-batch.
    - ``jvp_grad``: forward-mode over reverse-mode with ``torch.func``; ``matmat`` vmaps it.
    - ``auto``: ``retained`` when the batch has at most ``retain_max_samples`` samples, else
      ``double_backward`` (measured fastest in that order, see benchmarks/bench_hvp.py).

    ``check`` is also called before every product.
    """

    def __init__(
        self,
        module: nn.Module,
        inputs: Inputs,
        targets: Tensor,
        loss_fn: LossFn,
        *,
        param_names: Sequence[str] | None = None,
        micro_batch_size: int = 256,
        method: str = "auto",
        retain_max_samples: int = 4096,
        check: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(module, inputs, targets, loss_fn, param_names=param_names,
                         micro_batch_size=micro_batch_size, check=check)
        n = self.num_samples
        if method not in METHODS:
            raise InvalidInput(f"unknown Hessian product method {method!r}; choose one of {METHODS}")
        if method == "auto":
            method = "retained" if n <= retain_max_samples else "double_backward"
        elif method == "retained" and n > retain_max_samples:
            raise InvalidInput(
                f"method 'retained' keeps the graphs of all {n} samples, over the limit of "
                f"{retain_max_samples}; use 'double_backward'"
            )
        self.method = method
        self._graphs: list[tuple[Tensor, ...]] | None = None

    # -- public products ---------------------------------------------------------------

    def matvec(self, v: Tensor) -> Tensor:
        """H v for a flat v of length ``dim``, same dtype and device as the parameters."""
        self._validate(v, 1)
        self._step()
        vs = self._split(v)
        out = torch.zeros(self.dim, dtype=self.dtype, device=self.device)
        if self.method == "retained":
            for g in self._retained_graphs():
                out += self._flat(self._backward(g, vs, retain=True))
                self._step()
        elif self.method == "double_backward":
            for x, t, w in self._batches:
                out += self._flat(self._backward(self._gradient_graph(x, t, w)[1], vs, retain=False))
                self._step()
        else:
            for x, t, w in self._batches:
                out += self._flat(self._jvp_grad(x, t, w, vs))
                self._step()
        self.products += 1
        return out

    def matmat(self, V: Tensor) -> Tensor:
        """H V for V of shape (dim, k): one pass over the data, the k products batched (vmap)."""
        self._validate(V, 2)
        self._step()
        k = V.shape[1]
        vs = self._split_batched(V)
        rows: Tensor | None = None
        if self.method == "retained":
            for g in self._retained_graphs():
                rows = self._add_rows(rows, self._backward(g, vs, retain=True, batched=True))
                self._step()
        elif self.method == "double_backward":
            for x, t, w in self._batches:
                g = self._gradient_graph(x, t, w)[1]
                rows = self._add_rows(rows, self._backward(g, vs, retain=False, batched=True))
                self._step()
        else:
            products = vmap(self._jvp_grad, in_dims=(None, None, None, 0))
            for x, t, w in self._batches:
                rows = self._add_rows(rows, products(x, t, w, vs))
                self._step()
        self.products += k
        return rows.T if rows is not None else torch.zeros(self.dim, k, dtype=self.dtype, device=self.device)

    @property
    def parameter_sizes(self) -> list[int]:
        """The number of entries of each selected parameter, in ``param_names`` order."""
        return list(self._sizes)

    def diagonal_block_products(self, blocks: Sequence[Sequence[str]], vectors: Sequence[Tensor]) -> list[Tensor]:
        """H_bb v_b for each block b (a list of this operator's parameter names) and flat v_b
        over that block's parameters in their order here: the products of the Hessians of the
        blocks alone, as operators over those blocks would give, from one pass over the data
        (one graph per micro-batch serves every block; ``retained`` keeps them)."""
        indices = {name: i for i, name in enumerate(self.param_names)}
        chosen = [[indices[name] for name in block] for block in blocks]
        parts = []
        for block, v in zip(chosen, vectors):
            sizes = [self._sizes[i] for i in block]
            if v.shape != (sum(sizes),) or v.dtype != self.dtype or v.device != self.device:
                raise ValueError(f"expected ({sum(sizes)},) {self.dtype} on {self.device}, got {tuple(v.shape)} {v.dtype}")
            parts.append(tuple(p.reshape(self._shapes[i]) for p, i in zip(v.split(sizes), block)))
        self._step()
        outs = [torch.zeros_like(v) for v in vectors]
        graphs = self._retained_graphs() if self.method == "retained" else (
            self._gradient_graph(x, t, w)[1] for x, t, w in self._batches)
        for g in graphs:
            for out, block, vs in zip(outs, chosen, parts):
                out += self._flat(self._block_backward(g, block, vs))
            self._step()
        self.products += len(blocks)
        return outs

    # -- internals ---------------------------------------------------------------------

    def _gradient_graph(self, x: tuple[Tensor, ...], t: Tensor, weight: float) -> tuple[Tensor, tuple[Tensor, ...]]:
        """The weighted micro-batch loss and its gradient, with the graph to differentiate it."""
        with torch.enable_grad():
            loss = self._loss(self._leaves, x, t, weight)
            return loss, torch.autograd.grad(
                loss, self._leaves, create_graph=True, allow_unused=True, materialize_grads=True
            )

    def _retained_graphs(self) -> list[tuple[Tensor, ...]]:
        if self._graphs is None:
            # The graphs come with the loss and the gradient: keep those too, so that asking
            # for the loss first (as a report does) prepares the products for free.
            graphs = []
            loss = torch.zeros((), dtype=self.dtype, device=self.device)
            gradient = torch.zeros(self.dim, dtype=self.dtype, device=self.device)
            for x, t, w in self._batches:
                self._step()
                value, g = self._gradient_graph(x, t, w)
                graphs.append(g)
                loss += value.detach()
                gradient += self._flat([gi.detach() for gi in g])
            self._graphs = graphs
            self._loss_and_gradient = (loss.item(), gradient)
        return self._graphs

    def _backward(
        self, g: tuple[Tensor, ...], vs: tuple[Tensor, ...], *, retain: bool, batched: bool = False
    ) -> tuple[Tensor, ...]:
        """The vector-Jacobian product of the gradient with vs (k stacked vectors if batched)."""
        # Gradient entries that do not depend on the parameters (an unused or purely linear
        # parameter) have no graph; their Hessian rows are zero.
        pairs = [(gi, vi) for gi, vi in zip(g, vs) if gi.requires_grad]
        if not pairs:
            lead = (vs[0].shape[0],) if batched else ()
            return tuple(p.new_zeros(lead + p.shape) for p in self._values)
        outputs, cotangents = [gi for gi, _ in pairs], [vi for _, vi in pairs]
        with torch.enable_grad():
            parts = torch.autograd.grad(outputs, self._leaves, cotangents, retain_graph=retain or batched,
                                        allow_unused=True, materialize_grads=True, is_grads_batched=batched)
            if not batched:
                return parts
            k = vs[0].shape[0]
            if all(p.shape == (k, *leaf.shape) for p, leaf in zip(parts, self._leaves)):
                return parts  # a graph not retained is freed with the caller's last reference to it
            # torch 2.13's batched backward drops the batch dimension of some gradients (an
            # embedding whose weight is tied to the output layer, as in GPT-2): one product at a time.
            columns = [torch.autograd.grad(outputs, self._leaves, [c[j] for c in cotangents],
                                           retain_graph=retain or j < k - 1, allow_unused=True, materialize_grads=True)
                       for j in range(k)]
            return tuple(torch.stack(column) for column in zip(*columns))

    def _block_backward(self, g: tuple[Tensor, ...], block: list[int], vs: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        """d/d(block) of (g_block . vs): the block's diagonal Hessian block times vs."""
        pairs = [(g[i], v) for i, v in zip(block, vs) if g[i].requires_grad]
        leaves = [self._leaves[i] for i in block]
        if not pairs:
            return tuple(torch.zeros_like(leaf) for leaf in leaves)
        with torch.enable_grad():
            return torch.autograd.grad([gi for gi, _ in pairs], leaves, [v for _, v in pairs],
                                       retain_graph=True, allow_unused=True, materialize_grads=True)

    def _jvp_grad(self, x: tuple[Tensor, ...], t: Tensor, weight: float, vs: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        gradient = grad(lambda params: self._loss(params, x, t, weight))
        return jvp(gradient, (self._values,), (vs,))[1]

    def _loss_gradient(self) -> tuple[float, Tensor]:
        if self.method == "retained":
            self._retained_graphs()
        return super()._loss_gradient()
