"""Model checkpoints (torch.export .pt2, safetensors + architecture spec, plugins) and data batches.

Nothing here unpickles a user's file; ``pt2_archive`` reads a ``.pt2`` without torch touching the file.
"""

from curvscope_service.loading.checkpoint import (
    LoadedModel,
    describe_model,
    detect_format,
    known_architectures,
    load_model,
)
from curvscope_service.loading.compatibility import validate_pair
from curvscope_service.loading.data import LoadedData, load_data
from curvscope_service.loading.sequential import LAYER_TYPES, save_sequential

__all__ = [
    "LAYER_TYPES",
    "LoadedData",
    "LoadedModel",
    "describe_model",
    "detect_format",
    "known_architectures",
    "load_data",
    "load_model",
    "save_sequential",
    "validate_pair",
]
