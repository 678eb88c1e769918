"""Server interceptors: bearer-token auth, and the one place that maps domain exceptions to
gRPC status codes, counts and times every RPC by method and status code (``*_seconds``), and
gives each call a request id for the logs.

The error-mapping interceptor goes first (outermost), so the calls that auth refuses are
counted and logged too.
"""

from __future__ import annotations

import hmac
import logging
import re
import time
import uuid
from typing import Any, Awaitable, Callable

import grpc
from grpc import aio

from curvscope.client import RETRY_SAFE_METADATA

from .errors import Aborted, CurvscopeError, InvalidInput
from .logging_setup import REQUEST_ID
from .metrics import REQUESTS, RPC_SECONDS

log = logging.getLogger(__name__)

REQUEST_ID_HEADER = "x-request-id"
# A client's id is echoed into logs and metadata: keep it short and printable.
_CLIENT_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")

# Probes and tooling need these without a token (a kubelet has none).
PUBLIC_METHOD_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
# Errors after which the same request may be sent again as it is: their status carries the
# trailing metadata ``curvscope-retry-safe: 1``, and the client retries them.
RETRY_SAFE_ERRORS = (Aborted,)


def _wrap(handler: grpc.RpcMethodHandler, wrap_behavior: Callable[[Any, bool], Any],
          deserializer: Callable[[bytes], Any] | None = None) -> grpc.RpcMethodHandler:
    """Rebuild a method handler with its behavior wrapped (and optionally its request
    deserializer replaced), whatever its streaming kind."""
    deserializer = deserializer or handler.request_deserializer
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(
            wrap_behavior(handler.unary_unary, False), deserializer, handler.response_serializer)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(
            wrap_behavior(handler.unary_stream, True), deserializer, handler.response_serializer)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(
            wrap_behavior(handler.stream_unary, False), deserializer, handler.response_serializer)
    return grpc.stream_stream_rpc_method_handler(
        wrap_behavior(handler.stream_stream, True), deserializer, handler.response_serializer)


class _Undecodable:
    """Stands for request bytes that did not parse: grpc would answer UNKNOWN for a deserializer
    that raises; the behavior turns this into INVALID_ARGUMENT instead."""


_UNDECODABLE = _Undecodable()


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception:  # noqa: BLE001 - DecodeError and friends: bytes from outside
            return _UNDECODABLE
    return deserialize


def _decoded(request: Any) -> Any:
    if request is _UNDECODABLE:
        raise InvalidInput("the request is not a valid message for this method; are client and server "
                           "on the same API version?")
    return request


async def _decoded_stream(requests: Any) -> Any:
    async for request in requests:
        yield _decoded(request)


def _status_of(error: CurvscopeError) -> grpc.StatusCode:
    return getattr(grpc.StatusCode, error.code, grpc.StatusCode.INTERNAL)


class ErrorMappingInterceptor(aio.ServerInterceptor):
    """Domain exceptions -> status code and one-line message; anything else -> INTERNAL with an
    id to find the traceback in the server's log (never the traceback itself)."""

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        metadata = dict(handler_call_details.invocation_metadata or ())
        offered = metadata.get(REQUEST_ID_HEADER, "")
        # Health probes come every few seconds: count them, do not log them.
        quiet = method.startswith(("/grpc.health.v1.Health/", "/grpc.reflection."))
        request_streaming = handler.request_streaming

        def wrap_behavior(behavior: Any, streaming: bool) -> Any:
            if streaming:
                async def stream_behavior(request: Any, context: aio.ServicerContext) -> Any:
                    started = _begin(context, offered)
                    code = grpc.StatusCode.OK
                    try:
                        request = _decoded_stream(request) if request_streaming else _decoded(request)
                        async for response in behavior(request, context):
                            yield response
                    except BaseException as error:  # noqa: BLE001 - mapped below, re-raised when not ours
                        code = grpc.StatusCode.CANCELLED  # unless _abort_for sets one on the context
                        await _abort_for(error, context, method)
                    finally:
                        _end(method, code, context, started, quiet)
                return stream_behavior

            async def unary_behavior(request: Any, context: aio.ServicerContext) -> Any:
                started = _begin(context, offered)
                code = grpc.StatusCode.OK
                try:
                    request = _decoded_stream(request) if request_streaming else _decoded(request)
                    return await behavior(request, context)
                except BaseException as error:  # noqa: BLE001
                    code = grpc.StatusCode.CANCELLED
                    await _abort_for(error, context, method)
                finally:
                    _end(method, code, context, started, quiet)
            return unary_behavior

        return _wrap(handler, wrap_behavior, _tolerant(handler.request_deserializer))


def _begin(context: aio.ServicerContext, offered: str) -> float:
    # Each call runs in its own task, so the id set here is this call's alone.
    request_id = offered if _CLIENT_REQUEST_ID.fullmatch(offered) else uuid.uuid4().hex[:16]
    REQUEST_ID.set(request_id)
    context.set_trailing_metadata(((REQUEST_ID_HEADER, request_id),))
    return time.perf_counter()


def _end(method: str, code: grpc.StatusCode, context: aio.ServicerContext, started: float, quiet: bool) -> None:
    seconds = time.perf_counter() - started
    name = _code_name(code, context)
    REQUESTS.labels(method, name).inc()
    RPC_SECONDS.labels(method, name).observe(seconds)
    if not quiet:
        log.info("%s %s %.3f s", method, name, seconds, extra={"method": method, "code": name, "seconds": seconds})


def _code_name(code: grpc.StatusCode, context: aio.ServicerContext) -> str:
    # An abort (ours or auth's) leaves its code on the context; a cancelled call has none.
    if context.code() not in (None, grpc.StatusCode.OK):
        code = context.code()
    return code.name


async def _abort_for(error: BaseException, context: aio.ServicerContext, method: str) -> None:
    """Abort the call for ``error`` (always raises); re-raise what is not an error of the request."""
    if isinstance(error, CurvscopeError):
        status = _status_of(error)
        trailing = tuple(context.trailing_metadata() or ())  # the request id
        if isinstance(error, RETRY_SAFE_ERRORS):
            trailing += ((RETRY_SAFE_METADATA, "1"),)
        await context.abort(status, str(error).splitlines()[0] if str(error) else status.name, trailing)
    if isinstance(error, (aio.AbortError, GeneratorExit)) or not isinstance(error, Exception):
        raise error  # already aborted, or cancellation of the call: not ours to map
    incident = uuid.uuid4().hex[:12]
    log.error("internal error %s in %s", incident, method, exc_info=error)
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error {incident}; the server's log has the details")
    raise AssertionError("unreachable")  # context.abort raises


class TokenAuthInterceptor(aio.ServerInterceptor):
    """Bearer tokens in the ``authorization`` metadata; none -> UNAUTHENTICATED, a wrong one ->
    PERMISSION_DENIED. Health and reflection stay open for probes."""

    def __init__(self, tokens: list[str]):
        self._tokens = [token.encode() for token in tokens if token]

    def _allowed(self, presented: str) -> bool:
        candidate = presented.encode()
        # Compare against every token in constant time so timing reveals nothing.
        return any([hmac.compare_digest(candidate, token) for token in self._tokens])

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(PUBLIC_METHOD_PREFIXES):
            return handler
        metadata = dict(handler_call_details.invocation_metadata or ())
        header = metadata.get("authorization", "")
        if not header:
            return _refusal(handler, grpc.StatusCode.UNAUTHENTICATED,
                            "this server needs a token: pass --token-file or set CURVSCOPE_TOKEN")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not self._allowed(token.strip()):
            return _refusal(handler, grpc.StatusCode.PERMISSION_DENIED, "the token was not accepted by this server")
        return handler


def _refusal(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    def wrap_behavior(_behavior: Any, streaming: bool) -> Any:
        if streaming:
            async def refuse_stream(_request: Any, context: aio.ServicerContext) -> Any:
                await context.abort(code, message)
                yield  # pragma: no cover - makes this an async generator
            return refuse_stream

        async def refuse(_request: Any, context: aio.ServicerContext) -> Any:
            await context.abort(code, message)
        return refuse

    return _wrap(handler, wrap_behavior)
