"""``weight_spectra``: data-free per-layer norms, stable rank and WeightWatcher's power-law α."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import InvalidInput
from ..lipschitz.weight_spectra import weight_spectra
from .base import Analysis, AnalysisContext, EngineLimits


@dataclass(frozen=True)
class WeightSpectraSpec:
    """No options."""


def normalize(spec: WeightSpectraSpec, limits: EngineLimits) -> WeightSpectraSpec:
    return spec


def run(context: AnalysisContext, spec: WeightSpectraSpec) -> dict[str, Any]:
    layers = weight_spectra(context.model.module)
    if not layers:
        raise InvalidInput("the model has no weight matrix or convolution kernel to analyse")
    return {"layers": layers}


ANALYSIS = Analysis(name="weight_spectra", spec=WeightSpectraSpec, normalize=normalize, run=run, needs_data=False, per_layer=False)
