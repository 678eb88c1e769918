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
"""

from __future__ import annotations

import torch
from torch import Tensor

from .probes import Apply, TraceEstimate, TraceSettings, mean_and_stderr, rademacher, reached


def xtrace(apply: Apply, dim: int, settings: TraceSettings) -> TraceEstimate:
    """tr(A) from ``max_products // 2`` probes (at most ``dim``), two products each.

    With ``relative_tolerance`` > 0 the probes come ``block_size`` at a time and the run stops
    once the standard error is at most that fraction of the estimate.
    """
    generator = torch.Generator().manual_seed(settings.seed)
    device = torch.device(settings.device)
    wanted = min(settings.max_products // 2, dim)
    step = settings.block_size if settings.relative_tolerance > 0 else wanted
    W = Y = Q = Z = torch.zeros(dim, 0, dtype=torch.float64, device=device)
    R = torch.zeros(0, 0, dtype=torch.float64, device=device)
    while Q.shape[1] < wanted:
        b = min(step, wanted - Q.shape[1])
        W_new = rademacher(generator, dim, b, device)
        Y_new = apply(W_new)
        # Extend Y = Q R by the new columns: block Gram-Schmidt against Q, twice, then QR.
        coefficients = Q.T @ Y_new
        rest = Y_new - Q @ coefficients
        correction = Q.T @ rest
        rest -= Q @ correction
        Q_new, R_new = torch.linalg.qr(rest)
        R = torch.cat([
            torch.cat([R, coefficients + correction], dim=1),
            torch.cat([R.new_zeros(b, R.shape[1]), R_new], dim=1),
        ])
        W, Y, Q = torch.cat([W, W_new], 1), torch.cat([Y, Y_new], 1), torch.cat([Q, Q_new], 1)
        Z = torch.cat([Z, apply(Q_new)], 1)
        result = _estimates(W, Y, Q, R, Z, settings.frobenius)
        result.estimate += settings.offset
        if settings.progress is not None:
            settings.progress(2 * Q.shape[1], settings.max_products, result.estimate)
        if reached(result.estimate, result.stderr, Q.shape[1], settings.relative_tolerance):
            break
    return result


def _estimates(W: Tensor, Y: Tensor, Q: Tensor, R: Tensor, Z: Tensor, frobenius: bool) -> TraceEstimate:
    """The XTrace estimate from probes W, Y = A W = Q R and Z = A Q (all float64)."""
    m = Q.shape[1]
    H = Q.T @ Z
    H = (H + H.T) / 2
    pivots = R.diagonal().abs()
    if pivots.min() <= m * torch.finfo(torch.float64).eps * pivots.max():
        # Y is rank deficient, so (for Rademacher probes, almost surely) range(Q) holds the whole
        # range of A and tr(Q^T A Q) is the trace itself.
        squares = (Z * Z).sum().item()
        return TraceEstimate(H.trace().item(), 0.0, "xtrace", 2 * m, squares if frobenius else None,
                             0.0 if frobenius else None)
    eye = torch.eye(m, dtype=R.dtype, device=R.device)
    S = torch.linalg.solve_triangular(R, eye, upper=True).T  # R^{-T}
    S = S / S.norm(dim=0)
    # (I - s_i s_i^T) Q^T w_i: the coordinates of P_(i) w_i in Q, so (I - P_(i)) w_i = w_i - Q c_i.
    QW = Q.T @ W
    C = QW - S * (S * QW).sum(0)
    kept = H.trace() - (S * (H @ S)).sum(0)
    # u^T A u for u = w - Q c: w^T A w - 2 c^T Q^T A w + c^T H c, with Q^T A w_i = Q^T y_i = r_i.
    residual = (W * Y).sum(0) - 2 * (C * R).sum(0) + (C * (H @ C)).sum(0)
    estimate, stderr = mean_and_stderr(kept + residual)
    result = TraceEstimate(estimate, stderr, "xtrace", 2 * m)
    if frobenius:
        # ||A||_F^2 = ||A Q_(i)||_F^2 + ||A (I - P_(i))||_F^2, the second sampled by ||A u_i||^2.
        ZS = Z @ S
        AU = Y - Z @ C
        samples = (Z * Z).sum() - (ZS * ZS).sum(0) + (AU * AU).sum(0)
        result.frobenius_squared, result.frobenius_squared_stderr = mean_and_stderr(samples)
    return result
