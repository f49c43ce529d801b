"""The HTTP port's connections: how many are open at once, and how long an idle one is kept.

aiohttp accepts every connection and keeps an idle keep-alive one for an hour: a client that opens a thousand and
sends nothing exhausts the process's file descriptors, and then gRPC health checks, scrapes and every other
accept() fail. Here the connections are capped in all and per peer (Admission: a newcomer beyond the cap displaces
the slowest connection not being answered, or is let in for /health alone, or is closed as soon as it is
accepted), and an idle keep-alive connection is closed after KEEPALIVE_SECONDS. aiohttp's keep-alive timer also
closes a new connection that has not sent a whole request head by then, however slowly it trickles (measured,
2026-11-30). The server raises the process's soft open-file limit to its hard limit at start-up
(server.raise_open_file_limit), so the cap, not the limit, decides.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import struct
import termios
import time
from collections.abc import Callable
from dataclasses import dataclass
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
    public hook for these replies: they never reach the application. Built by `json_errors(server)`. `admitted` is
    the connection's place (Admission's), set before it starts."""

    __slots__ = ("admitted",)

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


# What each connection's handler is told (the runner's, and so aiohttp's own handler's; JsonErrorHandler's too):
# no access log; no inflating on the loop (body.py does it, bounded, off the loop); no lingering read of a body
# nobody asked for; an idle keep-alive connection closed after KEEPALIVE_SECONDS rather than an hour.
CONNECTION_SETTINGS: dict[str, Any] = {
    "access_log": None,
    "auto_decompress": False,
    "lingering_time": 0.0,
    "keepalive_timeout": KEEPALIVE_SECONDS,
}


def json_errors(server: web.Server, settings: dict[str, Any]) -> Callable[[], RequestHandler]:
    """The per-connection protocol factory of `server`: JsonErrorHandler with the `settings` the server was made
    with (CONNECTION_SETTINGS), as aiohttp's own factory would make its handler."""
    return lambda: JsonErrorHandler(server, loop=asyncio.get_running_loop(), **settings)


YOUNG_SECONDS = 1.0  # a connection this young is displaced only when no older one can be
PROBE_CONNECTIONS = 32  # connections beyond the cap that may still ask for /health (the readiness probe's)


@dataclass(eq=False)
class Connection:
    """One admitted connection, as the cap sees it: its peer, when it opened, what it has sent, and whether a call
    of its holds a slot (its body is in: it is being answered, and is never displaced)."""

    peer: str
    opened: float
    close: Callable[[], None]
    received: int = 0
    answering: int = 0
    probe: bool = False  # admitted beyond the cap: /health only

    def rate(self, now: float) -> float:
        """Bytes a second it has sent since it opened (a second at least, so a newcomer is not the slowest)."""
        return self.received / max(now - self.opened, 1.0)


class Admission:
    """The open connections, in all and per peer address; `protocol(make)` wraps aiohttp's per-connection protocol
    factory. The per-peer share keeps one client from taking every place (behind a gateway, whose addresses are the
    peers, raise it). When the places run short (in all, or the newcomer's peer's share), the newcomer takes the
    place of the connection, among those not being answered, that has sent the fewest bytes a second: idle and
    trickling clients (a header and a byte of body, a thousand times over) cannot lock honest ones out. When every
    place is being answered, up to PROBE_CONNECTIONS more (an eighth of them per peer) are let in for /health alone
    (the readiness probe must see the truth: the pod is busy, not dead); beyond them a newcomer is closed at once."""

    def __init__(
        self,
        cap: int,
        per_peer: int | None = None,
        probes: int = PROBE_CONNECTIONS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cap = cap
        self.per_peer = per_peer if per_peer else max(1, cap // 4)
        self.probes, self.clock = probes, clock
        self.open: list[Connection] = []  # admitted within the cap, in order of arrival
        self.by_peer: dict[str, int] = {}
        self.probing = 0
        self.probing_by_peer: dict[str, int] = {}  # so one peer cannot take the probes' places either
        self.probes_per_peer = max(1, probes // 8)
        self.displaced = 0

    def admit(self, peer: str, close: Callable[[], None]) -> Connection | None:
        """The newcomer's place (displacing the slowest connection if need be, or a probe's place), or None."""
        connection = Connection(peer, self.clock(), close)
        full = len(self.open) >= self.cap
        if full or self.by_peer.get(peer, 0) >= self.per_peer:
            victim = self._slowest(None if full else peer)
            if victim is not None:
                self.displaced += 1
                self.release(victim)
                victim.close()
            elif self.probing < self.probes and self.probing_by_peer.get(peer, 0) < self.probes_per_peer:
                self.probing += 1
                self.probing_by_peer[peer] = self.probing_by_peer.get(peer, 0) + 1
                connection.probe = True
                return connection
            else:
                return None
        self.open.append(connection)
        self.by_peer[peer] = self.by_peer.get(peer, 0) + 1
        return connection

    def _slowest(self, peer: str | None) -> Connection | None:
        now = self.clock()
        idle = [c for c in self.open if not c.answering and (peer is None or c.peer == peer)]
        # one younger than a second has had no time to send its request: the older ones go first
        return min(idle, key=lambda c: (now - c.opened < YOUNG_SECONDS, c.rate(now)), default=None)

    def release(self, connection: Connection) -> None:
        if connection.probe:
            connection.probe = False
            self.probing -= 1
            left = self.probing_by_peer.pop(connection.peer) - 1
            if left:
                self.probing_by_peer[connection.peer] = left
            return
        if connection not in self.open:
            return  # displaced: released already
        self.open.remove(connection)
        left = self.by_peer.pop(connection.peer) - 1
        if left:
            self.by_peer[connection.peer] = left

    def protocol(self, make: Callable[[], Any]) -> Callable[[], asyncio.Protocol]:
        return lambda: _Admitted(self, make)


def connection_of(request: web.BaseRequest) -> Connection | None:
    """The admitted connection a request came on (None for one that is gone)."""
    protocol = request.protocol
    admitted = getattr(protocol, "admitted", None)
    return admitted if isinstance(admitted, Connection) else None


class _Admitted(asyncio.Protocol):
    """One connection: admitted (or closed at once), then aiohttp's handler behind it, every event forwarded."""

    def __init__(self, admission: Admission, make: Callable[[], Any]) -> None:
        self.admission = admission
        self.make = make
        self.inner: Any = None
        self.connection: Connection | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peername = transport.get_extra_info("peername")
        peer = str(peername[0]) if isinstance(peername, tuple) and peername else str(peername)

        def close() -> None:
            if isinstance(transport, asyncio.Transport):
                transport.abort()  # no reply: it holds no descriptor past this line
            else:  # pragma: no cover - a TCP server's transports are Transports
                transport.close()

        self.connection = self.admission.admit(peer, close)
        if self.connection is None:
            close()
            return
        self.inner = self.make()
        self.inner.admitted = self.connection  # what connection_of(request) finds
        self.inner.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.inner is not None and self.connection is not None:
            self.admission.release(self.connection)
            self.inner.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.inner is not None and self.connection is not None:
            self.connection.received += len(data)
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
