"""The HTTP edge's frame of a call, every route's: the call described to the one frame of both edges
(edge/calls.py's `Calls.serve`, which ends every call), an error rendered in OpenAI's shape (or, once a stream has
begun, as sse.py renders it), the request id on every answer; the call slots (--max-concurrent-rpcs HTTP calls,
taken once a body is in, half of them at most per tenant with tokens); the caller's timeout header; Expect:
100-continue; the body read within the limits and parsed (off the event loop above 64 KiB).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Awaitable, Callable, Iterator
from typing import Protocol, TypeVar

from aiohttp import HttpVersion11, web

from jachat.service.domain.errors import FieldViolation, InvalidRequest, JachatError, Kind, Overloaded
from jachat.service.domain.results import ModelInfo, Priority
from jachat.service.edge.calls import Call, Calls, Opening
from jachat.service.edge.http.body import MAX_BODY_BYTES, read_body, too_large
from jachat.service.edge.http.connections import connection_of
from jachat.service.edge.http.request import parse_json, spell, unknown_model
from jachat.service.edge.http.response import error_response
from jachat.service.edge.http.sse import STREAM, EventStream
from jachat.service.edge.http.status import HttpError, to_http
from jachat.service.edge.identity import REQUEST_ID_HEADER, tenant_from_user, tenant_of

TIMEOUT_HEADER = "x-jachat-timeout"
PARSE_OFF_LOOP_BYTES = 64 * 1024  # larger bodies are parsed and converted on the preparation pool, not the loop


class Parsed(Protocol):
    """What the frame reads of any route's parsed body."""

    @property
    def model(self) -> str: ...
    @property
    def priority(self) -> Priority: ...
    @property
    def user(self) -> str | None: ...


P = TypeVar("P", bound=Parsed)
# a route's answer once its body is in and it holds a call slot: (frame, request, call, body) -> response
Answer = Callable[["HttpFrame", web.Request, Call, bytes], Awaitable[web.StreamResponse]]


class HttpFrame:
    def __init__(self, calls: Calls, max_calls: int, request_timeout: float, events: EventStream) -> None:
        self.calls = calls
        self.events = events
        self.max_calls, self.request_timeout = max_calls, request_timeout
        self.active = 0
        self.by_tenant: dict[str, int] = {}  # HTTP call slots held per tenant

    async def serve(
        self, request: web.Request, method: str, work: Callable[[Call], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        """One call in the frame (edge/calls.py): the HTTP call limit, then `work`; a failure becomes its HTTP
        status and OpenAI's error body, and every answer carries the request id."""
        headers = request.headers.items()
        # a client that hangs up (even while its body is being read) has cancelled its call: not a server error
        opening = Opening(
            "http",
            method,
            f"{request.method} {method}",
            headers,
            self.timeout(request, strict=False),
            gone=(ConnectionResetError,),
            spell=spell,
        )

        async def run(call: Call) -> web.StreamResponse:
            response = await work(call)
            response.headers.setdefault(REQUEST_ID_HEADER, call.request_id)
            return response

        async def render(call: Call, exc: BaseException) -> web.StreamResponse:
            stream = request.get(STREAM)
            if isinstance(stream, web.StreamResponse) and stream.prepared:
                return await self.events.failed(request, stream, exc)
            return error_response(to_http(exc, spell), {REQUEST_ID_HEADER: call.request_id})

        return await self.calls.serve(opening, run, render)

    @contextlib.contextmanager
    def slot(self, call: Call, request: web.Request) -> Iterator[None]:
        """One of the --max-concurrent-rpcs HTTP call slots, taken once the call's body is in: a client that
        trickles its body holds one connection (capped per peer), never a slot the other callers need. With bearer
        tokens, a tenant (a token) holds at most half of the slots, so one valid token cannot shut the others out.
        While it holds one, its connection is being answered: a newcomer never displaces it (connections.py)."""
        if self.active >= self.max_calls:
            raise Overloaded(f"{self.max_calls} HTTP calls are in progress; retry shortly", 1.0)
        share = max(1, self.max_calls // 2)
        tenant = call.tenant  # as known now (a body's `user` may name it later, without tokens)
        held = self.by_tenant.get(tenant, 0)
        if self.calls.tokens is not None and held >= share:
            raise Overloaded(f"this tenant already has {held} HTTP calls in progress (its share); retry shortly", 1.0)
        self.active += 1
        self.by_tenant[tenant] = held + 1
        connection = connection_of(request)
        if connection is not None:
            connection.answering += 1
        try:
            yield
        finally:
            if connection is not None:
                connection.answering -= 1
            self.active -= 1
            left = self.by_tenant.pop(tenant) - 1
            if left:
                self.by_tenant[tenant] = left

    def timeout(self, request: web.Request, strict: bool = True) -> float:
        """The call's time limit: the server's, or less when the caller asks for less."""
        text = request.headers.get(TIMEOUT_HEADER)
        if text is None:
            return self.request_timeout
        try:
            asked = float(text)
        except ValueError:
            asked = math.nan
        if not 0 < asked < math.inf:
            if not strict:
                return self.request_timeout
            raise InvalidRequest([FieldViolation((TIMEOUT_HEADER,), f"is {text[:32]!r}; must be seconds, above 0")])
        return min(asked, self.request_timeout)

    async def expect(self, request: web.Request) -> web.StreamResponse | None:
        """`Expect: 100-continue`: the client waits for our word before it sends its body, so a body over the limit
        or a caller without a valid token is answered at once (413, 401), never invited to upload. aiohttp's own
        handler said 100 Continue to everyone."""
        if request.headers.get("Expect", "").lower() != "100-continue" or request.version != HttpVersion11:
            return error_response(HttpError(417, Kind.INVALID, "only Expect: 100-continue is understood"))
        try:
            if (request.content_length or 0) > MAX_BODY_BYTES:
                raise too_large()
            tenant_of(request.headers.items(), self.calls.tokens)  # the frame's own check, done early
        except JachatError as exc:
            return error_response(to_http(exc, spell))
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # the reply has not begun (an aiohttp.abc attribute; aiohttp does so too)
        return None

    async def complete(self, request: web.Request, call: Call, answer: Answer) -> web.StreamResponse:
        """Either completion route: its body read within the limits, then `answer` in one of the call slots."""
        self.timeout(request)  # a bad x-jachat-timeout is refused (the frame took the server's limit meanwhile)
        engine = self.calls.engine()
        data = await read_body(request, engine.offload)
        with self.slot(call, request):
            return await answer(self, request, call, data)

    async def parse(self, call: Call, data: bytes, parser: Callable[[object, ModelInfo], P]) -> P:
        """A route's body, parsed and converted by `parser`, for the model served; the call learns its priority and
        (without tokens) its tenant from it."""
        engine = self.calls.engine()
        info = engine.info

        def convert() -> P:
            return parser(parse_json(data), info)

        # a large body is parsed and converted on the preparation pool: its cost grows with what the client sent
        # (a 4 MiB body can hold 150,000 content parts), and the event loop serves everyone
        parsed = await engine.offload(convert) if len(data) > PARSE_OFF_LOOP_BYTES else convert()
        if parsed.model != info.model_name:
            raise unknown_model(parsed.model, info.model_name)
        call.priority = parsed.priority
        if self.calls.tokens is None and parsed.user:
            call.tenant = tenant_from_user(parsed.user)
        return parsed
