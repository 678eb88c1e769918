"""Hutch++ (Meyer, Musco, Musco & Woodruff, SOSA 2021): low-rank sketch plus Hutchinson.

With a third of the products the sketch S gives Q = orth(A S), whose range holds the top of the
spectrum; tr(Q^T A Q) takes that part exactly (another third), and Hutchinson estimates the rest,
tr((I - QQ^T) A (I - QQ^T)), whose variance no longer carries the large eigenvalues. For a
spectrum that decays the error falls like 1/m instead of Hutchinson's 1/sqrt(m); a matrix whose
rank is at most the sketch size is estimated exactly.

Memory: Q is the only dim x k block held; A S and A Q pass through ``block_size`` columns at a
time (``GrowingBasis`` orthogonalises each block against the earlier ones as it arrives).
"""

from __future__ import annotations

import torch

from .probes import (Apply, GrowingBasis, TraceEstimate, TraceSettings, column_dots, mean_and_stderr, rademacher,
                     reached)


def hutchpp(apply: Apply, dim: int, settings: TraceSettings) -> TraceEstimate:
    """tr(A) from at most ``max_products`` products: sketch, its trace, residual probes.

    The sketch takes ``max_products // 3`` vectors (at most ``dim``: then the trace is exact).
    With ``relative_tolerance`` > 0 the residual probes stop once the standard error is at most
    that fraction of the estimate; the sketch is always taken whole.
    """
    generator = torch.Generator().manual_seed(settings.seed)
    k = min(settings.max_products // 3, dim)
    sketch = GrowingBasis(dim, k, settings.device, settings.dtype)
    for start in range(0, k, settings.block_size):
        b = min(settings.block_size, k - start)
        sketch.append(apply(rademacher(generator, dim, b, settings.device, settings.dtype)))
    sketched, sketched_squares = settings.offset, 0.0
    for start in range(0, k, settings.block_size):
        Q_b = sketch.Q[:, start : start + settings.block_size]
        AQ_b = apply(Q_b)
        sketched += column_dots(Q_b, AQ_b).sum().item()
        if settings.frobenius:
            sketched_squares += column_dots(AQ_b, AQ_b).sum().item()
        del AQ_b
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
        PG = sketch.project_out(rademacher(generator, dim, b, settings.device, settings.dtype))
        APG = apply(PG)
        # g^T P A P g estimates tr(P A P); ||A P g||^2 estimates tr(A P A) = ||A||_F^2 - ||A Q||_F^2.
        quadratic.append(column_dots(PG, APG))
        if settings.frobenius:
            squares.append(column_dots(APG, APG))
        del PG, APG
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

