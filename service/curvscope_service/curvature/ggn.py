"""The generalised Gauss-Newton matrix G = J^T H_loss J as a matrix-free operator.

For the mean loss L(theta) = loss(f(theta; X), T) with network outputs f, J = df/dtheta and
H_loss = d^2 L / df^2 (block diagonal over the samples, positive semi-definite for
cross-entropy and mse), G drops the second-order term of the network from the Hessian: it is
PSD and equals the Hessian for a network linear in its parameters (Schraudolph 2002; Martens
2020). A product G v is a forward-mode pass (J v), a product with H_loss in the small output
space, and a reverse-mode pass (J^T u), micro-batched over the data; ``matmat`` vmaps all three.

``OutputCurvatureOperator`` is that J^T M J machinery for any per-sample output curvature M; the
Fisher and empirical Fisher (``fisher.py``) are the same products with other M.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp, vjp, vmap

from ..errors import InvalidInput
from .hessian import LossFn


class OutputCurvatureOperator:
    """Products with J^T M J, M built from the outputs, summed over micro-batches.

    Same interface as ``HessianOperator``: ``matvec``, ``matmat``, ``loss()``, ``gradient()``,
    ``dim``, ``dtype``, ``device``, ``hvps`` (products so far), ``num_samples``, ``param_names``.
    Subclasses give ``_output_products(index, outputs, U)``: M times the k stacked output
    tangents U (k, *outputs.shape) of micro-batch ``index``.
    """

    method = "jvp_vjp"

    def __init__(
        self,
        module: nn.Module,
        inputs: Tensor,
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
        n = inputs.shape[0] if inputs.dim() else 0
        if n == 0 or targets.dim() == 0 or targets.shape[0] != n:
            raise InvalidInput(
                f"inputs and targets need the same non-zero batch size, got {tuple(inputs.shape)} "
                f"and {tuple(targets.shape)}")
        if micro_batch_size < 1:
            raise InvalidInput(f"micro_batch_size must be positive, got {micro_batch_size}")

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
        self._values = tuple(p.detach() for p in selected)
        chosen = set(names)
        self._constants = {k: p.detach() for k, p in named.items() if k not in chosen}
        inputs = inputs.to(self.device, self.dtype) if inputs.is_floating_point() else inputs.to(self.device)
        targets = targets.to(self.device, self.dtype) if targets.is_floating_point() else targets.to(self.device)
        # (inputs, targets, weight): the micro-batch's mean loss times its share of the batch.
        self._batches = [(x, t, x.shape[0] / n) for x, t in
                         zip(inputs.split(micro_batch_size), targets.split(micro_batch_size))]
        self._loss_and_gradient: tuple[float, Tensor] | None = None

    # -- public products ---------------------------------------------------------------

    def matvec(self, v: Tensor) -> Tensor:
        """(J^T M J) v for a flat v of length ``dim``."""
        if v.dim() != 1:
            raise ValueError(f"expected (dim,) with dim={self.dim}, got {tuple(v.shape)}")
        return self.matmat(v[:, None])[:, 0]

    def matmat(self, V: Tensor) -> Tensor:
        """(J^T M J) V for V of shape (dim, k): one pass over the data, the k products vmap'd."""
        if V.dim() != 2 or V.shape[0] != self.dim:
            raise ValueError(f"expected (dim, k) with dim={self.dim}, got {tuple(V.shape)}")
        if V.dtype != self.dtype or V.device != self.device:
            raise ValueError(f"expected {self.dtype} on {self.device}, got {V.dtype} on {V.device}")
        k = V.shape[1]
        tangents = tuple(part.T.reshape(k, *shape) for part, shape in zip(V.split(self._sizes), self._shapes))
        out = torch.zeros(self.dim, k, dtype=self.dtype, device=self.device)
        for index, (x, _, _) in enumerate(self._batches):
            self._step()
            forward = self._forward(x)
            outputs, pullback = vjp(forward, self._values)
            JV = vmap(lambda vs: jvp(forward, (self._values,), (vs,))[1])(tangents)
            U = self._output_products(index, outputs.detach(), JV)
            parts = vmap(pullback)(U)[0]
            out += torch.cat([p.reshape(k, -1) for p in parts], dim=1).T
        self.hvps += k
        return out

    def loss(self) -> float:
        """The mean loss over the batch."""
        return self._loss_gradient()[0]

    def gradient(self) -> Tensor:
        """The flat gradient of the mean loss with respect to the selected parameters."""
        return self._loss_gradient()[1].clone()

    # -- for subclasses ----------------------------------------------------------------

    def _output_products(self, index: int, outputs: Tensor, U: Tensor) -> Tensor:
        raise NotImplementedError

    def _forward(self, x: Tensor) -> Callable[[tuple[Tensor, ...]], Tensor]:
        def forward(params: tuple[Tensor, ...]) -> Tensor:
            values = dict(self._constants)
            values.update(zip(self.param_names, params))
            return functional_call(self._module, values, (x,))
        return forward

    def _outputs(self, index: int) -> Tensor:
        with torch.no_grad():
            return self._forward(self._batches[index][0])(self._values)

    def _step(self) -> None:
        if self._check is not None:
            self._check()

    def _loss_gradient(self) -> tuple[float, Tensor]:
        if self._loss_and_gradient is None:
            loss = torch.zeros((), dtype=self.dtype, device=self.device)
            gradient = torch.zeros(self.dim, dtype=self.dtype, device=self.device)
            for x, t, w in self._batches:
                self._step()
                parts, value = torch.func.grad_and_value(
                    lambda params: self._loss_fn(self._forward(x)(params), t) * w)(self._values)
                loss += value.detach()
                gradient += torch.cat([p.reshape(-1) for p in parts])
            self._loss_and_gradient = (loss.item(), gradient)
        return self._loss_and_gradient


class GGNOperator(OutputCurvatureOperator):
    """G = J^T H_loss J with H_loss the loss' exact Hessian in the outputs."""

    def _output_products(self, index: int, outputs: Tensor, U: Tensor) -> Tensor:
        _, t, w = self._batches[index]
        loss_gradient = grad(lambda o: self._loss_fn(o, t) * w)
        return vmap(lambda u: jvp(loss_gradient, (outputs,), (u,))[1])(U)
