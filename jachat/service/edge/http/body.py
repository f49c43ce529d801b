"""A request's body: read within its limits, and its Content-Encoding undone by us, off the event loop, never past
the size limit.

aiohttp would inflate a compressed body on the event loop as it arrives, for any route, before anyone is
authenticated, and keep reading (and inflating) a body the handler never read after the reply has gone. So the
server turns that off (`auto_decompress=False`, no lingering read), and a body is only read by a route that wants it,
after the caller is known: at most MAX_BODY_BYTES as sent, inflated on the preparation pool to at most
MAX_BODY_BYTES (413 beyond), gzip or deflate only (415 for any other coding).
"""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import Awaitable, Callable
from typing import TypeVar

from aiohttp import web

from jachat.service.domain.errors import FieldViolation, InvalidRequest
from jachat.service.edge.http.status import BodyTooLarge, UnsupportedEncoding

MAX_BODY_BYTES = 4 * 1024 * 1024
BODY_READ_TIMEOUT = 30.0
MAX_GZIP_MEMBERS = 16  # a client compresses its body once; thousands of tiny members are an attack on the CPU
CODINGS = ("gzip", "x-gzip", "deflate")
T = TypeVar("T")
Offload = Callable[[Callable[[], T]], Awaitable[T]]


def too_large(what: str = "the body") -> BodyTooLarge:
    return BodyTooLarge([FieldViolation(("body",), f"{what} is over {MAX_BODY_BYTES} bytes")])


def coding_of(request: web.Request) -> str | None:
    """The body's one content coding (None: identity), or UnsupportedEncoding."""
    codings = [c.strip().lower() for c in request.headers.get("Content-Encoding", "").split(",")]
    codings = [c for c in codings if c and c != "identity"]
    if not codings:
        return None
    if len(codings) == 1 and codings[0] in CODINGS:
        return codings[0]
    shown = ", ".join(codings)[:64]
    raise UnsupportedEncoding(
        [FieldViolation(("content-encoding",), f"is {shown!r}; the body may be sent as is, gzip or deflate")]
    )


async def read_body(request: web.Request, offload: Offload[bytes]) -> bytes:
    """The whole body as the client meant it: read within BODY_READ_TIMEOUT, inflated on `offload` (the
    preparation pool) when it is compressed."""
    coding = coding_of(request)  # refused before a byte of the body is read
    if (request.content_length or 0) > MAX_BODY_BYTES:  # refused before reading it (a chunked one: while)
        raise too_large()
    try:
        data = await asyncio.wait_for(request.read(), BODY_READ_TIMEOUT)
    except asyncio.TimeoutError:  # a client that trickles its body holds a connection, not the server
        raise InvalidRequest(
            [FieldViolation(("body",), f"not received within {BODY_READ_TIMEOUT:g} s of the headers")]
        ) from None
    except web.HTTPRequestEntityTooLarge:
        raise too_large() from None
    if coding is None:
        return data
    return await offload(lambda: inflate(data, coding, MAX_BODY_BYTES))


def inflate(data: bytes, coding: str, limit: int) -> bytes:
    """Undo gzip (up to MAX_GZIP_MEMBERS members) or deflate (zlib-wrapped, or raw as some clients send it),
    producing at most `limit` bytes: the work is bounded by the limit, not by the compression ratio."""
    try:
        if coding == "deflate":
            try:
                return _inflate_one(data, zlib.MAX_WBITS, limit)[0]
            except zlib.error:
                return _inflate_one(data, -zlib.MAX_WBITS, limit)[0]
        out = b""
        rest = data
        for _ in range(MAX_GZIP_MEMBERS):
            chunk, rest = _inflate_one(rest, 16 + zlib.MAX_WBITS, limit - len(out))
            out += chunk
            if not rest:
                return out
    except zlib.error as exc:
        raise InvalidRequest([FieldViolation(("body",), f"not valid {coding} data ({exc})")]) from None
    raise InvalidRequest([FieldViolation(("body",), f"more than {MAX_GZIP_MEMBERS} gzip members")])


def _inflate_one(data: bytes, wbits: int, room: int) -> tuple[bytes, bytes]:
    """One compressed stream: its output (at most `room` bytes) and what follows it."""
    inflater = zlib.decompressobj(wbits)
    out = inflater.decompress(data, room + 1)
    if len(out) > room or inflater.unconsumed_tail:
        raise too_large("the body, inflated,")
    if not inflater.eof:
        raise InvalidRequest([FieldViolation(("body",), "the compressed body is cut short")])
    return out, inflater.unused_data
