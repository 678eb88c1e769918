"""What every curvature operator of the mean loss shares, and the protocol the solvers accept.

``MeanLossOperator`` selects the parameters (the others held constant), checks them and the
batch, cuts the batch into micro-batches whose losses, weighted by their share of the batch, add
up to the mean loss, and gives the loss and its gradient. The Hessian, GGN/Fisher and per-sample
operators subclass it and add their products; ``products`` counts them. ``CurvatureOperator`` is
what the solvers, the estimators and the data-parallel wrapper need of any of them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Protocol

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from ...errors import InvalidInput

LossFn = Callable[[Tensor, Tensor], Tensor]
# A batch's model inputs: one tensor, or one per positional input of the model (token ids, masks,
# ...), all with the samples along their first dimension.
Inputs = Tensor | tuple[Tensor, ...]


def as_inputs(inputs: Inputs) -> tuple[Tensor, ...]:
    """The model inputs as a tuple (a single tensor becomes a one-tuple)."""
    return (inputs,) if isinstance(inputs, Tensor) else tuple(inputs)


def rows(inputs: tuple[Tensor, ...], start: int, stop: int) -> tuple[Tensor, ...]:
    """Samples start..stop of every input."""
    return tuple(x[start:stop] for x in inputs)


def batch_of_one(sample: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    """One sample (as vmap hands it over) as a batch of one."""
    return tuple(x[None] for x in sample)


def call_module(module: nn.Module, values: dict[str, Tensor], inputs: tuple[Tensor, ...]) -> Tensor:
    """module(*inputs) with its parameters and buffers set to ``values``.

    Scaled-dot-product attention runs its math kernel: the fused CPU/GPU kernels have neither
    forward-mode derivatives nor second derivatives, which every curvature product needs; the math
    kernel computes the same attention with ordinary operators (benchmarks: same values to 1e-12
    in float64).
    """
    with sdpa_kernel([SDPBackend.MATH]):
        return functional_call(module, values, inputs)


class CurvatureOperator(Protocol):
    """A symmetric dim x dim curvature matrix of the mean loss over ``num_samples`` samples."""

    dim: int
    dtype: torch.dtype
    device: torch.device
    num_samples: int
    products: int

    def matvec(self, v: Tensor) -> Tensor: ...
    def matmat(self, V: Tensor) -> Tensor: ...
    def loss(self) -> float: ...
    def gradient(self) -> Tensor: ...


class MeanLossOperator:
    """The mean loss over a batch as a function of the selected parameters, micro-batched.

    ``check`` is called before every micro-batch; it stops the work by raising (cancellation,
    deadline). Subclasses count their products in ``products``.
    """

    method = ""
    # Fewest samples the operator is defined on.
    min_samples = 1

    def __init__(
        self,
        module: nn.Module,
        inputs: Inputs,
        targets: Tensor,
        loss_fn: LossFn,
        *,
        param_names: Sequence[str] | None = None,
        micro_batch_size: int = 256,
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
        inputs = as_inputs(inputs)
        n = inputs[0].shape[0] if inputs and inputs[0].dim() else 0
        if (n < self.min_samples or targets.dim() == 0 or targets.shape[0] != n
                or any(x.dim() == 0 or x.shape[0] != n for x in inputs)):
            plural = "s" if self.min_samples > 1 else ""
            shapes = ", ".join(str(tuple(x.shape)) for x in inputs)
            raise InvalidInput(
                f"inputs and targets need the same batch size of at least {self.min_samples} sample{plural}, "
                f"got {shapes} and {tuple(targets.shape)}"
            )
        if micro_batch_size < 1:
            raise InvalidInput(f"micro_batch_size must be positive, got {micro_batch_size}")

        self.dtype = selected[0].dtype
        self.device = selected[0].device
        self.num_samples = n
        self.param_names = names
        self.products = 0
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
        self._inputs = tuple(_to(x, self.device, self.dtype) for x in inputs)
        self._targets = _to(targets, self.device, self.dtype)
        self._micro_batch_size = micro_batch_size
        # (inputs, targets, weight): the micro-batch's loss (a mean over its samples) times its
        # share of the batch.
        self._batches = [
            (rows(self._inputs, start, start + micro_batch_size), self._targets[start:start + micro_batch_size],
             min(micro_batch_size, n - start) / n)
            for start in range(0, n, micro_batch_size)
        ]
        self._loss_and_gradient: tuple[float, Tensor] | None = None

    def loss(self) -> float:
        """The mean loss over the batch."""
        return self._loss_gradient()[0]

    def gradient(self) -> Tensor:
        """The flat gradient of the mean loss with respect to the selected parameters."""
        return self._loss_gradient()[1].clone()

    # -- for subclasses ----------------------------------------------------------------

    def _forward(self, params: Sequence[Tensor], x: tuple[Tensor, ...]) -> Tensor:
        """The model's outputs on the inputs x with the selected parameters set to ``params``."""
        values = dict(self._constants)
        values.update(zip(self.param_names, params))
        return call_module(self._module, values, x)

    def _loss(self, params: Sequence[Tensor], x: tuple[Tensor, ...], t: Tensor, weight: float) -> Tensor:
        return self._loss_fn(self._forward(params, x), t) * weight

    def _loss_gradient(self) -> tuple[float, Tensor]:
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

    def _chunks(self, size: int) -> Iterator[tuple[tuple[Tensor, ...], Tensor]]:
        """The batch in chunks of ``size`` samples (inputs, targets), checking before each."""
        for start in range(0, self.num_samples, size):
            self._step()
            yield rows(self._inputs, start, start + size), self._targets[start:start + size]

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
        """The columns of V (dim, k) as k stacked vectors per parameter, (k, *shape)."""
        k = V.shape[1]
        return tuple(part.T.reshape(k, *shape) for part, shape in zip(V.split(self._sizes), self._shapes))

    @staticmethod
    def _flat(parts: Sequence[Tensor]) -> Tensor:
        return torch.cat([p.reshape(-1) for p in parts])

    @staticmethod
    def _flat_rows(parts: Sequence[Tensor]) -> Tensor:
        """Stacked per-parameter parts (k, *shape) as one (k, dim) block."""
        return torch.cat([p.reshape(p.shape[0], -1) for p in parts], dim=1)

    @classmethod
    def _add_rows(cls, rows: Tensor | None, parts: Sequence[Tensor]) -> Tensor:
        """``rows`` (k, dim) plus the flattened ``parts``; the first micro-batch's block itself
        when ``rows`` is None. ``matmat`` returns ``rows.T``: a (dim, k) block stored column by
        column, whose vectors are contiguous, so the estimators' products with their bases are
        fast matrix products (a row-major (dim, k) block made them 4-14x slower) and no
        transposed copy is made."""
        if rows is None:
            return cls._flat_rows(parts)
        return rows.add_(cls._flat_rows(parts))


def _to(tensor: Tensor, device: torch.device, dtype: torch.dtype) -> Tensor:
    # Floating data follows the parameters' dtype; class labels stay integers.
    return tensor.to(device, dtype) if tensor.is_floating_point() else tensor.to(device)
