"""ECLipsE-Fast (Xu & Sivaranjani, NeurIPS 2024): a closed-form, layer-by-layer recursion that
picks one LipSDP-Layer multiplier per layer and never solves an SDP.

With activations slope-restricted to [0, β_i] and m_i = β_i / 2, starting from X_0 = I:
  K_i = W_i X_{i-1}⁻¹ W_iᵀ,  l_i = 1 / (2 m_i² λ_max(K_i)),  X_i = l_i I − l_i² m_i² K_i,
and L² = λ_max(W_Lᵀ W_L X_{L-1}⁻¹). Every X_i is positive definite by construction
(its eigenvalues are at least l_i / 2). An activation with slopes in [α, β], α ≥ 0, is also in
[0, β], so the recursion applies to it with that weaker sector; negative slopes (GELU) do not fit.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.linalg

from .network import Slope


def eclipse_fast(weights: list[np.ndarray], activations: list[Slope]) -> float:
    """The ECLipsE-Fast upper bound of an ℓ2 Lipschitz constant; ``weights`` are W_0 … W_L."""
    if any(a.alpha < 0 for a in activations):
        raise ValueError("ECLipsE-Fast needs activation slopes in [0, β]")
    x_inv = np.eye(weights[0].shape[1])
    for w, act in zip(weights[:-1], activations):
        m = act.beta / 2.0
        k = w @ x_inv @ w.T
        k = (k + k.T) / 2.0
        top = float(scipy.linalg.eigvalsh(k)[-1])
        if top == 0.0 or m == 0.0:
            return 0.0  # the layer maps everything to a constant
        l = 1.0 / (2.0 * m * m * top)
        x = l * np.eye(k.shape[0]) - l * l * m * m * k
        x_inv = np.linalg.inv((x + x.T) / 2.0)
    last = weights[-1]
    # λ_max(W_LᵀW_L X⁻¹) = λ_max(W_L X⁻¹ W_Lᵀ): the same nonzero spectrum, and symmetric
    g = last @ x_inv @ last.T
    return math.sqrt(max(float(scipy.linalg.eigvalsh((g + g.T) / 2.0)[-1]), 0.0))
