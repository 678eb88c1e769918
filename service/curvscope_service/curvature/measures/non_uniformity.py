"""Non-uniformity and the linear stability of SGD (Wu, Ma & E, NeurIPS 2018).

For the mean loss f = (1/n) sum_i f_i with per-sample Hessians H_i and H = (1/n) sum_i H_i,
Wu, Ma & E ("How SGD Selects the Global Minima in Over-parameterized Learning: A Dynamical
Stability Perspective") call a = lambda_max(H) the sharpness and s = lambda_max(Sigma)^(1/2)
the non-uniformity, with

    Sigma = (1/n) sum_i H_i^2 - H^2 = (1/n) sum_i (H_i - H)^2      (positive semi-definite).

Their Theorem 1: a global minimum x* is linearly stable for SGD with learning rate eta and
batch size B (B distinct samples drawn uniformly, afresh at every step), i.e. the linearised
iterates keep E||x_t - x*||^2 <= C ||x_0 - x*||^2, if

    lambda_max( (I - eta H)^2 + eta^2 (n - B) / (B (n - 1)) Sigma ) <= 1,

and for d = 1 the condition is also necessary (in more dimensions it is only sufficient). The
criterion implies 0 <= a <= 2 / eta (its quadratic form at H's top eigenvector) and
0 <= s <= sqrt(B (n - 1) / (n - B)) / eta (at Sigma's top eigenvector): the paper's
sharpness-non-uniformity diagram, necessary for the criterion but not sufficient. Both
eigenvalues are computed here matrix-free by Lanczos to a residual tolerance (the authors' code
runs 10 power iterations, which stops short of the top eigenvalue).

The Sigma products are the per-sample operators' (``operators/per_sample.py``).

On a subsample of m of the n samples (``max_samples``), Sigma and H are estimates. To first
order a top eigenvalue moves by u^T (error of the matrix) u (u its unit eigenvector), and
u^T Sigma_m u is the mean over the m samples of q_i = ||(H_i - H) u||^2: for m drawn without
replacement its standard error is std(q) / sqrt(m) * sqrt((n - m) / (n - 1)), and s = sqrt(lambda)
has half that relative error. The stability eigenvalue's error, from w^T ((I - eta H)^2 +
eta^2 c Sigma) w, is that of the mean of -2 eta w^T D_i w + 2 eta^2 (H w)^T D_i w + eta^2 c
||D_i w||^2 (D_i = H_i - H). The exact method reports both (0 when every sample is used).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from torch import Tensor

from ...errors import InvalidInput
from ..operators.per_sample import SigmaOperator
from ..solvers.lanczos import lanczos

METHODS = ("exact", "gauss_newton")


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

    # Standard errors of the subsample's Sigma, where the operator can give per-sample terms.
    subsampled = operator.num_samples < n
    errors = hasattr(operator, "deviation_terms")
    vectors: list[Tensor] = []

    def solve(matvec: Callable[[Tensor], Tensor], keep: bool = False) -> tuple[float, bool]:
        nonlocal done

        def on_step(products: int, estimate: float) -> None:
            if progress is not None:
                progress(done + products, total, estimate)

        result = lanczos(matvec, operator.dim, top_k=1, tol=tol, max_products=max_products, seed=seed,
                         dtype=operator.dtype, device=operator.device, on_step=on_step,
                         return_eigenvectors=keep, eigenvector_dtype=operator.dtype)
        done += result.products
        if keep:
            vectors.append(result.eigenvectors[0][0])
        return result.largest[0], result.converged

    def subsample_stderr(terms: Tensor) -> float:
        """The standard error of the mean of per-sample terms over m of the n samples."""
        m = terms.numel()
        return terms.std().item() / math.sqrt(m) * math.sqrt((n - m) / (n - 1))

    sigma_max, converged = solve(lambda v: operator.sigma_parts(v)[1], keep=errors and subsampled)
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
    if errors:
        error = subsample_stderr(operator.deviation_terms(vectors[0])[0]) if subsampled else 0.0
        # d sqrt(lambda) = d lambda / (2 sqrt(lambda)); at s = 0 the error of s is that of sqrt(lambda).
        block["value_stderr"] = error / (2 * s) if s > 0 else math.sqrt(error)
    if verdict:
        eta, c = learning_rate, sgd_noise_factor(n, batch_size)

        def stability(v: Tensor) -> Tensor:
            # ((I - eta C)^2 + eta^2 c Sigma) v from one pass of the Sigma operator.
            cv, sv, ccv = operator.sigma_parts(v, square=True)
            return v - 2 * eta * cv + eta**2 * ccv + eta**2 * c * sv

        value, stable_converged = solve(stability, keep=errors and subsampled)
        if errors:
            error = 0.0
            if subsampled:
                norms, forms, cross = operator.deviation_terms(vectors[-1])
                error = subsample_stderr(-2 * eta * forms + 2 * eta**2 * cross + eta**2 * c * norms)
            block["stability_eigenvalue_stderr"] = error
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
