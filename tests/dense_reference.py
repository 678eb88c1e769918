"""The dense Hessian of the mean loss by ``torch.func.hessian``: the independent reference that
every matrix-free result is checked against, for models of at most a few thousand parameters.

Not for models with LayerNorm: on torch 2.13 torch.func's vmap'd second derivatives through
layer_norm are off by a few percent (measured against finite differences of the gradient);
use torch.autograd.functional.hessian there (tests/service/curvature/test_hessian_operator.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn


def dense_hessian(
    module: nn.Module, inputs: Tensor | tuple[Tensor, ...], targets: Tensor, loss_fn: Callable[[Tensor, Tensor], Tensor],
    param_names: Sequence[str] | None = None,
) -> Tensor:
    """d^2 loss / d theta^2 over the flat (selected) parameters, in named_parameters() order;
    ``inputs``: one tensor or the model's positional inputs."""
    params = dict(module.named_parameters())
    names = list(params) if param_names is None else list(param_names)
    shapes = [params[k].shape for k in names]
    sizes = [params[k].numel() for k in names]
    flat = torch.cat([params[k].detach().reshape(-1) for k in names])

    def loss(theta: Tensor) -> Tensor:
        values = {k: p.detach() for k, p in params.items()}
        values.update({k: t.reshape(s) for k, t, s in zip(names, theta.split(sizes), shapes)})
        args = inputs if isinstance(inputs, tuple) else (inputs,)
        return loss_fn(torch.func.functional_call(module, values, args), targets)

    return torch.func.hessian(loss)(flat)
