"""Curvature of the loss: matrix-free curvature products and what is computed from them.

``operators/`` the curvature matrices as products (base, Hessian, GGN and Fisher, per-sample,
data-parallel) and the registry of curvature names; ``solvers/`` eigenvalues (Lanczos, power
iteration); ``estimators/`` stochastic trace and spectral-density estimates; ``measures/`` the
sharpness measures built on them (sharpness, non-uniformity, epsilon- and adaptive sharpness).
"""
