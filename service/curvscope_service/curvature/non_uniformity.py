"""Non-uniformity and the linear stability of SGD (Wu, Ma & E, NeurIPS 2018).

For the mean loss f = (1/n) sum_i f_i with per-sample Hessians H_i and H = (1/n) sum_i H_i,
Wu, Ma & E ("How SGD Selects the Global Minima in Over-parameterized Learning: A Dynamical
Stability Perspective") call a = lambda_max(H) the sharpness and s = lambda_max(Sigma)^(1/2)
the non-uniformity, with

    Sigma = (1/n) sum_i H_i^2 - H^2 = (1/n) sum_i (H_i - H)^2      (positive semi-definite).

Their Theorem 1: a global minimum x* is linearly stable for SGD with learning rate eta and
batch size B (mini-batches drawn without replacement), i.e. E||x_t - x*||^2 stays bounded for
the linearised dynamics, if

    lambda_max( (I - eta H)^2 + eta^2 (n - B) / (B (n - 1)) Sigma ) <= 1,

and for d = 1 the condition is also necessary. It implies the necessary conditions
0 <= a <= 2 / eta and s <= sqrt(B (n - 1) / (n - B)) / eta (the sharpness-non-uniformity
diagram). Both eigenvalues are computed here matrix-free by Lanczos to a residual tolerance
(the authors' code runs 10 power iterations, which stops short of the top eigenvalue).

Two ways to apply Sigma, both centred, Sigma v = (1/n) sum_i C_i (C_i v - C v), so that no
large H^2 term is subtracted from another:

- ``PerSampleHessians``: exact. C v = H v is one full-batch HVP; then for every sample, under
  vmap and micro-batched so that memory is bounded, the gradient graph of f_i is built once and
  differentiated twice (H_i v, then H_i (H_i v - H v)).
- ``PerSampleGaussNewton``: C_i = G_i = J_i^T L_i J_i (J_i the output Jacobian of sample i, L_i
  the loss' Hessian in the outputs). The C x C blocks K_i = J_i J_i^T are computed once; then
  G_i^2 v = J_i^T L_i K_i L_i J_i v, so a Sigma product is two forward-mode passes and two
  backward passes over the batch. G_i = H_i where the residuals vanish (mse at an
  interpolating minimum: Wu, Ma & E's setting); elsewhere it is the Gauss-Newton analogue.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, hessian, jacrev, jvp, vjp, vmap

from ..errors import InvalidInput
from .hessian import HessianOperator, LossFn
from .lanczos import lanczos

# Per-sample tensors of length dim (or C x dim Jacobians) held at once: bounds the vmap chunk.
PER_SAMPLE_BUDGET_ELEMENTS = 1 << 24
METHODS = ("exact", "gauss_newton")


class _PerSample:
    """The model as a function of the selected parameters, and the data in chunks."""

    def __init__(
        self, module: nn.Module, inputs: Tensor, targets: Tensor, loss_fn: LossFn, *,
        param_names: Sequence[str] | None, micro_batch_size: int, check: Callable[[], None] | None,
    ) -> None:
        named = dict(module.named_parameters())
        names = list(named) if param_names is None else list(param_names)
        unknown = [name for name in names if name not in named]
        if unknown or not names:
            raise InvalidInput(f"unknown or no parameter names {unknown}; the model has {list(named)}")
        n = inputs.shape[0] if inputs.dim() else 0
        if n < 2 or targets.dim() == 0 or targets.shape[0] != n:
            raise InvalidInput(
                f"non-uniformity needs at least 2 samples with matching targets, got inputs "
                f"{tuple(inputs.shape)} and targets {tuple(targets.shape)}")
        if micro_batch_size < 1:
            raise InvalidInput(f"micro_batch_size must be positive, got {micro_batch_size}")
        selected = [named[name] for name in names]
        self.param_names = names
        self.dtype = selected[0].dtype
        self.device = selected[0].device
        self.num_samples = n
        self.products = 0
        self._module = module
        self._loss_fn = loss_fn
        self._check = check
        self._shapes = [p.shape for p in selected]
        self._sizes = [p.numel() for p in selected]
        self.dim = sum(self._sizes)
        self._values = tuple(p.detach() for p in selected)
        chosen = set(names)
        self._constants = {k: p.detach() for k, p in named.items() if k not in chosen}
        self._inputs = _to(inputs, self.device, self.dtype)
        self._targets = _to(targets, self.device, self.dtype)
        self._micro_batch_size = micro_batch_size

    def _forward(self, params: Sequence[Tensor], x: Tensor) -> Tensor:
        values = dict(self._constants)
        values.update(zip(self.param_names, params))
        return functional_call(self._module, values, (x,))

    def _chunks(self, size: int):
        for start in range(0, self.num_samples, size):
            self._step()
            yield self._inputs[start:start + size], self._targets[start:start + size]

    def _step(self) -> None:
        if self._check is not None:
            self._check()

    def _split(self, v: Tensor) -> tuple[Tensor, ...]:
        return tuple(part.reshape(shape) for part, shape in zip(v.split(self._sizes), self._shapes))

    @staticmethod
    def _flat(parts: Sequence[Tensor]) -> Tensor:
        return torch.cat([p.reshape(-1) for p in parts])

    @staticmethod
    def _flat_rows(parts: Sequence[Tensor]) -> Tensor:
        return torch.cat([p.reshape(p.shape[0], -1) for p in parts], dim=1)


class PerSampleHessians(_PerSample):
    """Exact Sigma products from per-sample Hessian-vector products under vmap.

    ``hessian`` is the full-batch operator on the same module, data and parameters; it gives
    H v with the fastest exact method. The per-sample chunk holds at most
    ``PER_SAMPLE_BUDGET_ELEMENTS`` / dim samples (and at most ``micro_batch_size``).
    """

    method = "exact"

    def __init__(self, module: nn.Module, inputs: Tensor, targets: Tensor, loss_fn: LossFn, *,
                 hessian: HessianOperator, param_names: Sequence[str] | None = None,
                 micro_batch_size: int = 256, check: Callable[[], None] | None = None) -> None:
        super().__init__(module, inputs, targets, loss_fn, param_names=param_names,
                         micro_batch_size=micro_batch_size, check=check)
        if hessian.dim != self.dim or hessian.num_samples != self.num_samples:
            raise ValueError("the full-batch operator must cover the same parameters and samples")
        self._hessian = hessian
        self._chunk = max(1, min(micro_batch_size, PER_SAMPLE_BUDGET_ELEMENTS // (4 * self.dim)))

        def sample_loss(params: tuple[Tensor, ...], x: Tensor, t: Tensor) -> Tensor:
            return loss_fn(self._forward(params, x[None]), t[None])

        def centred_square(x: Tensor, t: Tensor, vs: tuple[Tensor, ...], hvs: tuple[Tensor, ...]):
            # One gradient graph of f_i, differentiated twice: H_i v, then H_i (H_i v - H v).
            _, product = vjp(lambda params: grad(sample_loss)(params, x, t), self._values)
            (hiv,) = product(vs)
            (out,) = product(tuple(a - b for a, b in zip(hiv, hvs)))
            return out

        self._centred_square = vmap(centred_square, in_dims=(0, 0, None, None))

    def matvec(self, v: Tensor) -> Tensor:
        """H v."""
        return self._hessian.matvec(v)

    def sigma_parts(self, v: Tensor, *, square: bool = False) -> tuple[Tensor, Tensor, Tensor | None]:
        """(H v, Sigma v, H (H v) if ``square``)."""
        hv = self._hessian.matvec(v)
        vs, hvs = self._split(v), self._split(hv)
        out = torch.zeros(self.dim, dtype=self.dtype, device=self.device)
        for x, t in self._chunks(self._chunk):
            out += self._flat_rows(self._centred_square(x, t, vs, hvs)).sum(0)
        self.products += 1
        return hv, out / self.num_samples, self._hessian.matvec(hv) if square else None


class PerSampleGaussNewton(_PerSample):
    """Sigma products of the Gauss-Newton matrices G_i = J_i^T L_i J_i.

    Setting up computes, per sample, L_i (the loss' Hessian in the outputs, by torch.func) and
    K_i = J_i J_i^T from the per-sample output Jacobian (C x dim, chunked by memory), once.
    """

    method = "gauss_newton"

    def __init__(self, module: nn.Module, inputs: Tensor, targets: Tensor, loss_fn: LossFn, *,
                 param_names: Sequence[str] | None = None, micro_batch_size: int = 256,
                 check: Callable[[], None] | None = None) -> None:
        super().__init__(module, inputs, targets, loss_fn, param_names=param_names,
                         micro_batch_size=micro_batch_size, check=check)
        with torch.no_grad():
            sample_out = self._forward(self._values, self._inputs[:1])
        self._out_shape = tuple(sample_out.shape[1:])
        outputs = sample_out[0].numel()

        def output(params: tuple[Tensor, ...], x: Tensor) -> Tensor:
            return self._forward(params, x[None]).reshape(-1)

        def sample_loss(o: Tensor, t: Tensor) -> Tensor:
            return loss_fn(o.reshape(1, *self._out_shape), t[None])

        def blocks(x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
            jacobian = self._flat_rows(jacrev(output)(self._values, x))  # C x dim
            o = output(self._values, x).detach()
            return jacobian @ jacobian.T, hessian(sample_loss)(o, t)

        chunk = max(1, min(micro_batch_size, PER_SAMPLE_BUDGET_ELEMENTS // (4 * outputs * self.dim)))
        kernels, curvatures = [], []
        for x, t in self._chunks(chunk):
            k, lam = vmap(blocks)(x, t)
            kernels.append(k)
            curvatures.append(lam)
        self._kernels = torch.cat(kernels)        # n x C x C, K_i = J_i J_i^T
        self._curvatures = torch.cat(curvatures)  # n x C x C, L_i
        self.num_outputs = outputs

    def _jvp(self, x: Tensor, vs: tuple[Tensor, ...]) -> Tensor:
        return jvp(lambda params: self._forward(params, x), (self._values,), (vs,))[1].reshape(x.shape[0], -1)

    def _vjp(self, x: Tensor, cotangents: Tensor) -> Tensor:
        """J^T u for k stacked cotangents (k, m, C): (k, dim)."""
        _, pullback = vjp(lambda params: self._forward(params, x), self._values)
        shaped = cotangents.reshape(cotangents.shape[0], x.shape[0], *self._out_shape)
        return self._flat_rows(vmap(pullback)(shaped)[0])

    def _jacobian_products(self, v: Tensor) -> Tensor:
        """J_i v for every sample: n x C."""
        vs = self._split(v)
        return torch.cat([self._jvp(x, vs) for x, _ in self._chunks(self._micro_batch_size)])

    def _transpose_products(self, cotangents: Tensor) -> Tensor:
        """sum_i J_i^T u_i for k stacked cotangent sets (k, n, C): (k, dim)."""
        out = torch.zeros(cotangents.shape[0], self.dim, dtype=self.dtype, device=self.device)
        m = self._micro_batch_size
        for index, (x, _) in enumerate(self._chunks(m)):
            out += self._vjp(x, cotangents[:, index * m:(index + 1) * m])
        return out

    def _apply(self, blocks: Tensor, u: Tensor) -> Tensor:
        return torch.einsum("nij,nj->ni", blocks, u)

    def matvec(self, v: Tensor) -> Tensor:
        """G v = (1/n) sum_i J_i^T L_i J_i v."""
        ju = self._apply(self._curvatures, self._jacobian_products(v))
        return self._transpose_products(ju[None])[0] / self.num_samples

    def sigma_parts(self, v: Tensor, *, square: bool = False) -> tuple[Tensor, Tensor, Tensor | None]:
        """(G v, Sigma v, G (G v) if ``square``): two forward-mode and two backward passes."""
        jv = self._jacobian_products(v)
        gv = self.matvec_from(jv)
        jgv = self._jacobian_products(gv)
        lam = self._curvatures
        centred = self._apply(lam, self._apply(self._kernels, self._apply(lam, jv)) - jgv)
        stacked = torch.stack([centred, self._apply(lam, jgv)]) if square else centred[None]
        out = self._transpose_products(stacked) / self.num_samples
        self.products += 1
        return gv, out[0], out[1] if square else None

    def matvec_from(self, jv: Tensor) -> Tensor:
        """G v from the stacked J_i v."""
        return self._transpose_products(self._apply(self._curvatures, jv)[None])[0] / self.num_samples


SigmaOperator = PerSampleHessians | PerSampleGaussNewton


def sgd_noise_factor(num_samples: int, batch_size: int) -> float:
    """(n - B) / (B (n - 1)): the weight of Sigma for batches of B drawn without replacement."""
    return (num_samples - batch_size) / (batch_size * (num_samples - 1))


def compute_non_uniformity(
    operator: SigmaOperator,
    *,
    learning_rate: float = 0.0,
    batch_size: int = 0,
    num_samples: int | None = None,
    tol: float = 1e-3,
    max_products: int = 300,
    seed: int = 0,
    sharpness: tuple[float, bool] | None = None,
    progress: Callable[[int, int, float], None] | None = None,
) -> dict:
    """The ``non_uniformity`` report block.

    ``num_samples`` is n in the SGD criterion (default: the operator's samples); ``sharpness``
    = (a, converged) when it is already known for the same curvature, else it is computed.
    The SGD verdict needs both ``learning_rate`` and ``batch_size``; ``sgd_stable`` is True when
    the stability eigenvalue is at most 1 + tol (directions that no H_i sees keep it at exactly
    1, so the boundary is decided within the solver's tolerance).
    """
    n = operator.num_samples if num_samples is None else num_samples
    if learning_rate < 0 or not math.isfinite(learning_rate):
        raise InvalidInput(f"learning_rate must be a finite non-negative number, got {learning_rate}")
    if batch_size < 0 or batch_size > n:
        raise InvalidInput(f"batch_size {batch_size} must lie between 1 and the {n} samples")
    start = time.perf_counter()
    verdict = learning_rate > 0 and batch_size > 0
    # Progress counts products over every solve: Sigma, the sharpness if needed, the verdict.
    total = max_products * (1 + (sharpness is None) + verdict)
    done = 0

    def solve(matvec: Callable[[Tensor], Tensor]) -> tuple[float, bool]:
        nonlocal done

        def on_step(matvecs: int, estimate: float) -> None:
            if progress is not None:
                progress(done + matvecs, total, estimate)

        result = lanczos(matvec, operator.dim, top_k=1, tol=tol, max_matvecs=max_products, seed=seed,
                         dtype=operator.dtype, device=operator.device, on_step=on_step)
        done += result.matvecs
        return result.largest[0], result.converged

    sigma_max, converged = solve(lambda v: operator.sigma_parts(v)[1])
    if sharpness is None:
        a, a_converged = solve(operator.matvec)
    else:
        a, a_converged = sharpness
    s = math.sqrt(max(sigma_max, 0.0))
    block: dict = {
        "value": s,
        "batch_size": batch_size,
        "learning_rate": learning_rate,
        "method": operator.method,
        "num_samples": n,
        "sigma_samples": operator.num_samples,
        "converged": converged and a_converged,
        "tolerance": tol,
        "sharpness": a,
    }
    if verdict:
        eta, c = learning_rate, sgd_noise_factor(n, batch_size)

        def stability(v: Tensor) -> Tensor:
            # ((I - eta C)^2 + eta^2 c Sigma) v from one pass of the Sigma operator.
            cv, sv, ccv = operator.sigma_parts(v, square=True)
            return v - 2 * eta * cv + eta**2 * ccv + eta**2 * c * sv

        value, stable_converged = solve(stability)
        bound_s = math.inf if batch_size == n else math.sqrt(1 / c) / eta
        # Both sides are known to the solver's relative tolerance.
        met = a >= -tol * abs(a) and a <= (2 / eta) * (1 + tol) and s <= bound_s * (1 + tol)
        block.update({
            "stability_eigenvalue": value,
            "sgd_stable": value <= 1 + tol,
            "stability_converged": stable_converged,
            "sharpness_bound": 2 / eta,
            "necessary_conditions_met": bool(met),
        })
        if math.isfinite(bound_s):
            block["non_uniformity_bound"] = bound_s
    block["products"] = operator.products
    block["seconds"] = time.perf_counter() - start
    return block


def _to(tensor: Tensor, device: torch.device, dtype: torch.dtype) -> Tensor:
    # Floating data follows the parameters' dtype; class labels stay integers.
    return tensor.to(device, dtype) if tensor.is_floating_point() else tensor.to(device)
