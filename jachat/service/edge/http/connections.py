"""The HTTP port's connections: how many are open at once, and how long an idle one is kept.

aiohttp accepts every connection and keeps an idle keep-alive one for an hour: a client that opens a thousand and
sends nothing exhausts the process's file descriptors, and then gRPC health checks, scrapes and every other
accept() fail. Here a connection beyond the cap (in all, or for its peer) is closed as soon as it is accepted,
and an idle keep-alive connection is closed after KEEPALIVE_SECONDS. aiohttp's keep-alive timer also closes a new
connection that has not sent a whole request head by then, however slowly it trickles (measured, 2026-11-30). The
server raises the process's soft open-file limit to its hard limit at start-up (server.raise_open_file_limit), so
the cap, not the limit, decides.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import struct
import termios
from collections.abc import Callable
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMethod
from aiohttp.web_protocol import RequestHandler

from jachat.service.domain.errors import Kind
from jachat.service.edge.http.status import HttpError

log = logging.getLogger("jachat.http")

KEEPALIVE_SECONDS = 15.0


class JsonErrorHandler(RequestHandler):
    """aiohttp's per-connection protocol, but a request it cannot parse (a NUL in a header, a bad request line) is
    refused in OpenAI's error shape, as every other client fault is, instead of a plain-text page. aiohttp offers no
    public hook for these replies: they never reach the application. Built by `json_errors(server)`."""

    __slots__ = ()

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if status >= 500 or request.writer.output_size > 0:
            return super().handle_error(request, status, exc, message)
        text = " ".join(str(message or exc or "malformed request").split())[:200]
        # not HTTP at all (a TLS handshake, a scanner) is everyday noise on an open port: debug, as aiohttp logs it
        level = logging.DEBUG if isinstance(exc, BadHttpMethod) else logging.WARNING
        log.log(level, "malformed HTTP request from %s refused: %s", request.remote, text)
        body = HttpError(status, Kind.INVALID, text).body()
        response = web.Response(status=status, text=json.dumps(body), content_type="application/json")
        response.force_close()  # aiohttp's own would too: the rest of what this client sent cannot be trusted
        return response


def json_errors(server: web.Server) -> Callable[[], RequestHandler]:
    """The per-connection protocol factory of `server`, with JsonErrorHandler (the handler aiohttp would make, with
    the same settings)."""
    return lambda: JsonErrorHandler(server, loop=asyncio.get_running_loop(), **server._kwargs)


class Admission:
    """Counts the open connections, in all and per peer address; `protocol(make)` wraps aiohttp's per-connection
    protocol factory. The per-peer share keeps one client from taking every place (behind a gateway, whose
    addresses are the peers, raise it)."""

    def __init__(self, cap: int, per_peer: int | None = None, on_refuse: Callable[[], None] | None = None) -> None:
        self.cap = cap
        self.per_peer = per_peer if per_peer is not None else max(1, cap // 4)
        self.open = 0
        self.by_peer: dict[str, int] = {}
        self.on_refuse = on_refuse

    def admit(self, peer: str) -> bool:
        if self.open >= self.cap or self.by_peer.get(peer, 0) >= self.per_peer:
            if self.on_refuse is not None:
                self.on_refuse()
            return False
        self.open += 1
        self.by_peer[peer] = self.by_peer.get(peer, 0) + 1
        return True

    def release(self, peer: str) -> None:
        self.open -= 1
        left = self.by_peer.pop(peer) - 1
        if left:
            self.by_peer[peer] = left

    def protocol(self, make: Callable[[], Any]) -> Callable[[], asyncio.Protocol]:
        return lambda: _Admitted(self, make)


class _Admitted(asyncio.Protocol):
    """One connection: closed at once beyond the cap, else aiohttp's handler behind it, every event forwarded."""

    def __init__(self, admission: Admission, make: Callable[[], Any]) -> None:
        self.admission = admission
        self.make = make
        self.inner: Any = None
        self.peer = ""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peername = transport.get_extra_info("peername")
        self.peer = str(peername[0]) if isinstance(peername, tuple) and peername else str(peername)
        if not self.admission.admit(self.peer):
            if isinstance(transport, asyncio.Transport):
                transport.abort()  # no reply: it holds no descriptor past this line
            else:  # pragma: no cover - a TCP server's transports are Transports
                transport.close()
            return
        self.inner = self.make()
        self.inner.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.inner is not None:
            self.admission.release(self.peer)
            self.inner.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.inner is not None:
            self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received() if self.inner is not None else None

    def pause_writing(self) -> None:
        if self.inner is not None:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if self.inner is not None:
            self.inner.resume_writing()


def unsent(transport: asyncio.BaseTransport) -> int:
    """Bytes written to this connection that its client has not taken yet: the transport's own buffer and the
    kernel's send queue (unacknowledged bytes: SIOCOUTQ). A client that reads nothing leaves them there."""
    pending = transport.get_write_buffer_size() if isinstance(transport, asyncio.WriteTransport) else 0
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):  # closed meanwhile: nothing more will be sent
            pending += struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0]
    return pending


async def delivered(transport: asyncio.BaseTransport, seconds: float) -> bool:
    """Whether the client takes everything written within `seconds` (checked quickly at first, then every 50 ms)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    pause = 0.001
    while unsent(transport) > 0:
        if loop.time() >= deadline:
            return False
        await asyncio.sleep(pause)
        pause = min(pause * 2, 0.05)
    return True
