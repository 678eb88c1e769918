"""Domain exceptions of the engine and the service.

The engine raises these; the transport maps each to one gRPC status code in one place
(``curvscope_service.interceptors``). Messages are one line a person can act on.
"""

from __future__ import annotations


class CurvscopeError(Exception):
    """Base class. ``code`` names the gRPC status code the transport answers with."""

    code = "INTERNAL"


class InvalidInput(CurvscopeError):
    """Bad or truncated file, unknown architecture, shapes that do not fit, NaN weights..."""

    code = "INVALID_ARGUMENT"


class NotFound(CurvscopeError):
    """A blob, URI or plugin that does not exist."""

    code = "NOT_FOUND"


class PermissionDenied(CurvscopeError):
    """A path outside the configured model roots."""

    code = "PERMISSION_DENIED"


class ResourceExhausted(CurvscopeError):
    """Queue full, upload over the size limit, a solve over its memory cap."""

    code = "RESOURCE_EXHAUSTED"


class Unimplemented(CurvscopeError):
    """An analysis or option that is not built yet."""

    code = "UNIMPLEMENTED"


class Cancelled(CurvscopeError):
    """The client went away; the work was stopped."""

    code = "CANCELLED"


class DeadlineExceeded(CurvscopeError):
    """The client's deadline passed; the work was stopped."""

    code = "DEADLINE_EXCEEDED"


class Aborted(CurvscopeError):
    """Work stopped from outside the request, not by its input: a solver process killed mid-solve
    (by an operator or the out-of-memory killer). The server is unharmed; a retry may succeed."""

    code = "ABORTED"


class Unavailable(CurvscopeError):
    """The server is shutting down."""

    code = "UNAVAILABLE"
