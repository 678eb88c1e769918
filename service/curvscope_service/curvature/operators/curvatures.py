"""The curvature matrices a request can ask for: name -> the operator over a batch.

The analyses that take a ``curvature`` option list ``CURVATURES``' names, and GetCapabilities
advertises what they list. Add a curvature matrix by writing its operator (a ``MeanLossOperator``
subclass) and an entry here (and the API's ``Curvature`` enum).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import Tensor, nn

from .fisher import EmpiricalFisherOperator, FisherOperator
from .ggn import GGNOperator
from .hessian import HessianOperator
from .base import CurvatureOperator, Inputs, LossFn


@dataclass(frozen=True)
class OperatorRequest:
    """What a curvature operator is built from: the model, the batch and the request's options."""

    module: nn.Module
    inputs: Inputs
    targets: Tensor
    loss_fn: LossFn
    loss: str
    seed: int
    param_names: Sequence[str] | None
    micro_batch_size: int
    retain_max_samples: int
    check: Callable[[], None] | None


def _build(operator: type, r: OperatorRequest, **options: object) -> CurvatureOperator:
    return operator(r.module, r.inputs, r.targets, r.loss_fn, param_names=r.param_names,
                    micro_batch_size=r.micro_batch_size, check=r.check, **options)


CURVATURES: dict[str, Callable[[OperatorRequest], CurvatureOperator]] = {
    "hessian": lambda r: _build(HessianOperator, r, retain_max_samples=r.retain_max_samples),
    "ggn": lambda r: _build(GGNOperator, r),
    "fisher": lambda r: _build(FisherOperator, r, loss=r.loss, seed=r.seed),
    "empirical_fisher": lambda r: _build(EmpiricalFisherOperator, r),
}
