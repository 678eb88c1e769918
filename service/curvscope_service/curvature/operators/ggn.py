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

import torch
from torch import Tensor
from torch.func import grad, jvp, vjp, vmap

from .base import MeanLossOperator


class OutputCurvatureOperator(MeanLossOperator):
    """Products with J^T M J, M built from the outputs, summed over micro-batches.

    Subclasses give ``_output_products(index, outputs, U)``: M times the k stacked output
    tangents U (k, *outputs.shape) of micro-batch ``index``.
    """

    method = "jvp_vjp"

    def matvec(self, v: Tensor) -> Tensor:
        """(J^T M J) v for a flat v of length ``dim``."""
        if v.dim() != 1:
            raise ValueError(f"expected (dim,) with dim={self.dim}, got {tuple(v.shape)}")
        return self.matmat(v[:, None])[:, 0]

    def matmat(self, V: Tensor) -> Tensor:
        """(J^T M J) V for V of shape (dim, k): one pass over the data, the k products vmap'd."""
        self._validate(V, 2)
        k = V.shape[1]
        tangents = self._split_batched(V)
        rows: Tensor | None = None
        for index, (x, _, _) in enumerate(self._batches):
            self._step()

            def forward(params: tuple[Tensor, ...]) -> Tensor:
                return self._forward(params, x)

            outputs, pullback = vjp(forward, self._values)
            JV = vmap(lambda vs: jvp(forward, (self._values,), (vs,))[1])(tangents)
            U = self._output_products(index, outputs.detach(), JV)
            rows = self._add_rows(rows, vmap(pullback)(U)[0])
        self.products += k
        return rows.T if rows is not None else torch.zeros(self.dim, k, dtype=self.dtype, device=self.device)

    # -- for subclasses ----------------------------------------------------------------

    def _output_products(self, index: int, outputs: Tensor, U: Tensor) -> Tensor:
        raise NotImplementedError

    def _outputs(self, index: int) -> Tensor:
        with torch.no_grad():
            return self._forward(self._values, self._batches[index][0])


class GGNOperator(OutputCurvatureOperator):
    """G = J^T H_loss J with H_loss the loss' exact Hessian in the outputs."""

    def _output_products(self, index: int, outputs: Tensor, U: Tensor) -> Tensor:
        _, t, w = self._batches[index]
        loss_gradient = grad(lambda o: self._loss_fn(o, t) * w)
        return vmap(lambda u: jvp(loss_gradient, (outputs,), (u,))[1])(U)
