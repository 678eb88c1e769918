"""XTrace (Epperly, Tropp & Webber, SIMAX 2024): the exchangeable Hutch++.

With m probes w_i and Y = A W = Q R, the i-th estimate takes the trace exactly on the range of
Y without its i-th column, Q_(i), and uses w_i itself for Hutchinson on the complement:

    t_i = tr(Q_(i)^T A Q_(i)) + w_i^T (I - P_(i)) A (I - P_(i)) w_i,   P_(i) = Q_(i) Q_(i)^T.

Every probe serves both the sketch and the residual, which Hutch++ splits between different
vectors. Leaving column i out of Y removes one direction s_i of Q, the i-th column of R^{-T}
normalised, so P_(i) = Q (I - s_i s_i^T) Q^T and all m estimates cost only m x m algebra on top
of the 2m products A W and A Q. The estimate is mean(t_i), its standard error std(t_i)/sqrt(m)
(the paper's error estimate). The adaptive mode grows W block by block, extending the QR
factorisation, so stopping early wastes nothing.

Memory: the estimate needs only m x m matrices besides Q. The probes W are kept as sign bits
(``PackedSigns``) for Q^T W (taken after every block in the adaptive mode, once at the end with
a fixed budget, so each block of signs is unpacked once); w_i^T y_i is taken when y_i arrives, before ``GrowingBasis`` turns Y
into Q in place; H = Q^T A Q grows block by block from Z = A Q_new (A is symmetric, so
Q_new^T Z_old = (Q_old^T Z_new)^T) and Z is dropped. For tr(A^2) the Gram matrix Z^T Z needs
the old Z, which is then kept: one more dim x m block. So the run holds Q (dim x m, the
vectors' dtype) plus dim x m / 8 bytes of signs plus two blocks of ``block_size`` columns in
flight, whatever m is (fixed-budget runs go block by block too).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .probes import Apply, GrowingBasis, PackedSigns, TraceEstimate, TraceSettings, column_dots, mean_and_stderr, reached


def xtrace(apply: Apply, dim: int, settings: TraceSettings) -> TraceEstimate:
    """tr(A) from ``max_products // 2`` probes (at most ``dim``), two products each.

    The probes come ``block_size`` at a time; with ``relative_tolerance`` > 0 the run stops once
    the standard error is at most that fraction of the estimate.
    """
    generator = torch.Generator().manual_seed(settings.seed)
    wanted = min(settings.max_products // 2, dim)
    signs = PackedSigns(generator, dim, settings.device, settings.dtype)
    basis = GrowingBasis(dim, wanted, settings.device, settings.dtype)
    QW = torch.zeros(wanted, wanted, dtype=torch.float64)  # q_i^T w_j
    H = torch.zeros(wanted, wanted, dtype=torch.float64)  # Q^T A Q
    wy = torch.zeros(wanted, dtype=torch.float64)  # w_i^T A w_i
    Z = torch.empty(wanted, dim, dtype=settings.dtype, device=settings.device).T if settings.frobenius else None
    G = torch.zeros(wanted, wanted, dtype=torch.float64) if settings.frobenius else None  # Z^T Z
    result = TraceEstimate(settings.offset, 0.0, "xtrace", 0)
    # An adaptive run needs Q^T W after every block; a fixed budget only once, when each block
    # of signs is unpacked once instead of once per later block.
    adaptive = settings.relative_tolerance > 0
    while basis.size < wanted:
        old = basis.size
        b = min(settings.block_size, wanted - old)
        new = slice(old, old + b)
        W_new = signs.draw(b)
        Y_new = apply(W_new)
        wy[new] = column_dots(W_new, Y_new)
        if not adaptive:
            del W_new  # Q^T W is taken once, at the end
        Q_new = basis.append(Y_new)
        del Y_new
        Q = basis.basis
        if adaptive:
            QW[: old + b, new] = _host(Q.T @ W_new)
            del W_new
            for index in range(len(signs.blocks) - 1):
                QW[new, signs.columns(index)] = _host(Q_new.T @ signs.block(index))
        Z_new = apply(Q_new)
        H[: old + b, new] = _host(Q.T @ Z_new)
        H[new, :old] = H[:old, new].T
        if Z is not None and G is not None:
            Z[:, new] = Z_new
            G[: old + b, new] = _host(Z[:, : old + b].T @ Z_new)
            G[new, :old] = G[:old, new].T
        del Z_new
        m = basis.size
        if not adaptive and m == wanted:
            for index in range(len(signs.blocks)):
                QW[:m, signs.columns(index)] = _host(Q.T @ signs.block(index))
        if adaptive or m == wanted:
            result = _estimates(H[:m, :m], basis.R[:m, :m], QW[:m, :m], wy[:m],
                                G[:m, :m] if G is not None else None, torch.finfo(settings.dtype).eps)
            result.estimate += settings.offset
        if settings.progress is not None:
            settings.progress(2 * m, settings.max_products, result.estimate)
        if reached(result.estimate, result.stderr, m, settings.relative_tolerance):
            break
    return result


def _host(X: Tensor) -> Tensor:
    return X.to("cpu", torch.float64)


def _estimates(H: Tensor, R: Tensor, QW: Tensor, wy: Tensor, G: Tensor | None, eps: float) -> TraceEstimate:
    """The XTrace estimate from the m x m float64 matrices H = Q^T A Q, R (Y = A W = Q R),
    QW = Q^T W, the diagonal wy of W^T A W and, for tr(A^2), G = (A Q)^T (A Q); ``eps`` is the
    vectors' rounding unit."""
    m = H.shape[0]
    H = (H + H.T) / 2
    pivots = R.diagonal().abs()
    if pivots.min() <= m * eps * pivots.max():
        # Y is rank deficient, so (for Rademacher probes, almost surely) range(Q) holds the whole
        # range of A and tr(Q^T A Q) is the trace itself.
        squares = G.trace().item() if G is not None else None
        return TraceEstimate(H.trace().item(), 0.0, "xtrace", 2 * m, squares, 0.0 if G is not None else None)
    eye = torch.eye(m, dtype=R.dtype)
    S = torch.linalg.solve_triangular(R, eye, upper=True).T  # R^{-T}
    S = S / S.norm(dim=0)
    # (I - s_i s_i^T) Q^T w_i: the coordinates of P_(i) w_i in Q, so (I - P_(i)) w_i = w_i - Q c_i.
    C = QW - S * (S * QW).sum(0)
    kept = H.trace() - (S * (H @ S)).sum(0)
    # u^T A u for u = w - Q c: w^T A w - 2 c^T Q^T A w + c^T H c, with Q^T A w_i = Q^T y_i = r_i.
    residual = wy - 2 * (C * R).sum(0) + (C * (H @ C)).sum(0)
    estimate, stderr = mean_and_stderr(kept + residual)
    result = TraceEstimate(estimate, stderr, "xtrace", 2 * m)
    if G is not None:
        # ||A||_F^2 = ||A Q_(i)||_F^2 + ||A (I - P_(i))||_F^2, the second sampled by ||A u_i||^2 with
        # A u_i = y_i - Z c_i: ||y_i||^2 = (R^T R)_ii and y_i^T Z c_i = (R^T H C)_ii as Y = Q R.
        au = (R * R).sum(0) - 2 * (R * (H @ C)).sum(0) + (C * (G @ C)).sum(0)
        samples = G.trace() - (S * (G @ S)).sum(0) + au
        result.frobenius_squared, result.frobenius_squared_stderr = mean_and_stderr(samples)
    return result
