"""curvscope service: curvature analysis of model checkpoints behind a gRPC API."""

__version__ = "0.1.0"
