"""The OpenAI-compatible HTTP API: /v1/chat/completions (JSON or server-sent events), /v1/models, /health.

It runs on aiohttp in the gRPC server's own event loop and process, and shares everything behind the edge with
gRPC through `Calls`: the engine and its scheduler, the queue's limits, request preparation, the drain, the bearer
tokens and tenants, the metrics (api="http") and traces. Why aiohttp: an asyncio-native server that runs as a task
of an existing loop (grpc.aio's), with streaming responses and client-disconnect cancellation built in, and no
framework or ASGI server on top; it is the `http` extra, so a gRPC-only deployment does not carry it.

Bounds, as gRPC's: bodies up to 4 MiB (413 above, also once inflated), read within 30 s (400 after), gzip or
deflate inflated by us off the event loop (body.py), parsed and converted off the event loop above 64 KiB; at most
--max-http-connections connections, a quarter per peer (connections.py), and --max-concurrent-rpcs HTTP calls at
once, each taking its place once its body is in (429 beyond);
an idle keep-alive connection is closed after 15 s, and a body a route does not read is never read; every call ends by
--http-request-timeout-seconds, or sooner with the caller's `x-jachat-timeout` (504); a stream whose client reads
nothing for --stream-write-timeout-seconds is ended; a client that disconnects cancels its call, and its sequence
stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterator, Sequence
from typing import Any, Protocol, TypeVar

from aiohttp import HttpVersion11, web

from jachat.service.domain.errors import (
    FieldViolation,
    InvalidRequest,
    JachatError,
    Kind,
    NotFound,
    Overloaded,
    WriteStalled,
)
from jachat.service.domain.results import Completion, Delta, GeneratedToken, ModelInfo, Priority
from jachat.service.edge.calls import Call, Calls, Opening, messages, write_within
from jachat.service.edge.http import completions
from jachat.service.edge.http.body import MAX_BODY_BYTES, read_body, too_large
from jachat.service.edge.http.connections import (
    KEEPALIVE_SECONDS,
    Admission,
    connection_of,
    delivered,
    json_errors,
)
from jachat.service.edge.http.openai_request import parse_json, parse_request, spell, unknown_model
from jachat.service.edge.http.openai_response import (
    FINISH_REASONS,
    chunk_body,
    completion_body,
    completion_id,
    logprobs_content,
    model_body,
    models_body,
    usage_chunk,
)
from jachat.service.edge.http.status import HttpError, to_http
from jachat.service.edge.http.tls import ReloadingTLS
from jachat.service.edge.identity import REQUEST_ID_HEADER, tenant_from_user, tenant_of

log = logging.getLogger("jachat.http")

TIMEOUT_HEADER = "x-jachat-timeout"


class Parsed(Protocol):
    """What the frame reads of any route's parsed body."""

    @property
    def model(self) -> str: ...
    @property
    def priority(self) -> Priority: ...
    @property
    def user(self) -> str | None: ...


P = TypeVar("P", bound=Parsed)
# a route's answer once its body is in and it holds a call slot: (api, request, call, body) -> response
Answer = Callable[["HttpApi", web.Request, Call, bytes], Awaitable[web.StreamResponse]]
PARSE_OFF_LOOP_BYTES = 64 * 1024  # larger bodies are parsed and converted on the preparation pool, not the loop


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        text=json.dumps(body, ensure_ascii=False), status=status, content_type="application/json", headers=headers
    )


def error_response(error: HttpError, headers: dict[str, str] | None = None) -> web.Response:
    """An error in OpenAI's shape, with the headers its status calls for (Retry-After, WWW-Authenticate)."""
    return json_response(error.body(), error.status, {**(headers or {}), **error.headers()})


class HttpApi:
    def __init__(
        self,
        calls: Calls,
        max_calls: int,
        request_timeout: float,
        stream_write_timeout: float,
        max_connections: int = 1024,
        tls: ReloadingTLS | None = None,
        max_connections_per_peer: int | None = None,
        completions_on: bool = True,
    ) -> None:
        self.calls = calls
        self.completions_on = completions_on  # /v1/completions (--completions): off where turn integrity matters
        self.tls = tls
        self.max_calls, self.request_timeout = max_calls, request_timeout
        self.stream_write_timeout = stream_write_timeout
        self.active = 0
        self.by_tenant: dict[str, int] = {}  # HTTP call slots held per tenant
        self.started = int(time.time())
        self.app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[_json_errors, _probes_see_health])
        self.app.add_routes(
            [
                web.post("/v1/chat/completions", self.chat_completions, expect_handler=self._expect),
                web.post("/v1/completions", self.completions, expect_handler=self._expect),
                web.get("/v1/models", self.models),
                web.get("/v1/models/{model:.+}", self.model),
                web.get("/health", self.health),
            ]
        )
        # A client that disconnects cancels its handler, so its sequence stops at once (calls are drained before the
        # runner stops, so its own wait for handlers is short). aiohttp's own trust in the client is turned off: no
        # inflating on the loop (body.py does it, bounded, off the loop), no lingering read of a body nobody asked
        # for, and idle keep-alive connections closed after KEEPALIVE_SECONDS rather than an hour.
        self.runner = web.AppRunner(
            self.app,
            handler_cancellation=True,
            access_log=None,
            shutdown_timeout=2.0,
            auto_decompress=False,
            lingering_time=0.0,
            keepalive_timeout=KEEPALIVE_SECONDS,
        )
        self.admission = Admission(max_connections, max_connections_per_peer)
        self.listener: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> int:
        await self.runner.setup()
        assert self.runner.server is not None
        loop = asyncio.get_running_loop()
        self.listener = await loop.create_server(
            self.admission.protocol(json_errors(self.runner.server)),
            host,
            port,
            reuse_address=True,
            backlog=128,
            ssl=None if self.tls is None else self.tls.context,
        )
        return int(self.listener.sockets[0].getsockname()[1])

    async def close(self) -> None:
        if self.listener is not None:
            self.listener.close()
        await self.runner.cleanup()

    # ---- the frame of every call ----

    async def _frame(
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
            self._timeout(request, strict=False),
            gone=(ConnectionResetError,),
            spell=spell,
        )

        async def run(call: Call) -> web.StreamResponse:
            response = await work(call)
            response.headers.setdefault(REQUEST_ID_HEADER, call.request_id)
            return response

        async def render(call: Call, exc: BaseException) -> web.StreamResponse:
            return error_response(to_http(exc, spell), {REQUEST_ID_HEADER: call.request_id})

        return await self.calls.serve(opening, run, render)

    @contextlib.contextmanager
    def _slot(self, call: Call, request: web.Request) -> Iterator[None]:
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

    def _timeout(self, request: web.Request, strict: bool = True) -> float:
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

    async def _expect(self, request: web.Request) -> web.StreamResponse | None:
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
        request.writer.output_size = 0  # the reply proper has not begun (as aiohttp's own handler does)
        return None

    # ---- routes ----

    async def health(self, request: web.Request) -> web.Response:
        """Not a call: no auth, no metrics; 200 once the model serves, 503 while it loads, drains or its engine is
        stalled."""
        serving = self.calls.serving
        return json_response({"status": "SERVING" if serving else "NOT_SERVING"}, 200 if serving else 503)

    async def models(self, request: web.Request) -> web.StreamResponse:
        async def work(call: Call) -> web.StreamResponse:
            with self._slot(call, request):
                return json_response(models_body(self.calls.engine().info, self.started))

        return await self._frame(request, "/v1/models", work)

    async def model(self, request: web.Request) -> web.StreamResponse:
        async def work(call: Call) -> web.StreamResponse:
            with self._slot(call, request):
                info = self.calls.engine().info
                if request.match_info["model"] != info.model_name:
                    raise unknown_model(request.match_info["model"], info.model_name)
                return json_response(model_body(info, self.started))

        return await self._frame(request, "/v1/models/{model}", work)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._frame(
            request, "/v1/chat/completions", lambda call: self._complete(request, call, HttpApi._answer)
        )

    async def completions(self, request: web.Request) -> web.StreamResponse:
        async def work(call: Call) -> web.StreamResponse:
            if not self.completions_on:
                raise NotFound("/v1/completions is turned off on this server (--completions false)")
            return await self._complete(request, call, completions.answer)

        return await self._frame(request, "/v1/completions", work)

    async def _complete(self, request: web.Request, call: Call, answer: Answer) -> web.StreamResponse:
        """Either completion route: its body read within the limits, then `answer` in one of the call slots."""
        self._timeout(request)  # a bad x-jachat-timeout is refused (the frame took the server's limit meanwhile)
        engine = self.calls.engine()
        data = await read_body(request, engine.offload)
        with self._slot(call, request):
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

    async def _answer(self, request: web.Request, call: Call, data: bytes) -> web.StreamResponse:
        parsed = await self.parse(call, data, parse_request)
        prepared = await self.calls.prepare(call, parsed.chat)
        if parsed.stream:
            cid, model, usage = completion_id(), parsed.model, parsed.include_usage
            replies = self.calls.generate(call, prepared, parsed.include_stop, parsed.logprobs)

            def opening() -> list[dict[str, Any]]:  # the role chunk
                return [chunk_body(cid, model, {"role": "assistant", "content": ""}, with_usage=usage)]

            def render(item: Delta | Completion, tokens: list[GeneratedToken]) -> list[dict[str, Any]]:
                logprobs = logprobs_content(tokens, call.token_bytes) if parsed.logprobs else None
                if isinstance(item, Delta):
                    return [chunk_body(cid, model, {"content": item.text}, None, logprobs, usage)]
                finish = FINISH_REASONS.get(item.finish_reason, "stop")
                chunks = [chunk_body(cid, model, {}, finish, logprobs, usage)]
                return [*chunks, usage_chunk(cid, model, item)] if usage else chunks

            return await self.stream(request, call, replies, opening, render)
        reply = await self.calls.reply(call, prepared, parsed.include_stop, parsed.logprobs)
        logprobs = logprobs_content(reply.tokens, call.token_bytes) if parsed.logprobs else None
        return json_response(completion_body(completion_id(), parsed.model, reply.text, reply.completion, logprobs))

    async def stream(
        self,
        request: web.Request,
        call: Call,
        replies: AsyncGenerator[Delta | Completion, None],
        opening: Callable[[], Sequence[dict[str, Any]]],
        render: Callable[[Delta | Completion, list[GeneratedToken]], Sequence[dict[str, Any]]],
    ) -> web.StreamResponse:
        """Server-sent events, either API's: `opening`'s events when the reply starts, `render`'s for each message
        (a delta with text, or the Completion), then [DONE]. The headers go with the first event, so an error
        before the reply starts (the deadline in the queue, a shed batch call, the drain) still gets its own HTTP
        status; later errors are an `error` event."""
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        response.headers[REQUEST_ID_HEADER] = call.request_id

        async def started() -> None:  # the first token: the headers and the opening events go out
            await response.prepare(request)
            for event in opening():
                await self._send(response, event)

        try:
            async for item, tokens in messages(replies, started):
                for event in render(item, tokens):
                    await self._send(response, event)
            if not response.prepared:  # nothing to generate (an echoed prompt alone): the opening is the reply
                await started()
        except WriteStalled as exc:  # nothing more can reach this client, not even an error: hang up
            self.calls.end(call, exc.kind, str(exc))
            if request.transport is not None:
                request.transport.abort()  # a reset frees what is buffered for it at once
            return response
        except ConnectionResetError:  # the client went away mid-reply: a cancellation (its sequence stops)
            self.calls.end(call, Kind.CANCELLED)
            return response
        except Exception as exc:
            if not response.prepared:
                raise
            error = to_http(exc, spell)  # the status line is gone: the error travels as an event
            self.calls.end(call, error.kind, error.message)
            with contextlib.suppress(ConnectionResetError):
                await self._send(response, error.body())
        finally:
            await replies.aclose()
        # the reply is whole: a client that hangs up once it has read the last chunk (the openai SDK does, at
        # [DONE]) has everything, so a reset now is not an error
        with contextlib.suppress(ConnectionResetError):
            await self._write(response, b"data: [DONE]\n\n")
            await response.write_eof()
        # Written is not read: a whole reply fits in the socket buffers, where a client that reads nothing would leave
        # it (kernel memory, for as long as the connection lives). It must be taken within the write timeout too.
        transport = request.transport
        try:
            taken = transport is None or await delivered(transport, self.stream_write_timeout)
        except asyncio.CancelledError:  # the client hung up after the whole reply was written (the SDK does, at
            self.calls.end(call, "OK")  # [DONE]): it had its reply; the cancellation goes on up
            raise
        if not taken:
            assert transport is not None
            transport.abort()
            stalled = f"the client read nothing for {self.stream_write_timeout:g} s; the stream was ended"
            self.calls.end(call, Kind.DEADLINE, stalled)
        return response

    async def _send(self, response: web.StreamResponse, body: dict[str, Any]) -> None:
        await self._write(response, b"data: " + json.dumps(body, ensure_ascii=False).encode() + b"\n\n")

    async def _write(self, response: web.StreamResponse, data: bytes) -> None:
        await write_within(response.write(data), self.stream_write_timeout)


@web.middleware
async def _probes_see_health(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """A connection let in beyond the cap (every place is being answered) may ask for /health alone: the
    readiness probe learns the truth, nobody else gets a place that does not exist."""
    connection = connection_of(request)
    if connection is not None and connection.probe and request.path != "/health":
        refusal = HttpError(503, Kind.UNAVAILABLE, "every HTTP connection is in use; retry shortly")
        response = error_response(refusal, {"Retry-After": "1"})
        response.force_close()
        return response
    return await handler(request)


@web.middleware
async def _json_errors(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> Any:
    """aiohttp's own refusals (unknown path, wrong method) in OpenAI's error shape, not as text."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return error_response(HttpError(exc.status, Kind.NOT_FOUND if exc.status == 404 else Kind.INVALID, exc.reason))
