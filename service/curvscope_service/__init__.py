"""curvscope service: curvature analysis of model checkpoints behind a gRPC API."""

import os

# OpenMP threads that spin while waiting make every product crawl when the cores are shared
# (a busy neighbour or our own event loop); passive waiting must be set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
