"""Curvature matrices as matrix-free products: the operator base and protocol, the Hessian,
GGN/Fisher, per-sample and data-parallel operators, and the registry of curvature names."""
