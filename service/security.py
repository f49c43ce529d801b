"""Transport security and authentication.

- TLS (`--tls-cert`, `--tls-key`) and mutual TLS (`--tls-client-ca`: clients must present a certificate signed by
  it). The files are re-read when they change (checked at each new connection), so certificates rotate without a
  restart; connections already open keep their certificate.
- Bearer tokens (`--auth-token-file`: one token per line, re-read when the file changes): every call but health
  and reflection needs `authorization: Bearer <token>`; tokens are compared in constant time; a call without a
  valid one gets UNAUTHENTICATED before any model work.
"""

from __future__ import annotations

import hmac
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc

log = logging.getLogger("jachat.security")

EXEMPT_PREFIXES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)


class _Watched:
    """A set of files whose contents are re-read when any of their modification times changes."""

    def __init__(self, *paths: Path) -> None:
        self.paths = paths
        self._stamp: tuple[float, ...] | None = None

    def changed(self) -> bool:
        stamp = tuple(os.stat(p).st_mtime_ns for p in self.paths)
        if stamp == self._stamp:
            return False
        self._stamp = stamp
        return True


def server_credentials(cert: Path, key: Path, client_ca: Path | None) -> grpc.ServerCredentials:
    """TLS credentials that reload the certificate, key and client CA when the files change."""
    files = _Watched(*(p for p in (cert, key, client_ca) if p is not None))

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


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    def __init__(self, token_file: Path, on_reject: Callable[[], None] | None = None) -> None:
        self.token_file = token_file
        self.on_reject = on_reject
        self._watch = _Watched(token_file)
        self._tokens: list[bytes] = []
        self._reload()

    def _reload(self) -> None:
        if self._watch.changed():
            lines = self.token_file.read_text(encoding="utf-8").splitlines()
            self._tokens = [t.strip().encode() for t in lines if t.strip() and not t.startswith("#")]
            if not self._tokens:
                raise ValueError(f"{self.token_file} holds no token")

    def _authorized(self, metadata: Any) -> bool:
        with_prefix = [v for k, v in metadata or () if k == "authorization" and isinstance(v, str)]
        if len(with_prefix) != 1 or not with_prefix[0].startswith("Bearer "):
            return False
        given = with_prefix[0][len("Bearer ") :].encode()
        # constant time, and every token is compared, so timing reveals neither a token nor which one matched
        return sum(hmac.compare_digest(given, token) for token in self._tokens) > 0

    async def intercept_service(
        self, continuation: Callable[[Any], Awaitable[Any]], details: grpc.HandlerCallDetails
    ) -> Any:
        if details.method.startswith(EXEMPT_PREFIXES):
            return await continuation(details)
        try:
            self._reload()
        except (OSError, ValueError):
            log.exception("cannot re-read %s; keeping the current tokens", self.token_file)
        if self._authorized(details.invocation_metadata):
            return await continuation(details)
        if self.on_reject is not None:
            self.on_reject()
        return _denied(await continuation(details))


def _denied(handler: Any) -> Any:
    """A handler of the same shape as `handler` that answers UNAUTHENTICATED without running it."""

    async def deny(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(
            grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token (authorization: Bearer ...)"
        )

    async def deny_stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await deny(request, context)
        yield  # pragma: no cover - abort raised

    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(
            deny_stream, handler.request_deserializer, handler.response_serializer
        )
    return grpc.unary_unary_rpc_method_handler(deny, handler.request_deserializer, handler.response_serializer)
