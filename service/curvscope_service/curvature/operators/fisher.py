"""The Fisher and the empirical Fisher as matrix-free operators (J^T M J, see ``ggn.py``).

With per-sample losses l_i (the mean loss is (1/n) sum_i l_i) and r_i = dl_i/df_i their
gradients in the outputs, both are (1/n) sum_i g_i g_i^T, g_i = J_i^T r_i, so M is the rank-one
block (1/n) r_i r_i^T per sample and a product costs what a GGN product costs:

- ``FisherOperator``: r_i at labels sampled from the model's own predictive distribution (with
  the seed; ``mc_samples`` labels per input, averaged). Cross-entropy: a class drawn from
  softmax(f_i) (per counted token for sequence outputs). mse, l_i = ||f_i - y||^2 / D over D outputs: y ~ N(f_i, D/2 I), the Gaussian
  for which l_i is the negative log-likelihood up to a constant. In expectation over the labels
  this is the GGN (the loss is then a negative log-likelihood whose Hessian in f is its Fisher).
- ``EmpiricalFisherOperator``: r_i at the data's own labels. Kunstner, Hennig & Balles
  (NeurIPS 2019) show it is not a curvature estimate: at a minimum that fits the data r_i -> 0
  and it vanishes while the Hessian does not. Compare it with ``ggn`` in a report to see it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.func import grad, vmap

from ...errors import InvalidInput
from ...losses import TokenCrossEntropy
from .ggn import OutputCurvatureOperator
from .base import Inputs, LossFn


class _OuterProductOperator(OutputCurvatureOperator):
    """J^T M J with M = (1/n) sum_s r_is r_is^T / S over S output gradients per sample."""

    def _init_gradients(self, labels: Callable[[Tensor, Tensor], Tensor]) -> None:
        """``labels(outputs, targets)``: S stacked label sets for one micro-batch."""
        self._output_gradients: list[Tensor] = []  # per micro-batch: (S, m, *output shape)
        for index, (_, t, _) in enumerate(self._batches):
            self._step()
            outputs = self._outputs(index)
            m = outputs.shape[0]
            # loss_fn is a mean over the m samples: m times its gradient is each dl_i/df_i.
            per_sample = grad(lambda o, y: self._loss_fn(o, y) * m)
            self._output_gradients.append(vmap(per_sample, in_dims=(None, 0))(outputs, labels(outputs, t)))

    def _output_products(self, index: int, outputs: Tensor, U: Tensor) -> Tensor:
        r = self._output_gradients[index]  # (S, m, ...)
        # U is (k, m, ...): (r_is . u_i) r_is, averaged over s, divided by n.
        coefficients = torch.einsum("smc,kmc->ksm", r.flatten(2), U.flatten(2))
        products = torch.einsum("ksm,smc->kmc", coefficients, r.flatten(2))
        return products.reshape(U.shape) / (r.shape[0] * self.num_samples)


class FisherOperator(_OuterProductOperator):
    """The (Monte-Carlo) Fisher: labels sampled from the model, ``mc_samples`` per input."""

    def __init__(
        self, module: nn.Module, inputs: Inputs, targets: Tensor, loss_fn: LossFn, *, loss: str,
        seed: int = 0, mc_samples: int = 1, param_names: Sequence[str] | None = None,
        micro_batch_size: int = 256, check: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(module, inputs, targets, loss_fn, param_names=param_names,
                         micro_batch_size=micro_batch_size, check=check)
        if loss not in ("cross_entropy", "mse"):
            raise InvalidInput(f"the Fisher needs the loss' likelihood; known for cross_entropy and mse, not '{loss}'")
        if mc_samples < 1:
            raise InvalidInput(f"mc_samples must be positive, got {mc_samples}")
        generator = torch.Generator().manual_seed(seed)

        def sampled(outputs: Tensor, targets: Tensor) -> Tensor:
            if isinstance(loss_fn, TokenCrossEntropy):  # a class per token: one draw per counted position
                return loss_fn.sample_labels(outputs, targets, mc_samples, generator)
            if loss == "cross_entropy":
                probabilities = torch.softmax(outputs.to(torch.float64), dim=1).cpu()
                drawn = torch.multinomial(probabilities, mc_samples, replacement=True, generator=generator)
                return drawn.T.to(outputs.device)
            # l_i = ||f_i - y||^2 / D is the Gaussian negative log-likelihood of variance D / 2.
            spread = math.sqrt(outputs[0].numel() / 2)
            noise = torch.randn((mc_samples, *outputs.shape), generator=generator, dtype=torch.float64)
            return outputs + spread * noise.to(outputs.device, outputs.dtype)

        self._init_gradients(sampled)


class EmpiricalFisherOperator(_OuterProductOperator):
    """The empirical Fisher (1/n) sum_i g_i g_i^T at the data's labels."""

    def __init__(
        self, module: nn.Module, inputs: Inputs, targets: Tensor, loss_fn: LossFn, *,
        param_names: Sequence[str] | None = None, micro_batch_size: int = 256,
        check: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(module, inputs, targets, loss_fn, param_names=param_names,
                         micro_batch_size=micro_batch_size, check=check)
        self._init_gradients(lambda outputs, targets: targets[None])
