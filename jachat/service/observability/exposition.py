"""The Prometheus /metrics endpoint, served on the event loop.

prometheus-client's own server starts a thread per connection, so idle connections cost threads without bound. This
one is a few coroutines: at most `max_connections` at once, each with `timeout` seconds to send its request (bounded
in size), one response, then the connection closes. A connection that arrives when all places are taken takes the
place of the one that has waited longest without sending its request (a scraper sends at once): idle connections
cannot lock the scrapes out; only when every place is busy answering is the newcomer closed.

A render is reused for `cache_seconds` (--metrics-cache-seconds, 1 s): a storm of scrapers (64 clients, 170 scrapes
a second) cost a render each on the event loop and held every stream and health check behind them; now it costs one
render a period, and a scraper (Prometheus' interval is seconds) sees figures at most that old. Rendering stays on
the loop, which owns the state the collectors read, so no two renders ever overlap.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

MAX_HEADER_LINES = 100
MAX_LINE_BYTES = 8192


class MetricsEndpoint:
    def __init__(
        self,
        registry: CollectorRegistry,
        max_connections: int = 32,
        timeout: float = 10.0,
        cache_seconds: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.registry = registry
        self.cache_seconds, self.clock = cache_seconds, clock
        self._rendered: tuple[float, bytes] | None = None  # (when, the text)
        self.max_connections = max_connections
        self.timeout = timeout
        self.connections = 0
        # connections still waiting for their request, oldest first: the ones a newcomer may displace
        self._waiting: dict[int, asyncio.StreamWriter] = {}
        self._displaced: set[int] = set()
        self._server: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> int:
        """Listen on host:port (0 picks a free port); returns the bound port."""
        self._server = await asyncio.start_server(self._serve, host, port, limit=MAX_LINE_BYTES)
        bound: int = self._server.sockets[0].getsockname()[1]
        return bound

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)

    def _displace_oldest_waiting(self) -> bool:
        if not self._waiting:
            return False
        key = next(iter(self._waiting))
        self._waiting.pop(key).close()
        self._displaced.add(key)
        self.connections -= 1
        return True

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.connections >= self.max_connections and not self._displace_oldest_waiting():
            writer.close()
            return
        self.connections += 1
        key = id(writer)
        self._waiting[key] = writer
        try:
            status, body, content_type = await asyncio.wait_for(self._respond(reader), self.timeout)
            self._waiting.pop(key, None)
            head = (
                f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n"
            )
            writer.write(head.encode("ascii") + body)
            await asyncio.wait_for(writer.drain(), self.timeout)
        except (asyncio.TimeoutError, ConnectionError, asyncio.LimitOverrunError, asyncio.IncompleteReadError):
            pass  # a slow, oversized or vanished client: just close
        finally:
            self._waiting.pop(key, None)
            if key in self._displaced:
                self._displaced.discard(key)  # its place was counted free when it was displaced
            else:
                self.connections -= 1
            writer.close()

    async def _respond(self, reader: asyncio.StreamReader) -> tuple[str, bytes, str]:
        request = (await reader.readuntil(b"\n")).decode("latin-1").split()
        for _ in range(MAX_HEADER_LINES):
            if (await reader.readuntil(b"\n")).strip() == b"":
                break
        else:
            return "431 Request Header Fields Too Large", b"too many header lines\n", "text/plain"
        if len(request) != 3 or request[0] not in ("GET", "HEAD"):
            return "400 Bad Request", b"GET /metrics\n", "text/plain"
        if request[1].split("?")[0] != "/metrics":
            return "404 Not Found", b"try /metrics\n", "text/plain"
        return "200 OK", b"" if request[0] == "HEAD" else self.render(), CONTENT_TYPE_LATEST

    def render(self) -> bytes:
        """The registry's text, rendered again only once the last render is `cache_seconds` old."""
        now = self.clock()
        if self._rendered is None or now - self._rendered[0] >= self.cache_seconds:
            self._rendered = (now, generate_latest(self.registry))
        return self._rendered[1]
