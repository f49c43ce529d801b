"""Server-sent events, both routes': a reply streamed as `data:` events, then [DONE]. The headers go with the first
event, so an error before the reply starts still gets its own HTTP status; once it has begun, a failure is an
`error` event (or a hang-up for a client that reads nothing), rendered by `failed` for the frame, which ends the
call (frame.py). Every write must be taken within the write timeout, the last one too: written is not read.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncGenerator, Callable, Sequence
from typing import Any

from aiohttp import web

from jachat.service.domain.errors import WriteStalled
from jachat.service.domain.results import Completion, Delta
from jachat.service.edge.calls import Call, write_within
from jachat.service.edge.http.connections import delivered
from jachat.service.edge.http.request import spell
from jachat.service.edge.http.status import to_http
from jachat.service.edge.identity import REQUEST_ID_HEADER

STREAM = "jachat.stream"  # the request's key for its stream, once one has begun (the frame renders its failures)


class EventStream:
    """Writes a reply as server-sent events; a client that takes nothing for `write_timeout` seconds loses it."""

    def __init__(self, write_timeout: float) -> None:
        self.write_timeout = write_timeout

    async def stream(
        self,
        request: web.Request,
        call: Call,
        replies: AsyncGenerator[Delta | Completion, None],
        opening: Callable[[], Sequence[dict[str, Any]]],
        render: Callable[[Delta | Completion], Sequence[dict[str, Any]]],
    ) -> web.StreamResponse:
        """Server-sent events, either API's: `opening`'s events when the reply starts, `render`'s for each message
        (a delta with text, or the Completion), then [DONE]. The headers go with the first event, so an error
        before the reply starts (the deadline in the queue, a shed batch call, the drain) still gets its own HTTP
        status. The frame ends the call, whatever happens: a failure once the stream has begun is rendered by
        `failed` (an `error` event, or a hang-up for a client that reads nothing)."""
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        response.headers[REQUEST_ID_HEADER] = call.request_id
        request[STREAM] = response  # where the frame's render finds a stream that has begun

        async def started() -> None:  # the first token: the headers and the opening events go out
            await response.prepare(request)
            for event in opening():
                await self.send(response, event)

        try:
            async for item in replies:  # every delta has text; the Completion carries the tail's tokens
                if not response.prepared:
                    await started()
                for event in render(item):
                    await self.send(response, event)
            if not response.prepared:  # nothing to generate (an echoed prompt alone): the opening is the reply
                await started()
        finally:
            await replies.aclose()
        # the reply is whole: a client that hangs up once it has read the last chunk (the openai SDK does, at
        # [DONE]) has everything, so a reset now is not an error (the frame records OK)
        call.answered = True
        await self.write(response, b"data: [DONE]\n\n")
        await response.write_eof()
        # Written is not read: a whole reply fits in the socket buffers, where a client that reads nothing would leave
        # it (kernel memory, for as long as the connection lives). It must be taken within the write timeout too.
        transport = request.transport
        if transport is not None and not await delivered(transport, self.write_timeout):
            raise WriteStalled(f"the client read nothing for {self.write_timeout:g} s; the stream was ended")
        return response

    async def failed(
        self, request: web.Request, response: web.StreamResponse, error: BaseException
    ) -> web.StreamResponse:
        """A failure once the stream has begun (the frame has recorded it): the status line is gone, so the error
        travels as an event; a client that reads nothing is hung up on (a reset frees what is buffered for it)."""
        if isinstance(error, WriteStalled):
            if request.transport is not None:
                request.transport.abort()
            return response
        with contextlib.suppress(ConnectionResetError, WriteStalled):
            await self.send(response, to_http(error, spell).body())
        return response

    async def send(self, response: web.StreamResponse, body: dict[str, Any]) -> None:
        await self.write(response, b"data: " + json.dumps(body, ensure_ascii=False).encode() + b"\n\n")

    async def write(self, response: web.StreamResponse, data: bytes) -> None:
        await write_within(response.write(data), self.write_timeout)
