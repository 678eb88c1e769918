"""Girard-Hutchinson trace estimation with Rademacher probes: the reference estimator.

For Rademacher z (independent +-1 entries) E[z^T A z] = tr(A) and E[||A z||^2] = tr(A^2); the
mean of m samples has standard error std / sqrt(m), with variance 2 (||A||_F^2 - sum_i a_ii^2)
per sample, so a diagonal A is estimated exactly.
"""

from __future__ import annotations

import torch

from .probes import Apply, TraceEstimate, TraceSettings, column_dots, mean_and_stderr, rademacher, reached


def hutchinson(apply: Apply, dim: int, settings: TraceSettings) -> TraceEstimate:
    """tr(A) from at most ``max_products`` probes, drawn ``block_size`` at a time.

    With ``relative_tolerance`` > 0 it stops after the first block whose standard error is at
    most that fraction of the estimate (from ``MIN_ADAPTIVE_SAMPLES`` probes on).
    """
    generator = torch.Generator().manual_seed(settings.seed)
    quadratic: list[torch.Tensor] = []
    squares: list[torch.Tensor] = []
    done = 0
    while done < settings.max_products:
        k = min(settings.block_size, settings.max_products - done)
        Z = rademacher(generator, dim, k, settings.device, settings.dtype)
        AZ = apply(Z)
        quadratic.append(column_dots(Z, AZ))
        if settings.frobenius:
            squares.append(column_dots(AZ, AZ))
        del Z, AZ
        done += k
        estimate, stderr = mean_and_stderr(torch.cat(quadratic))
        estimate += settings.offset
        if settings.progress is not None:
            settings.progress(done, settings.max_products, estimate)
        if reached(estimate, stderr, done, settings.relative_tolerance):
            break
    result = TraceEstimate(estimate, stderr, "hutchinson", done)
    if settings.frobenius:
        result.frobenius_squared, result.frobenius_squared_stderr = mean_and_stderr(torch.cat(squares))
    return result
