"""Extreme eigenvalues of a symmetric operator known only through matrix-vector products.

Lanczos with full reorthogonalisation (classical Gram-Schmidt applied twice, "twice is
enough") and thick restart in the Krylov-Schur form (Stewart 2002; Wu & Simon 2000): the
basis V is kept on the operator's device together with the Rayleigh quotient T = V^T A V, so
that after every step

    A V_m = V_m T_m + beta v_{m+1} e_m^T.

A Ritz pair (theta, y = V_m s) therefore has the residual ||A y - theta y|| = beta |s_m|, known
without another product; the run stops as soon as it is at most tol * |theta| for every wanted
value. When the basis is full, the wanted Ritz vectors and some neighbours are kept, T becomes
diagonal plus one coupling row, and the iteration goes on from v_{m+1}.

Cost at scale (10M-100M parameters): the basis is preallocated once, in the products' dtype
(float32 for a float32 model: half the memory of float64 and a full-speed matrix product),
and a Gram-Schmidt pass is two matrix-vector products with the whole basis (one ``mv`` for the
coefficients, one in-place ``addmv`` for the update), so a step allocates nothing of the
operator's size. float64 is kept where it buys accuracy: T, its eigendecomposition and the
sum of the two passes' coefficients. A float32 basis stays orthogonal to about float32's eps
(twice is enough), so the Ritz values carry float32 rounding of ||A||, the same as the
products themselves; the reported residuals are floored there.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

Matvec = Callable[[Tensor], Tensor]


@dataclass
class EigenResult:
    """Extreme Ritz values of a symmetric operator and how far they are from converged.

    ``largest`` is descending, ``smallest`` ascending (algebraically); each residual is
    ||A y - theta y|| of the unit Ritz vector y. ``eigenvectors`` holds (largest, smallest)
    flat vectors in the same order when asked for.
    """

    largest: list[float]
    smallest: list[float]
    largest_residuals: list[float]
    smallest_residuals: list[float]
    converged: bool
    products: int
    restarts: int
    seconds: float
    eigenvectors: tuple[list[Tensor], list[Tensor]] | None = None
    # eps(dtype) * max|Ritz value|: no residual is reported below it (the products' rounding).
    residual_floor: float = 0.0


@dataclass
class RitzPairs:
    """Ritz pairs of one operator from one Krylov basis, for reuse by other estimators.

    ``vectors`` (dim, k) are orthonormal float64 columns y_i = V s_i, so that y_i^T A y_i equals
    the Ritz value theta_i exactly (up to rounding) whether or not the pair converged, and
    ||A y_i - theta_i y_i|| is ``residuals[i]`` (an upper bound: Lanczos floors it at the
    products' rounding).
    """

    values: list[float]
    vectors: Tensor
    residuals: list[float]


BASIS_BUDGET_BYTES = 512 << 20
MAX_DEFAULT_BASIS = 160
# Fewest vectors beyond the wanted ones a default basis keeps: with fewer, thick restarts come
# so often that the products grow faster than the memory shrinks.
MIN_EXTRA_BASIS = 10
# Columns of the basis rewritten at once by a restart (the only scratch space it needs is
# kept x this many entries, instead of a second copy of the kept vectors). On a GPU each chunk
# costs kernel launches, so chunks there are 256 times wider (at 124M parameters the narrow
# ones made a restart take seconds).
RESTART_CHUNK = 1 << 14
RESTART_CHUNK_GPU = 1 << 22


def _chunk(device: torch.device) -> int:
    return RESTART_CHUNK if device.type == "cpu" else RESTART_CHUNK_GPU
# A Gram-Schmidt pass that leaves more than this fraction of w's norm needs no repetition.
REORTHOGONALISED = 0.5 ** 0.5


def basis_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the Lanczos basis for products in ``dtype``: the same, at least float32."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def default_basis_size(dim: int, wanted: int, dtype: torch.dtype = torch.float64,
                       budget_bytes: int = BASIS_BUDGET_BYTES) -> int:
    """As many basis vectors of ``basis_dtype(dtype)`` as ``budget_bytes`` holds, up to 160,
    at least ``wanted + 10``; on small operators at least max(30, 3 wanted).

    A long basis saves restarts, which matters most for the smallest eigenvalues: they sit next
    to the cluster of near-zero eigenvalues that trained networks have (measured on the demo
    MLP's 2,410 parameters, top-5 and bottom-2 at 1e-3: 315 products with 30 vectors, 156 with
    120; its last layer: 803 products with 30, 156 with 240). On large operators the budget
    decides: 512 MiB of float32 is 11 vectors of a ResNet-18 (11.2M parameters); top-5 at 1e-3
    then takes about as many products as with 30 (benchmarks/bench_scale.py).
    """
    fits = budget_bytes // (basis_dtype(dtype).itemsize * max(dim, 1)) - 1
    small = max(30, 3 * wanted)
    if fits >= small:
        return min(MAX_DEFAULT_BASIS, fits)
    return max(wanted + MIN_EXTRA_BASIS, fits)


def basis_bytes(dim: int, basis_size: int, dtype: torch.dtype) -> int:
    """Memory the solver holds for a basis of ``basis_size`` vectors (plus the next one)."""
    return (min(dim, basis_size) + 1) * dim * basis_dtype(dtype).itemsize


def lanczos(
    matvec: Matvec,
    dim: int,
    *,
    top_k: int = 1,
    bottom_k: int = 0,
    tol: float = 1e-3,
    max_products: int = 500,
    max_basis: int | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
    on_step: Callable[[int, float], None] | None = None,
    return_eigenvectors: bool = False,
    eigenvector_dtype: torch.dtype | None = None,
) -> EigenResult:
    """The ``top_k`` largest and ``bottom_k`` smallest eigenvalues of the operator ``matvec``.

    ``matvec`` takes and returns flat vectors of length ``dim`` in ``dtype`` on ``device``.
    ``max_basis`` bounds the basis, hence the memory: (max_basis + 1) vectors of
    ``basis_dtype(dtype)`` (``basis_bytes``). By default it is
    ``default_basis_size(dim, top_k + bottom_k, dtype)``. ``on_step(products, largest Ritz
    value)`` runs after every product. With a budget of ``max_products`` products,
    ``converged`` is True only if every wanted value met the residual test (or the whole space
    was spanned: then the values are exact). ``eigenvector_dtype`` is that of the returned
    eigenvectors (default ``dtype``). Like any single-vector Krylov method it can miss copies of
    a repeated eigenvalue that converged before the invariant subspace around it was exhausted.
    """
    start = time.perf_counter()
    steps = lanczos_steps(dim, top_k=top_k, bottom_k=bottom_k, tol=tol, max_products=max_products,
                          max_basis=max_basis, seed=seed, dtype=dtype, device=device, on_step=on_step,
                          return_eigenvectors=return_eigenvectors, eigenvector_dtype=eigenvector_dtype)
    try:
        vector = next(steps)
        while True:
            vector = steps.send(matvec(vector))
    except StopIteration as done:
        result: EigenResult = done.value
    result.seconds = time.perf_counter() - start
    return result


def lanczos_steps(
    dim: int,
    *,
    top_k: int = 1,
    bottom_k: int = 0,
    tol: float = 1e-3,
    max_products: int = 500,
    max_basis: int | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
    on_step: Callable[[int, float], None] | None = None,
    return_eigenvectors: bool = False,
    eigenvector_dtype: torch.dtype | None = None,
) -> Generator[Tensor, Tensor, EigenResult]:
    """``lanczos`` as a generator that hands out the products it needs: it yields each vector
    v (read-only, valid until the next send) and is sent A v; it returns the ``EigenResult``,
    whose ``seconds`` count only the time spent in the generator (the caller adds the
    products'). Several of them can run in lockstep, their products batched (per-layer solves
    against one kept graph, ``extreme_eigenvalues.lockstep_lanczos``)."""
    wanted = top_k + bottom_k
    if top_k < 0 or bottom_k < 0 or wanted == 0:
        raise ValueError(f"ask for at least one eigenvalue, got top_k={top_k}, bottom_k={bottom_k}")
    if max(top_k, bottom_k) > dim:
        raise ValueError(f"cannot compute {max(top_k, bottom_k)} eigenvalues of a {dim}-dimensional operator")
    if max_products < max(top_k, bottom_k):
        raise ValueError(f"max_products={max_products} is below the number of eigenvalues asked for")
    if tol <= 0:
        raise ValueError(f"tol must be positive, got {tol}")
    basis_size = min(dim, max_basis or default_basis_size(dim, wanted, dtype))
    if basis_size < dim and basis_size < wanted + 2:
        raise ValueError(f"max_basis must be at least top_k + bottom_k + 2 = {wanted + 2}")

    busy_since = time.perf_counter()
    busy = 0.0
    device = torch.device(device) if device is not None else torch.device("cpu")
    generator = torch.Generator().manual_seed(seed)
    # Below this fraction of the largest |Ritz value| the operator's rounding dominates, so the
    # relative test turns absolute there (an eigenvalue 0 could otherwise never converge).
    floor = torch.finfo(dtype).eps ** 0.5
    breakdown = torch.finfo(dtype).eps * dim**0.5
    rounding = torch.finfo(dtype).eps

    V = torch.empty(basis_size + 1, dim, dtype=basis_dtype(dtype), device=device)
    # Scratch for the Gram-Schmidt coefficients, reused by every step.
    coefficients = torch.empty(basis_size + 1, dtype=V.dtype, device=device)
    # T is small and lives on the host; numpy keeps the per-step bookkeeping cheap.
    T = np.zeros((basis_size, basis_size))
    _random_orthonormal(generator, V[:0], out=V[0])
    m = products = restarts = 0
    # First basis vector the next product couples to before reorthogonalisation.
    coupled = 0
    while True:
        busy += time.perf_counter() - busy_since
        w = yield V[m] if V.dtype == dtype else V[m].to(dtype)
        busy_since = time.perf_counter()
        if w.dtype != V.dtype:
            w = w.to(V.dtype)
        elif w.untyped_storage().data_ptr() == V.untyped_storage().data_ptr():
            w = w.clone()  # an operator that hands back its input (the identity): w is updated in place
        products += 1
        column = np.zeros(m + 1)
        # Gram-Schmidt in passes over the basis from ``first`` on: the first pass only over the
        # vectors w couples to in exact arithmetic (the last two; every kept one after a
        # restart), then full passes until one no longer cancels most of w (Daniel, Gragg,
        # Kaufman & Stewart 1976: "twice is enough"). Each full pass reads the basis twice,
        # which at scale is the bookkeeping's whole cost.
        first = coupled
        norm = w.norm().item()
        full_passes = 0
        while True:
            block = V[first : m + 1]
            h = torch.mv(block, w, out=coefficients[first : m + 1])
            w.addmv_(block.T, h, alpha=-1)
            column[first:] += h.cpu().numpy()
            before, norm = norm, w.norm().item()
            full_passes += first == 0
            # Twice is enough: a third pass would only reshuffle rounding (and w = 0 at a
            # breakdown cancels every pass).
            if full_passes == 2 or (full_passes == 1 and norm > REORTHOGONALISED * before):
                break
            first = 0
        T[: m + 1, m] = column
        T[m, : m + 1] = column
        beta = norm
        m += 1
        coupled = m - 1

        theta, S = np.linalg.eigh(T[:m, :m])
        scale = np.abs(theta).max()
        # beta |s_mi| is the residual of the exact Lanczos relation; the products themselves
        # carry rounding of about eps(dtype) ||H||, so no residual is reported below that.
        residuals = np.maximum(beta * np.abs(S[m - 1]), rounding * scale)
        low = list(range(min(bottom_k, m)))
        high = list(range(m - 1, m - 1 - min(top_k, m), -1))
        chosen = low + high
        enough = len(low) == bottom_k and len(high) == top_k
        thresholds = tol * np.maximum(np.abs(theta[chosen]), floor * scale)
        met = bool((residuals[chosen] <= thresholds).all())
        # At a breakdown every residual is zero, yet further copies of a repeated eigenvalue
        # may sit outside the invariant subspace found: look there once before stopping. A beta
        # under every wanted threshold is a breakdown to within the tolerance (rounding can keep
        # an exact breakdown's beta a few eps above the test), and is treated as one.
        broke = beta <= max(breakdown * scale, thresholds.min() if thresholds.size else 0.0)
        converged = m == dim or (enough and met and not broke)
        if on_step is not None:
            on_step(products, float(theta[-1]))
        if converged or products >= max_products:
            vectors = None
            if return_eigenvectors:
                ritz = _combine(S[:, chosen], V[:m], eigenvector_dtype or dtype)
                vectors = (list(ritz[len(low) :]), list(ritz[: len(low)]))
            return EigenResult(
                largest=theta[high].tolist(),
                smallest=theta[low].tolist(),
                largest_residuals=residuals[high].tolist(),
                smallest_residuals=residuals[low].tolist(),
                converged=converged,
                products=products,
                restarts=restarts,
                seconds=busy + time.perf_counter() - busy_since,
                eigenvectors=vectors,
                residual_floor=float(rounding * scale),
            )

        if broke:
            # V spans an invariant subspace: its Ritz pairs are exact. Go on in the orthogonal
            # complement.
            _random_orthonormal(generator, V[:m], out=V[m])
        else:
            torch.div(w, beta, out=V[m])
        del w
        if m == basis_size:
            keep = _kept(m, top_k, bottom_k)
            # Thick restart: V <- V S_keep, T <- diag(theta_keep); the coupling of the kept
            # vectors to v_{m+1} (beta S[m-1, keep]) is what the next Gram-Schmidt step finds.
            _restart_in_place(V, m, S[:, keep])
            V[len(keep)] = V[m]
            T[:] = 0.0
            T[: len(keep), : len(keep)] = np.diag(theta[keep])
            m = len(keep)
            coupled = 0
            restarts += 1


def _kept(m: int, top_k: int, bottom_k: int) -> list[int]:
    """Indices (ascending Ritz order) kept at a restart: the wanted ones and half the rest."""
    extra = (m - top_k - bottom_k) // 2
    if top_k and bottom_k:
        keep_bottom = bottom_k + extra // 2
        keep_top = top_k + extra - extra // 2
    else:
        keep_bottom = bottom_k + extra if bottom_k else 0
        keep_top = top_k + extra if top_k else 0
    return list(range(keep_bottom)) + list(range(m - keep_top, m))


def _restart_in_place(V: Tensor, m: int, S_keep: np.ndarray) -> None:
    """V[:k] <- S_keep^T V[:m] (k = S_keep's columns), a block of columns at a time, so that the
    restart needs k x RESTART_CHUNK scratch entries rather than another k basis vectors. In the
    basis dtype: the kept vectors are orthonormal to its rounding, as the basis was."""
    coefficients = _to_torch(S_keep.T, V.device).to(V.dtype)
    k, chunk = coefficients.shape[0], _chunk(V.device)
    for begin in range(0, V.shape[1], chunk):
        V[:k, begin : begin + chunk] = coefficients @ V[:m, begin : begin + chunk]


def _combine(S: np.ndarray, basis: Tensor, dtype: torch.dtype) -> Tensor:
    """The Ritz vectors S^T basis as rows in ``dtype``, formed in float64 a block at a time."""
    coefficients = _to_torch(S.T, basis.device)
    out = torch.empty(coefficients.shape[0], basis.shape[1], dtype=dtype, device=basis.device)
    chunk = _chunk(basis.device)
    for begin in range(0, basis.shape[1], chunk):
        block = basis[:, begin : begin + chunk].to(torch.float64)
        out[:, begin : begin + chunk] = coefficients @ block
    return out


def _random_orthonormal(generator: torch.Generator, basis: Tensor, *, out: Tensor) -> None:
    """Writes into ``out`` a seeded random unit vector orthogonal to the rows of ``basis``."""
    out.copy_(torch.randn(basis.shape[1], generator=generator, dtype=torch.float64))
    for _ in range(2):
        out.addmv_(basis.T, basis @ out, alpha=-1)
    out.div_(out.norm().item())


def _to_torch(array: np.ndarray, device: torch.device) -> Tensor:
    return torch.from_numpy(np.ascontiguousarray(array)).to(device)
