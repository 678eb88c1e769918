"""Stochastic estimates from products: the trace (Hutchinson, Hutch++, XTrace) and the spectral
density (stochastic Lanczos quadrature)."""
