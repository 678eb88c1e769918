"""Eigenvalues of a symmetric operator known only through its products."""
