"""Transport security and authentication.

- TLS (`--tls-cert`, `--tls-key`) and mutual TLS (`--tls-client-ca`: clients must present a certificate signed by
  it). The files are re-read when they change (checked at each new connection), so certificates rotate without a
  restart; connections already open keep their certificate.
- Bearer tokens (`--auth-token-file`: one token per line, re-read when the file changes): every call but health
  and reflection needs `authorization: Bearer <token>`; tokens are compared in constant time; a call without a
  valid one gets UNAUTHENTICATED before any model work.
"""

from __future__ import annotations

import hashlib
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


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    """Bearer tokens from a file, one per line: `TOKEN`, or `NAME TOKEN` to name the tenant that uses it (a plain
    token's tenant is `token-` and the start of its sha256). `#` starts a comment line, leading spaces allowed.

    The file is re-read when it changes. A file that goes missing or holds no token keeps the current tokens (an
    operator rewriting it must not lock every client out, nor let everyone in), and says so once per change."""

    def __init__(self, token_file: Path, on_reject: Callable[[], None] | None = None) -> None:
        self.token_file = token_file
        self.on_reject = on_reject
        self._watch = _Watched(token_file)
        self._tokens: list[bytes] = []
        self._names: list[str] = []
        self._problem: str | None = None
        self._watch.changed()
        self._names, self._tokens = self._read()
        if not self._tokens:
            raise ValueError(f"{self.token_file} holds no token")

    def _read(self) -> tuple[list[str], list[bytes]]:
        lines = (line.split() for line in self.token_file.read_text(encoding="utf-8").splitlines())
        entries = [fields for fields in lines if fields and not fields[0].startswith("#") and len(fields) <= 2]
        names = [f[0] if len(f) == 2 else "token-" + hashlib.sha256(f[0].encode()).hexdigest()[:8] for f in entries]
        return names, [f[-1].encode() for f in entries]

    def reload(self) -> None:
        """Re-read the token file if it changed (every call does this first)."""
        try:
            if not self._watch.changed():
                return
            names, tokens = self._read()
        except (OSError, UnicodeDecodeError) as exc:
            self._keep(f"cannot read {self.token_file} ({exc.__class__.__name__}: {exc})")
            return
        if not tokens:
            self._keep(f"{self.token_file} holds no token")
            return
        self._names, self._tokens, self._problem = names, tokens, None
        log.info("re-read %s: %d tokens", self.token_file, len(tokens))

    def _keep(self, problem: str) -> None:
        if problem != self._problem:  # once per new problem, not once per call
            log.warning("%s; keeping the current %d tokens", problem, len(self._tokens))
        self._problem = problem

    def authenticate(self, metadata: Any) -> str | None:
        """The tenant of a call's metadata (or HTTP headers) after re-reading a changed file, or None: refused."""
        self.reload()
        return self.tenant(metadata)

    def _authorized(self, metadata: Any) -> bool:
        return self.tenant(metadata) is not None

    def tenant_or_default(self, metadata: Any) -> str:
        """The calling tenant: its token's name (a call without a valid token never gets this far)."""
        return self.tenant(metadata) or "default"

    def tenant(self, metadata: Any) -> str | None:
        """The name of the valid bearer token the call carries, or None."""
        values = [v for k, v in metadata or () if k == "authorization" and isinstance(v, str)]
        if len(values) != 1:
            return None
        scheme, _, given = values[0].partition(" ")
        if scheme.lower() != "bearer" or not given.strip():  # RFC 6750: the scheme is case-insensitive
            return None
        # constant time, and every token is compared, so timing reveals neither a token nor which one matched
        matches = [hmac.compare_digest(given.strip().encode(), token) for token in self._tokens]
        return next((name for name, match in zip(self._names, matches, strict=True) if match), None)

    async def intercept_service(
        self, continuation: Callable[[Any], Awaitable[Any]], details: grpc.HandlerCallDetails
    ) -> Any:
        if details.method.startswith(EXEMPT_PREFIXES):
            return await continuation(details)
        self.reload()
        if self._authorized(details.invocation_metadata):
            return await continuation(details)
        if self.on_reject is not None:
            self.on_reject()
        # an unknown method has no handler: deny it all the same, so strangers learn nothing of what exists
        return _denied(await continuation(details))


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
