"""Data-free weight spectra: per layer the spectral and Frobenius norms, the stable rank, and the
power-law exponent α of the empirical spectral density of WᵀW, as WeightWatcher reports it
(Martin & Mahoney, JMLR 2021): well-trained layers show α in roughly [2, 6].

A Linear weight is one matrix; a convolution kernel (out, in, k_h, k_w) is, as in WeightWatcher,
the k_h·k_w matrices W[:, :, i, j], whose eigenvalues are pooled into one density (the norms
below are those of this set: the largest σ over the slices, and the Frobenius norm of the kernel).
α is the continuous power-law maximum-likelihood fit of Clauset, Shalizi & Newman (SIAM Review
2009) to the tail λ ≥ λ_min, with λ_min chosen to minimise the Kolmogorov-Smirnov distance D.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

MIN_TAIL = 5  # fewer eigenvalues than this in the tail cannot support a fit


@dataclass
class PowerLawFit:
    alpha: float
    xmin: float
    ks_distance: float
    tail: int


def fit_power_law(eigenvalues: np.ndarray) -> PowerLawFit | None:
    """α of p(λ) ∝ λ^(-α) on λ ≥ λ_min, with λ_min minimising the KS distance; None if too few values."""
    x = np.sort(np.asarray(eigenvalues, dtype=np.float64))
    x = x[x > 0]
    n = x.size
    if n < MIN_TAIL:
        return None
    logs = np.log(x)
    # suffix sums of log x give every candidate's MLE in one pass
    suffix = np.cumsum(logs[::-1])[::-1]
    best: PowerLawFit | None = None
    for i in range(n - MIN_TAIL + 1):
        xmin = x[i]
        tail = n - i
        denom = suffix[i] - tail * logs[i]
        if denom <= 0:
            continue  # all tail values equal to xmin
        alpha = 1.0 + tail / denom
        t = x[i:]
        fitted = 1.0 - (t / xmin) ** (1.0 - alpha)
        empirical_hi = np.arange(1, tail + 1) / tail
        empirical_lo = np.arange(0, tail) / tail
        d = float(max(np.abs(fitted - empirical_hi).max(), np.abs(fitted - empirical_lo).max()))
        if best is None or d < best.ks_distance:
            best = PowerLawFit(float(alpha), float(xmin), d, tail)
    return best


def layer_matrices(weight: torch.Tensor) -> list[np.ndarray]:
    w = weight.detach().to("cpu", torch.float64).numpy()
    if w.ndim == 2:
        return [w]
    if w.ndim == 4:
        return [w[:, :, i, j] for i in range(w.shape[2]) for j in range(w.shape[3])]
    if w.ndim == 3:
        return [w[:, :, i] for i in range(w.shape[2])]
    return []


def weight_spectra(module: nn.Module) -> list[dict]:
    """One entry per weight matrix or convolution kernel, in ``named_parameters`` order."""
    layers = []
    for name, parameter in module.named_parameters():
        if parameter.dim() < 2:
            continue  # biases and BatchNorm scales have no spectrum
        matrices = layer_matrices(parameter)
        if not matrices:
            continue
        singular = np.concatenate([np.linalg.svd(m, compute_uv=False) for m in matrices])
        eigenvalues = singular ** 2
        spectral = float(singular.max()) if singular.size else 0.0
        frobenius = float(np.sqrt(eigenvalues.sum()))
        entry = {
            "name": name.removesuffix(".weight"),
            "spectral_norm": spectral,
            "frobenius_norm": frobenius,
            "stable_rank": frobenius ** 2 / spectral ** 2 if spectral > 0 else 0.0,
        }
        fit = fit_power_law(eigenvalues)
        if fit is not None:
            entry.update(alpha=fit.alpha, alpha_xmin=fit.xmin, alpha_ks_distance=fit.ks_distance, alpha_tail=fit.tail)
        layers.append(entry)
    return layers
