"""The analyses this server implements, in the order a request runs them.

Add an analysis by writing a module with an ``ANALYSIS`` and listing it here; nothing else in
the engine or the servicer changes.
"""

from . import adaptive_sharpness, epsilon_sharpness, hessian_density, hessian_eigen, hessian_trace, lipschitz, non_uniformity, sharpness, weight_spectra
from .base import Analysis, AnalysisContext, EngineLimits

ANALYSES: dict[str, Analysis] = {
    module.ANALYSIS.name: module.ANALYSIS
    for module in (hessian_eigen, hessian_trace, hessian_density, sharpness, non_uniformity, epsilon_sharpness, adaptive_sharpness, lipschitz, weight_spectra)
}

__all__ = ["ANALYSES", "Analysis", "AnalysisContext", "EngineLimits"]
