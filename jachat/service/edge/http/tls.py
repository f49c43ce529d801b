"""TLS for the HTTP port: the certificate, key and client CA of gRPC's `--tls-*` flags, re-read when they change.

The bearer tokens are the same on both ports, so the HTTP port must not carry them in clear beside an encrypted
gRPC port: with `--tls-cert` the HTTP API speaks TLS too (mutual TLS with `--tls-client-ca`), unless
`--http-plaintext` says plainly that something in front of it terminates TLS. As gRPC's, the files are checked at
each new connection (the TLS handshake's SNI callback): a rotated certificate is served to new connections without
a restart; open ones keep theirs.
"""

from __future__ import annotations

import logging
import ssl
from pathlib import Path

from jachat.service.edge.identity import WatchedFiles

log = logging.getLogger("jachat.http")


class ReloadingTLS:
    """An SSLContext for the listener whose certificate follows the files."""

    def __init__(self, cert: Path, key: Path, client_ca: Path | None) -> None:
        self.cert, self.key, self.client_ca = cert, key, client_ca
        self.files = WatchedFiles(*(p for p in (cert, key, client_ca) if p is not None))
        self.files.changed()
        self.current = self._load()
        self.context = self._load()  # the listener's own; each handshake is handed `current`
        self.context.sni_callback = self._handshake

    def _load(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self.cert, self.key)
        if self.client_ca is not None:
            context.load_verify_locations(cafile=str(self.client_ca))
            context.verify_mode = ssl.CERT_REQUIRED
        return context

    def _handshake(self, connection: ssl.SSLObject, name: str | None, context: ssl.SSLContext) -> None:
        try:
            if self.files.changed():
                log.info("TLS files changed: reloading them for the HTTP port")
                self.current = self._load()
        except (OSError, ssl.SSLError):
            log.exception("cannot reload the TLS files for the HTTP port; keeping the current ones")
        connection.context = self.current
