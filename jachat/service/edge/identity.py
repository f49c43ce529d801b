"""Who is calling: the request id, the bearer token and the tenant, resolved once per call for either edge.

- The request id is the caller's `x-request-id` when it is safe to log (at most 128 characters of letters, digits and
  `-_.:/+=@~`, so it cannot forge text in a log line), else a new one; it is sent back with the reply.
- With a token file (`--auth-token-file`), the tenant is the name of the caller's valid bearer token, and a call
  without one is refused before any work. Tokens are compared in constant time, and every token is compared, so
  timing reveals neither a token nor which one matched.
- Without one, the tenant is what the caller names in `x-jachat-tenant` (or, over HTTP, the body's `user`), else
  `default`.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import uuid
from collections.abc import Iterable
from pathlib import Path

from jachat.service.domain.errors import Unauthenticated

log = logging.getLogger("jachat.security")

REQUEST_ID_HEADER = "x-request-id"
TENANT_HEADER = "x-jachat-tenant"
DEFAULT_TENANT = "default"
Headers = Iterable[tuple[str, str | bytes]]

# ids in the formats callers use (UUIDs, W3C trace ids, ULIDs, base64) but no space, quote, bracket or control
# character: a caller's id can never end a log field early or look like another one
_SAFE_REQUEST_ID = re.compile(r"[A-Za-z0-9_.:/+=@~-]{1,128}")
_SAFE_TENANT = re.compile(r"[A-Za-z0-9_.:/+=@~-]{1,64}")


def request_id_from(headers: Headers | None) -> str:
    """The caller's x-request-id when it is safe to log, else a new one."""
    for key, value in headers or ():
        if key.lower() == REQUEST_ID_HEADER and isinstance(value, str) and _SAFE_REQUEST_ID.fullmatch(value):
            return value
    return uuid.uuid4().hex


def tenant_from(headers: Headers | None) -> str:
    """The tenant a caller names in x-jachat-tenant (when auth is off), or `default`."""
    for key, value in headers or ():
        if key.lower() == TENANT_HEADER and isinstance(value, str) and _SAFE_TENANT.fullmatch(value):
            return value
    return DEFAULT_TENANT


def tenant_from_user(user: str) -> str:
    """The tenant an HTTP caller names in the body's `user` (when auth is off): itself when it is a safe label,
    else a stable digest of it (a user id may be an e-mail address or worse; labels and logs get no raw text)."""
    if _SAFE_TENANT.fullmatch(user):
        return user
    return "user-" + hashlib.sha256(user.encode()).hexdigest()[:8]


class WatchedFiles:
    """Files whose contents are re-read when any of them changes: its modification time, size or inode (a file
    rewritten twice within the file system's timestamp resolution still changes size or inode, or both)."""

    def __init__(self, *paths: Path) -> None:
        self.paths = paths
        self._stamp: tuple[tuple[int, int, int], ...] | None = None

    def changed(self) -> bool:
        stamp = tuple((s.st_mtime_ns, s.st_size, s.st_ino) for s in map(os.stat, self.paths))
        if stamp == self._stamp:
            return False
        self._stamp = stamp
        return True


class Tokens:
    """Bearer tokens from a file, one per line: `TOKEN`, or `NAME TOKEN` to name the tenant that uses it (a plain
    token's tenant is `token-` and the start of its sha256). `#` starts a comment line, leading spaces allowed.

    The file is re-read when it changes. A file that goes missing or holds no token keeps the current tokens (an
    operator rewriting it must not lock every client out, nor let everyone in), and says so once per change."""

    def __init__(self, token_file: Path) -> None:
        self.token_file = token_file
        self._watch = WatchedFiles(token_file)
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
        """Re-read the token file if it changed."""
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

    def authenticate(self, headers: Headers | None) -> str | None:
        """The name of the valid bearer token in a call's metadata or headers (after re-reading a changed file),
        or None: refused."""
        self.reload()
        values = [v for k, v in headers or () if k.lower() == "authorization" and isinstance(v, str)]
        if len(values) != 1:
            return None
        scheme, _, given = values[0].partition(" ")
        if scheme.lower() != "bearer" or not given.strip():  # RFC 6750: the scheme is case-insensitive
            return None
        # an HTTP header's bytes that are not UTF-8 arrive as surrogate escapes: compared as the bytes they were
        try:
            presented = given.strip().encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:
            return None
        matches = [hmac.compare_digest(presented, token) for token in self._tokens]
        return next((name for name, match in zip(self._names, matches, strict=True) if match), None)


def tenant_of(headers: Headers | None, tokens: Tokens | None, authenticated: str | None = None) -> str:
    """The calling tenant, resolved once per call. `authenticated`: the tenant a transport has already
    authenticated (gRPC's interceptor refuses strangers before their request is parsed), so the token is not
    compared twice."""
    if tokens is None:
        return tenant_from(headers)
    tenant = authenticated if authenticated is not None else tokens.authenticate(headers)
    if tenant is None:
        raise Unauthenticated("missing or invalid bearer token (Authorization: Bearer ...)")
    return tenant
