"""Per-sample curvature operators: products with Sigma = (1/n) sum_i (C_i - C)^2, the
variance of the per-sample curvatures C_i, for the non-uniformity of Wu, Ma & E (NeurIPS 2018;
``measures/non_uniformity.py``).

Two ways to apply Sigma, both centred, Sigma v = (1/n) sum_i C_i (C_i v - C v), so that no
large H^2 term is subtracted from another:

- ``PerSampleHessians``: exact. The per-sample gradients are built under vmap, micro-batched
  so that memory is bounded, with their autograd graph, kept between products up to a budget.
  A product is then H_i v for every sample (a double backward pass over those graphs, or a
  replay of their ``torch.func.linearize`` linearisation for large models), H v = (1/n) sum_i
  H_i v from the same pass, and one backward pass with the centred cotangents H_i v - H v.
- ``PerSampleGaussNewton``: C_i = G_i = J_i^T L_i J_i (J_i the output Jacobian of sample i, L_i
  the loss' Hessian in the outputs). The C x C blocks K_i = J_i J_i^T are computed once, with
  the forward graphs and the linearised forward; then G_i^2 v = J_i^T L_i K_i L_i J_i v, so a
  Sigma product is two replays of the linearised forward and two backward passes over the
  batch. G_i = H_i where the residuals vanish (mse at an interpolating minimum: Wu, Ma & E's
  setting); elsewhere it is the Gauss-Newton analogue.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.func import grad, hessian, jacrev, jvp, linearize, vjp, vmap

from .base import Inputs, LossFn, MeanLossOperator, batch_of_one, rows
from .hessian import HessianOperator

# Per-sample tensors of length dim (or C x dim Jacobians) held at once: bounds the vmap chunk.
PER_SAMPLE_BUDGET_ELEMENTS = 1 << 24
# Exact path: the per-sample gradient graphs are kept between products while n * dim is at
# most this (128 MiB of float32 per-sample gradients); beyond, they are rebuilt per product.
RETAIN_BUDGET_ELEMENTS = 1 << 25
# Gauss-Newton path: the forward graphs and their linearisation are kept up to this many samples
# (HessianOperator's ``retain_max_samples`` default); beyond, every product re-runs the forward.
RETAIN_MAX_SAMPLES = 4096
# Exact path: per-sample gradients linearised (forward-mode replay) from this many parameters.
LINEARISE_MIN_DIM = 16384


class _PerSample(MeanLossOperator):
    """The model as a function of the selected parameters, the data in chunks; ``products``
    counts Sigma products. Sigma is a variance over samples: it needs two at least."""

    min_samples = 2


class PerSampleHessians(_PerSample):
    """Exact Sigma products from per-sample Hessian-vector products under vmap.

    The per-sample gradients g_i(theta) (under vmap, chunks of at most
    ``PER_SAMPLE_BUDGET_ELEMENTS`` / (4 dim) samples and at most ``micro_batch_size``) are built
    with their autograd graph, once, and kept while n * dim <= ``RETAIN_BUDGET_ELEMENTS``. A
    product is then two passes over those graphs:

    1. H_i v for every sample: the derivative in U of sum_i <H_i u_i, v>, i.e. a backward pass
       with cotangents U = (u_i) (graph kept) and a backward pass of that in U;
       H v = (1/n) sum_i H_i v comes with it, no full-batch HVP needed;
    2. sum_i H_i (H_i v - H v): one backward pass with the centred cotangents (the graph's shared
       parameters sum the samples).

    Beyond the budget the graphs are rebuilt for every chunk and product, H v then comes first
    from ``hessian`` (the full-batch operator on the same module, data and parameters), so each
    chunk's graph is built once per product. ``hessian`` also gives H (H v) for the SGD criterion.
    """

    method = "exact"

    def __init__(self, module: nn.Module, inputs: Inputs, targets: Tensor, loss_fn: LossFn, *,
                 hessian: HessianOperator, param_names: Sequence[str] | None = None,
                 micro_batch_size: int = 256, check: Callable[[], None] | None = None,
                 retain_budget_elements: int | None = None, linearise: bool | None = None) -> None:
        super().__init__(module, inputs, targets, loss_fn, param_names=param_names,
                         micro_batch_size=micro_batch_size, check=check)
        if hessian.dim != self.dim or hessian.num_samples != self.num_samples:
            raise ValueError("the full-batch operator must cover the same parameters and samples")
        self._hessian = hessian
        self._chunk = max(1, min(micro_batch_size, PER_SAMPLE_BUDGET_ELEMENTS // (4 * self.dim)))
        budget = RETAIN_BUDGET_ELEMENTS if retain_budget_elements is None else retain_budget_elements
        self.retained = self.num_samples * self.dim <= budget
        self._graphs: list[tuple[Tensor, ...]] | None = None
        self._pushes: list[Callable | None] = []
        # Tracing costs about a second per chunk; it repays itself within a report (tens of
        # products) only where the per-sample pass is large (benchmarks/README.md).
        self.linearise = self.retained and (self.dim >= LINEARISE_MIN_DIM if linearise is None else linearise)

        def sample_loss(params: tuple[Tensor, ...], x: tuple[Tensor, ...], t: Tensor) -> Tensor:
            return loss_fn(self._forward(params, batch_of_one(x)), t[None])

        self._per_sample_gradients = vmap(grad(sample_loss), in_dims=(None, 0, 0))

    def matvec(self, v: Tensor) -> Tensor:
        """H v."""
        return self._hessian.matvec(v)

    def sigma_parts(self, v: Tensor, *, square: bool = False) -> tuple[Tensor, Tensor, Tensor | None]:
        """(H v, Sigma v, H (H v) if ``square``)."""
        vs = self._split(v)
        out = [torch.zeros_like(p) for p in self._values]
        if self.retained:
            graphs = self._retained_graphs()
            per_sample = []
            hv = [torch.zeros_like(p) for p in self._values]
            for g, push in zip(graphs, self._pushes):
                self._step()
                products = self._per_sample_products(g, vs, push)
                per_sample.append(products)
                for total, part in zip(hv, products):
                    total += part.sum(0)
            hv = [total / self.num_samples for total in hv]
            for g, products in zip(graphs, per_sample):
                self._step()
                centred = tuple(part - mean for part, mean in zip(products, hv))
                for total, part in zip(out, self._pullback(g, centred, retain=True)):
                    total += part
            hv = self._flat(hv)
        else:
            hv = self._hessian.matvec(v)
            hvs = self._split(hv)
            for x, t in self._chunks(self._chunk):
                g = self._gradient_graph(x, t)
                centred = tuple(part - mean for part, mean in zip(self._per_sample_products(g, vs), hvs))
                for total, part in zip(out, self._pullback(g, centred, retain=False)):
                    total += part
        self.products += 1
        return hv, self._flat(out) / self.num_samples, self._hessian.matvec(hv) if square else None

    def deviation_terms(self, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Per sample, with D_i = H_i - H: ||D_i v||^2, v^T D_i v and (H v)^T D_i v (float64, each of
        length num_samples). The first has the mean v^T Sigma v, the others 0; their spread over
        the samples is the sampling error of quadratic forms of Sigma and H."""
        vs = self._split(v)
        hv = self._split(self._hessian.matvec(v))
        terms: list[list[Tensor]] = [[], [], []]
        for x, t in self._chunks(self._chunk):
            self._step()
            products = self._per_sample_products(self._gradient_graph(x, t), vs)
            deviations = [(part - mean).flatten(1).to(torch.float64) for part, mean in zip(products, hv)]
            terms[0].append(sum((d * d).sum(1) for d in deviations))
            terms[1].append(sum(d @ w.reshape(-1).to(torch.float64) for d, w in zip(deviations, vs)))
            terms[2].append(sum(d @ h.reshape(-1).to(torch.float64) for d, h in zip(deviations, hv)))
        return tuple(torch.cat(parts) for parts in terms)

    def _gradient_graph(self, x: tuple[Tensor, ...], t: Tensor) -> tuple[Tensor, ...]:
        """The per-sample gradients of a chunk, (m, *shape) per parameter, with their graph."""
        with torch.enable_grad():
            return self._per_sample_gradients(self._leaves, x, t)

    def _retained_graphs(self) -> list[tuple[Tensor, ...]]:
        if self._graphs is None:
            graphs, pushes = [], []
            for x, t in self._chunks(self._chunk):
                graphs.append(self._gradient_graph(x, t))
                pushes.append(self._linearised(x, t) if self.linearise else None)
            self._graphs, self._pushes = graphs, pushes
        return self._graphs

    def _linearised(self, x: tuple[Tensor, ...], t: Tensor) -> Callable | None:
        """v -> (H_i v)_i for the chunk: its per-sample gradients linearised, or None."""
        return _linearise(lambda params: self._per_sample_gradients(params, x, t), self._values)

    def _pullback(self, g: tuple[Tensor, ...], cotangents: Sequence[Tensor], *, retain: bool) -> tuple[Tensor, ...]:
        """sum_i H_i u_i for per-sample cotangents u_i (m, *shape per parameter)."""
        # Gradient entries that do not depend on the parameters have no graph: zero Hessian rows.
        pairs = [(gi, ui) for gi, ui in zip(g, cotangents) if gi.requires_grad]
        if not pairs:
            return tuple(torch.zeros_like(p) for p in self._values)
        with torch.enable_grad():
            return torch.autograd.grad([gi for gi, _ in pairs], self._leaves, [ui for _, ui in pairs],
                                       retain_graph=retain, allow_unused=True, materialize_grads=True)

    def _per_sample_products(self, g: tuple[Tensor, ...], vs: Sequence[Tensor],
                             push: Callable | None = None) -> tuple[Tensor, ...]:
        """H_i v for every sample of the chunk: (m, *shape) per parameter.

        With ``push`` (the linearised per-sample gradients) a replay of the tangent computation;
        else by transposition: u -> sum_i H_i u_i is a backward pass, and v -> (H_i v)_i is the
        backward pass of that backward pass with respect to the cotangents u (double backward)."""
        if push is not None:
            return push(tuple(vs))
        m = self._chunk_size(g)
        zeros = [torch.zeros((m, *p.shape), dtype=self.dtype, device=self.device) for p in self._values]
        live = [index for index, gi in enumerate(g) if gi.requires_grad]
        if not live:
            return tuple(zeros)
        with torch.enable_grad():
            dummies = [torch.zeros_like(g[index], requires_grad=True) for index in live]
            pulled = torch.autograd.grad([g[index] for index in live], self._leaves, dummies, create_graph=True,
                                         retain_graph=True, allow_unused=True, materialize_grads=True)
            pairs = [(pi, vi) for pi, vi in zip(pulled, vs) if pi.requires_grad]
            if not pairs:
                return tuple(zeros)
            products = torch.autograd.grad([pi for pi, _ in pairs], dummies, [vi for _, vi in pairs],
                                           retain_graph=True, allow_unused=True, materialize_grads=True)
        for index, product in zip(live, products):
            zeros[index] = product
        return tuple(zeros)

    @staticmethod
    def _chunk_size(g: tuple[Tensor, ...]) -> int:
        return g[0].shape[0]


class PerSampleGaussNewton(_PerSample):
    """Sigma products of the Gauss-Newton matrices G_i = J_i^T L_i J_i.

    Setting up computes, per sample, L_i (the loss' Hessian in the outputs, by torch.func) and
    K_i = J_i J_i^T from the per-sample output Jacobian (C x dim, chunked by memory), once.
    Up to ``retain_max_samples`` samples it also keeps, per micro-batch, the forward graph (so
    J^T u is one backward pass) and the forward pass linearised by ``torch.func.linearize`` (so
    J v replays only the tangent computation); beyond, each product re-runs the forward passes.
    """

    method = "gauss_newton"

    def __init__(self, module: nn.Module, inputs: Inputs, targets: Tensor, loss_fn: LossFn, *,
                 param_names: Sequence[str] | None = None, micro_batch_size: int = 256,
                 check: Callable[[], None] | None = None,
                 retain_max_samples: int = RETAIN_MAX_SAMPLES) -> None:
        super().__init__(module, inputs, targets, loss_fn, param_names=param_names,
                         micro_batch_size=micro_batch_size, check=check)
        with torch.no_grad():
            sample_out = self._forward(self._values, rows(self._inputs, 0, 1))
        self._out_shape = tuple(sample_out.shape[1:])
        outputs = sample_out[0].numel()

        def output(params: tuple[Tensor, ...], x: tuple[Tensor, ...]) -> Tensor:
            return self._forward(params, batch_of_one(x)).reshape(-1)

        def sample_loss(o: Tensor, t: Tensor) -> Tensor:
            return loss_fn(o.reshape(1, *self._out_shape), t[None])

        def blocks(x: tuple[Tensor, ...], t: Tensor) -> tuple[Tensor, Tensor]:
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
        self._retained: list[tuple[Tensor, Tensor, Callable | None]] | None = None
        if self.num_samples <= retain_max_samples:
            self._retained = [self._linearise(x) for x, _ in self._chunks(micro_batch_size)]

    def _linearise(self, x: tuple[Tensor, ...]) -> tuple[tuple[Tensor, ...], Tensor, Callable | None]:
        """(x, the micro-batch's outputs with their graph, its linearised forward or None)."""
        with torch.enable_grad():
            outputs = self._forward(self._leaves, x)
        return x, outputs, _linearise(lambda params: self._forward(params, x), self._values)

    def _jvp(self, x: tuple[Tensor, ...], vs: tuple[Tensor, ...]) -> Tensor:
        return jvp(lambda params: self._forward(params, x), (self._values,), (vs,))[1].reshape(x[0].shape[0], -1)

    def _vjp(self, x: tuple[Tensor, ...], cotangents: Tensor) -> Tensor:
        """J^T u for k stacked cotangents (k, m, C): (k, dim)."""
        _, pullback = vjp(lambda params: self._forward(params, x), self._values)
        shaped = cotangents.reshape(cotangents.shape[0], x[0].shape[0], *self._out_shape)
        return self._flat_rows(vmap(pullback)(shaped)[0])

    def _jacobian_products(self, v: Tensor) -> Tensor:
        """J_i v for every sample: n x C."""
        vs = self._split(v)
        if self._retained is None:
            return torch.cat([self._jvp(x, vs) for x, _ in self._chunks(self._micro_batch_size)])
        parts = []
        for x, _, push in self._retained:
            self._step()
            parts.append((push(vs) if push is not None else self._jvp(x, vs)).reshape(x[0].shape[0], -1))
        return torch.cat(parts)

    def _transpose_products(self, cotangents: Tensor) -> Tensor:
        """sum_i J_i^T u_i for k stacked cotangent sets (k, n, C): (k, dim)."""
        out = torch.zeros(cotangents.shape[0], self.dim, dtype=self.dtype, device=self.device)
        m = self._micro_batch_size
        if self._retained is None:
            for index, (x, _) in enumerate(self._chunks(m)):
                out += self._vjp(x, cotangents[:, index * m:(index + 1) * m])
            return out
        for index, (_, outputs, _) in enumerate(self._retained):
            self._step()
            if not outputs.requires_grad:  # outputs that do not depend on the parameters
                continue
            for row, u in zip(out, cotangents[:, index * m:(index + 1) * m]):
                with torch.enable_grad():
                    parts = torch.autograd.grad(outputs, self._leaves, u.reshape(outputs.shape), retain_graph=True,
                                                allow_unused=True, materialize_grads=True)
                row += self._flat(parts)
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


def _linearise(fn: Callable, primals: tuple[Tensor, ...]) -> Callable | None:
    """The jvp of fn at primals as a replayable function (``torch.func.linearize``), or None
    where fn cannot be traced (the caller then runs a fresh jvp per product)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's tracer warns about its own internals
            return linearize(fn, primals)[1]
    except Exception:  # noqa: BLE001 - any tracing failure leaves the untraced path, same values
        return None
