"""Server interceptors: bearer-token auth, and the one place that maps domain exceptions to
gRPC status codes (timing every RPC into a ``*_seconds`` histogram with its status code)."""

from __future__ import annotations

import hmac
import logging
import time
import uuid
from typing import Any, Awaitable, Callable

import grpc
from grpc import aio
from prometheus_client import Histogram

from .errors import CurvscopeError

log = logging.getLogger(__name__)

RPC_SECONDS = Histogram(
    "curvscope_rpc_seconds", "Wall time of gRPC calls, by method and status code.", ["method", "code"],
    buckets=(0.005, 0.02, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900, 3600),
)

# Probes and tooling need these without a token (a kubelet has none).
PUBLIC_METHOD_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


def _wrap(handler: grpc.RpcMethodHandler, wrap_behavior: Callable[[Any, bool], Any]) -> grpc.RpcMethodHandler:
    """Rebuild a method handler with its behavior wrapped, whatever its streaming kind."""
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(
            wrap_behavior(handler.unary_unary, False), handler.request_deserializer, handler.response_serializer)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(
            wrap_behavior(handler.unary_stream, True), handler.request_deserializer, handler.response_serializer)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(
            wrap_behavior(handler.stream_unary, False), handler.request_deserializer, handler.response_serializer)
    return grpc.stream_stream_rpc_method_handler(
        wrap_behavior(handler.stream_stream, True), handler.request_deserializer, handler.response_serializer)


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

        def wrap_behavior(behavior: Any, streaming: bool) -> Any:
            if streaming:
                async def stream_behavior(request: Any, context: aio.ServicerContext) -> Any:
                    started = time.perf_counter()
                    code = grpc.StatusCode.OK
                    try:
                        async for response in behavior(request, context):
                            yield response
                    except BaseException as error:  # noqa: BLE001 - mapped below, re-raised when not ours
                        code = await _abort_for(error, context, method)
                    finally:
                        RPC_SECONDS.labels(method, _code_name(code, context)).observe(time.perf_counter() - started)
                return stream_behavior

            async def unary_behavior(request: Any, context: aio.ServicerContext) -> Any:
                started = time.perf_counter()
                code = grpc.StatusCode.OK
                try:
                    return await behavior(request, context)
                except BaseException as error:  # noqa: BLE001
                    code = await _abort_for(error, context, method)
                finally:
                    RPC_SECONDS.labels(method, _code_name(code, context)).observe(time.perf_counter() - started)
            return unary_behavior

        return _wrap(handler, wrap_behavior)


def _code_name(code: grpc.StatusCode, context: aio.ServicerContext) -> str:
    if code == grpc.StatusCode.OK and context.code() not in (None, grpc.StatusCode.OK):
        code = context.code()
    return code.name


async def _abort_for(error: BaseException, context: aio.ServicerContext, method: str) -> grpc.StatusCode:
    """Abort the call for ``error``; re-raise what is not an error of the request."""
    if isinstance(error, CurvscopeError):
        status = _status_of(error)
        await context.abort(status, str(error).splitlines()[0] if str(error) else status.name)
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
