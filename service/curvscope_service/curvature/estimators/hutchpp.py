"""Hutch++ (Meyer, Musco, Musco & Woodruff, SOSA 2021): low-rank sketch plus Hutchinson.

With a third of the products the sketch S gives Q = orth(A S), whose range holds the top of the
spectrum; tr(Q^T A Q) takes that part exactly (another third), and Hutchinson estimates the rest,
tr((I - QQ^T) A (I - QQ^T)), whose variance no longer carries the large eigenvalues. For a
spectrum that decays the error falls like 1/m instead of Hutchinson's 1/sqrt(m); a matrix whose
rank is at most the sketch size is estimated exactly.
"""

from __future__ import annotations

import torch

from .probes import Apply, TraceEstimate, TraceSettings, mean_and_stderr, rademacher, reached


def hutchpp(apply: Apply, dim: int, settings: TraceSettings) -> TraceEstimate:
    """tr(A) from at most ``max_products`` products: sketch, its trace, residual probes.

    The sketch takes ``max_products // 3`` vectors (at most ``dim``: then the trace is exact).
    With ``relative_tolerance`` > 0 the residual probes stop once the standard error is at most
    that fraction of the estimate; the sketch is always taken whole.
    """
    generator = torch.Generator().manual_seed(settings.seed)
    device = torch.device(settings.device)
    k = min(settings.max_products // 3, dim)
    Q, _ = torch.linalg.qr(apply(rademacher(generator, dim, k, device)))
    AQ = apply(Q)
    sketched = settings.offset + (Q * AQ).sum().item()
    sketched_squares = (AQ * AQ).sum().item()
    done = 2 * k
    if settings.progress is not None:
        settings.progress(done, settings.max_products, sketched)
    if k == dim:
        # Q is a basis of the whole space: tr(Q^T A Q) is the trace itself.
        return TraceEstimate(sketched, 0.0, "hutchpp", done, sketched_squares if settings.frobenius else None,
                             0.0 if settings.frobenius else None)

    quadratic: list[torch.Tensor] = []
    squares: list[torch.Tensor] = []
    estimate, stderr = sketched, 0.0
    while done < settings.max_products:
        b = min(settings.block_size, settings.max_products - done)
        G = rademacher(generator, dim, b, device)
        PG = G - Q @ (Q.T @ G)
        APG = apply(PG)
        # g^T P A P g estimates tr(P A P); ||A P g||^2 estimates tr(A P A) = ||A||_F^2 - ||A Q||_F^2.
        quadratic.append((PG * APG).sum(0))
        squares.append((APG * APG).sum(0))
        done += b
        residual, stderr = mean_and_stderr(torch.cat(quadratic))
        estimate = sketched + residual
        if settings.progress is not None:
            settings.progress(done, settings.max_products, estimate)
        if reached(estimate, stderr, sum(q.numel() for q in quadratic), settings.relative_tolerance):
            break
    result = TraceEstimate(estimate, stderr, "hutchpp", done)
    if settings.frobenius:
        residual_squares, result.frobenius_squared_stderr = mean_and_stderr(torch.cat(squares))
        result.frobenius_squared = sketched_squares + residual_squares
    return result
