"""Transport security and authentication for gRPC.

- TLS (`--tls-cert`, `--tls-key`) and mutual TLS (`--tls-client-ca`: clients must present a certificate signed by
  it). The files are re-read when they change (checked at each new connection), so certificates rotate without a
  restart; connections already open keep their certificate.
- Bearer tokens (`--auth-token-file`, edge/identity.py): every call but health and reflection needs
  `authorization: Bearer <token>`; a call without a valid one gets UNAUTHENTICATED before its request is even
  parsed. The tenant the interceptor found rides to the call's frame (`authenticated_tenant`), so the token is
  compared once per call.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import grpc

from jachat.service.edge.identity import Tokens, WatchedFiles

log = logging.getLogger("jachat.security")

EXEMPT_PREFIXES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)
# the tenant of the call being handled, set by the interceptor around the handler (each RPC runs in its own task)
authenticated_tenant: ContextVar[str | None] = ContextVar("authenticated_tenant", default=None)


def server_credentials(cert: Path, key: Path, client_ca: Path | None) -> grpc.ServerCredentials:
    """TLS credentials that reload the certificate, key and client CA when the files change."""
    files = WatchedFiles(*(p for p in (cert, key, client_ca) if p is not None))

    def load() -> Any:
        ca = client_ca.read_bytes() if client_ca is not None else None
        return grpc.ssl_server_certificate_configuration([(key.read_bytes(), cert.read_bytes())], ca)

    files.changed()
    initial = load()

    def fetch() -> Any:
        try:
            if files.changed():
                log.info("TLS files changed: reloading %s", ", ".join(map(str, files.paths)))
                return load()
        except OSError:
            log.exception("cannot reload the TLS files; keeping the current ones")
        return None

    return grpc.dynamic_ssl_server_credentials(initial, fetch, require_client_authentication=client_ca is not None)


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses every call without a valid bearer token (but health and reflection), before its handler runs."""

    def __init__(self, tokens: Tokens, on_reject: Callable[[], None] | None = None) -> None:
        self.tokens = tokens
        self.on_reject = on_reject

    async def intercept_service(
        self, continuation: Callable[[Any], Awaitable[Any]], details: grpc.HandlerCallDetails
    ) -> Any:
        if details.method.startswith(EXEMPT_PREFIXES):
            return await continuation(details)
        tenant = self.tokens.authenticate(details.invocation_metadata)
        handler = await continuation(details)
        if tenant is not None:
            return _as(tenant, handler)
        if self.on_reject is not None:
            self.on_reject()
        # an unknown method has no handler: deny it all the same, so strangers learn nothing of what exists
        return _denied(handler)


_SHAPES = (
    ("unary_unary", grpc.unary_unary_rpc_method_handler),
    ("unary_stream", grpc.unary_stream_rpc_method_handler),
    ("stream_unary", grpc.stream_unary_rpc_method_handler),
    ("stream_stream", grpc.stream_stream_rpc_method_handler),
)


def _as(tenant: str, handler: Any) -> Any:
    """`handler` with its behaviour run under `authenticated_tenant` = tenant (None stays None: UNIMPLEMENTED)."""
    if handler is None:
        return None
    kind, behaviour = next((kind, getattr(handler, name)) for name, kind in _SHAPES if getattr(handler, name))
    if inspect.isasyncgenfunction(behaviour):  # jachat.v1's behaviours are coroutines: leave any other as it is
        return handler

    async def run(request: Any, context: Any) -> Any:
        authenticated_tenant.set(tenant)
        return await behaviour(request, context)

    return kind(run, handler.request_deserializer, handler.response_serializer)


def _denied(handler: Any) -> Any:
    """A handler of the same shape as `handler` (None: an unknown method) that answers UNAUTHENTICATED without
    running it."""

    async def deny(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await context.abort(
            grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token (authorization: Bearer ...)"
        )

    async def deny_stream(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await deny(request, context)
        yield  # pragma: no cover - abort raised

    # raw bytes in, nothing out: a stranger's request is never even parsed
    if handler is not None and handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(deny_stream)
    return grpc.unary_unary_rpc_method_handler(deny)
