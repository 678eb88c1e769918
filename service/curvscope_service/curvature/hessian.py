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
from torch.func import functional_call, grad, jvp, vmap

from ..errors import InvalidInput

LossFn = Callable[[Tensor, Tensor], Tensor]

METHODS = ("auto", "retained", "double_backward", "jvp_grad")


class HessianOperator:
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

    ``check`` is called before every product and between micro-batches; it stops the work by
    raising (cancellation, deadline).
    """

    def __init__(
        self,
        module: nn.Module,
        inputs: Tensor,
        targets: Tensor,
        loss_fn: LossFn,
        *,
        param_names: Sequence[str] | None = None,
        micro_batch_size: int = 256,
        method: str = "auto",
        retain_max_samples: int = 4096,
        check: Callable[[], None] | None = None,
    ) -> None:
        named = dict(module.named_parameters())
        names = list(named) if param_names is None else list(param_names)
        unknown = [name for name in names if name not in named]
        if unknown:
            raise InvalidInput(f"unknown parameter names {unknown}; the model has {list(named)}")
        if not names or len(set(names)) != len(names):
            raise InvalidInput("select at least one parameter, each at most once")
        selected = [named[name] for name in names]
        if len({(p.dtype, p.device) for p in selected}) != 1:
            raise InvalidInput("the selected parameters must share one dtype and one device")
        if not selected[0].is_floating_point():
            raise InvalidInput(f"parameters of dtype {selected[0].dtype} cannot be differentiated")

        n = inputs.shape[0] if inputs.dim() else 0
        if n == 0 or targets.dim() == 0 or targets.shape[0] != n:
            raise InvalidInput(
                f"inputs and targets need the same non-zero batch size, got {tuple(inputs.shape)} "
                f"and {tuple(targets.shape)}"
            )
        if micro_batch_size < 1:
            raise InvalidInput(f"micro_batch_size must be positive, got {micro_batch_size}")
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
        self.dtype = selected[0].dtype
        self.device = selected[0].device
        self.num_samples = n
        self.param_names = names
        self.hvps = 0
        self._module = module
        self._loss_fn = loss_fn
        self._check = check
        self._shapes = [p.shape for p in selected]
        self._sizes = [p.numel() for p in selected]
        self.dim = sum(self._sizes)
        # Plain tensors for torch.func, leaves that require grad for torch.autograd; both share
        # the module's storage. The other parameters enter as constants (detached).
        self._values = tuple(p.detach() for p in selected)
        self._leaves = tuple(p.detach().requires_grad_(True) for p in selected)
        chosen = set(names)
        self._constants = {k: p.detach() for k, p in named.items() if k not in chosen}

        inputs = _to(inputs, self.device, self.dtype)
        targets = _to(targets, self.device, self.dtype)
        self._batches = [
            (x, t, x.shape[0] / n)
            for x, t in zip(inputs.split(micro_batch_size), targets.split(micro_batch_size))
        ]
        self._graphs: list[tuple[Tensor, ...]] | None = None
        self._loss_and_gradient: tuple[float, Tensor] | None = None

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
        self.hvps += 1
        return out

    def matmat(self, V: Tensor) -> Tensor:
        """H V for V of shape (dim, k): one pass over the data, the k products batched (vmap)."""
        self._validate(V, 2)
        self._step()
        k = V.shape[1]
        vs = self._split_batched(V)
        out = torch.zeros(self.dim, k, dtype=self.dtype, device=self.device)
        if self.method == "retained":
            for g in self._retained_graphs():
                out += self._flat_batched(self._backward(g, vs, retain=True, batched=True))
                self._step()
        elif self.method == "double_backward":
            for x, t, w in self._batches:
                g = self._gradient_graph(x, t, w)[1]
                out += self._flat_batched(self._backward(g, vs, retain=False, batched=True))
                self._step()
        else:
            products = vmap(self._jvp_grad, in_dims=(None, None, None, 0))
            for x, t, w in self._batches:
                out += self._flat_batched(products(x, t, w, vs))
                self._step()
        self.hvps += k
        return out

    def loss(self) -> float:
        """The mean loss over the batch."""
        return self._loss_gradient()[0]

    def gradient(self) -> Tensor:
        """The flat gradient of the mean loss with respect to the selected parameters."""
        return self._loss_gradient()[1].clone()

    # -- internals ---------------------------------------------------------------------

    def _loss(self, params: Sequence[Tensor], x: Tensor, t: Tensor, weight: float) -> Tensor:
        values = dict(self._constants)
        values.update(zip(self.param_names, params))
        return self._loss_fn(functional_call(self._module, values, (x,)), t) * weight

    def _gradient_graph(self, x: Tensor, t: Tensor, weight: float) -> tuple[Tensor, tuple[Tensor, ...]]:
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
        with torch.enable_grad():
            return torch.autograd.grad(
                [gi for gi, _ in pairs],
                self._leaves,
                [vi for _, vi in pairs],
                retain_graph=retain,
                allow_unused=True,
                materialize_grads=True,
                is_grads_batched=batched,
            )

    def _jvp_grad(self, x: Tensor, t: Tensor, weight: float, vs: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        gradient = grad(lambda params: self._loss(params, x, t, weight))
        return jvp(gradient, (self._values,), (vs,))[1]

    def _loss_gradient(self) -> tuple[float, Tensor]:
        if self.method == "retained":
            self._retained_graphs()
        if self._loss_and_gradient is None:
            loss = torch.zeros((), dtype=self.dtype, device=self.device)
            gradient = torch.zeros(self.dim, dtype=self.dtype, device=self.device)
            for x, t, w in self._batches:
                self._step()
                with torch.enable_grad():
                    value = self._loss(self._leaves, x, t, w)
                    parts = torch.autograd.grad(value, self._leaves, allow_unused=True, materialize_grads=True)
                loss += value.detach()
                gradient += self._flat(parts)
            self._loss_and_gradient = (loss.item(), gradient)
        return self._loss_and_gradient

    def _step(self) -> None:
        if self._check is not None:
            self._check()

    def _validate(self, v: Tensor, ndim: int) -> None:
        if v.dim() != ndim or v.shape[0] != self.dim:
            raise ValueError(f"expected {'(dim,)' if ndim == 1 else '(dim, k)'} with dim={self.dim}, got {tuple(v.shape)}")
        if v.dtype != self.dtype or v.device != self.device:
            raise ValueError(f"expected {self.dtype} on {self.device}, got {v.dtype} on {v.device}")

    def _split(self, v: Tensor) -> tuple[Tensor, ...]:
        return tuple(part.reshape(shape) for part, shape in zip(v.split(self._sizes), self._shapes))

    def _split_batched(self, V: Tensor) -> tuple[Tensor, ...]:
        k = V.shape[1]
        return tuple(
            part.T.reshape(k, *shape) for part, shape in zip(V.split(self._sizes), self._shapes)
        )

    @staticmethod
    def _flat(parts: Sequence[Tensor]) -> Tensor:
        return torch.cat([p.reshape(-1) for p in parts])

    @staticmethod
    def _flat_batched(parts: Sequence[Tensor]) -> Tensor:
        return torch.cat([p.reshape(p.shape[0], -1) for p in parts], dim=1).T


def _to(tensor: Tensor, device: torch.device, dtype: torch.dtype) -> Tensor:
    # Floating data follows the parameters' dtype; class labels stay integers.
    return tensor.to(device, dtype) if tensor.is_floating_point() else tensor.to(device)
