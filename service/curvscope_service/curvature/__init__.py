"""Curvature of the loss: matrix-free Hessian products and the analyses built on them."""

from .hessian import HessianOperator
from .hessian_eigen import compute_hessian_eigen
from .lanczos import EigenResult, lanczos
from .power_iteration import PowerIterationResult, power_iteration

__all__ = [
    "EigenResult",
    "HessianOperator",
    "PowerIterationResult",
    "compute_hessian_eigen",
    "lanczos",
    "power_iteration",
]
