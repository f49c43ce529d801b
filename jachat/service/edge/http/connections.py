"""The HTTP port's connections: how many are open at once, and how long an idle one is kept.

aiohttp accepts every connection and keeps an idle keep-alive one for an hour: a client that opens a thousand and
sends nothing exhausts the process's file descriptors, and then gRPC health checks, scrapes and every other
accept() fail. Here a connection beyond the cap is closed as soon as it is accepted (the others are unaffected),
and an idle keep-alive connection is closed after KEEPALIVE_SECONDS; the server raises the process's soft
open-file limit to its hard limit at start-up (server.raise_open_file_limit), so the cap, not the limit, decides.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import struct
import termios
from collections.abc import Callable
from typing import Any

log = logging.getLogger("jachat.http")

KEEPALIVE_SECONDS = 15.0


class Admission:
    """Counts the open connections; `protocol(make)` wraps aiohttp's per-connection protocol factory."""

    def __init__(self, cap: int, on_refuse: Callable[[], None] | None = None) -> None:
        self.cap = cap
        self.open = 0
        self.on_refuse = on_refuse

    def protocol(self, make: Callable[[], Any]) -> Callable[[], asyncio.Protocol]:
        return lambda: _Admitted(self, make)


class _Admitted(asyncio.Protocol):
    """One connection: closed at once beyond the cap, else aiohttp's handler behind it, every event forwarded."""

    def __init__(self, admission: Admission, make: Callable[[], Any]) -> None:
        self.admission = admission
        self.make = make
        self.inner: Any = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.admission.open >= self.admission.cap:
            if self.admission.on_refuse is not None:
                self.admission.on_refuse()
            if isinstance(transport, asyncio.Transport):
                transport.abort()  # no reply: it holds no descriptor past this line
            else:  # pragma: no cover - a TCP server's transports are Transports
                transport.close()
            return
        self.admission.open += 1
        self.inner = self.make()
        self.inner.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.inner is not None:
            self.admission.open -= 1
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
