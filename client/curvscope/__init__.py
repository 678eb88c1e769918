"""curvscope thin client: talk to a curvscope server (grpcio + protobuf only)."""

from .client import Client, CurvscopeError, build_request
from .quick import analyze
from .report import Report, json_schema

__version__ = "0.1.0"
__all__ = ["Client", "CurvscopeError", "Report", "analyze", "build_request", "json_schema", "__version__"]
