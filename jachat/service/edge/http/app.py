"""The OpenAI-compatible HTTP API: /v1/chat/completions (JSON or server-sent events), /v1/completions, /v1/models,
/health. This module wires it: the aiohttp application, its routes, the listener behind the connection cap; each
route's work is its own module's (chat.py, completions.py), in the frame every route shares (frame.py).

It runs on aiohttp in the gRPC server's own event loop and process, and shares everything behind the edge with
gRPC through `Calls`: the engine and its scheduler, the queue's limits, request preparation, the drain, the bearer
tokens and tenants, the metrics (api="http") and traces. Why aiohttp: an asyncio-native server that runs as a task
of an existing loop (grpc.aio's), with streaming responses and client-disconnect cancellation built in, and no
framework or ASGI server on top; it is the `http` extra, so a gRPC-only deployment does not carry it.

Bounds, as gRPC's: bodies up to 4 MiB (413 above, also once inflated), read within 30 s (400 after), gzip or
deflate inflated by us off the event loop (body.py), parsed and converted off the event loop above 64 KiB; at most
--max-http-connections connections, a quarter per peer, the slowest displaced when places run short and /health
answered beyond the cap (connections.py), and --max-concurrent-rpcs HTTP calls at once, each taking its place once
its body is in (429 beyond); an idle keep-alive connection is closed after 15 s, and a body a route does not read is
never read; every call ends by --http-request-timeout-seconds, or sooner with the caller's `x-jachat-timeout` (504);
a stream whose client reads nothing for --stream-write-timeout-seconds is ended; a client that disconnects cancels
its call, and its sequence stops.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from jachat.service.domain.errors import Kind, NotFound
from jachat.service.edge.calls import Call, Calls
from jachat.service.edge.http import chat, completions
from jachat.service.edge.http.body import MAX_BODY_BYTES
from jachat.service.edge.http.connections import CONNECTION_SETTINGS, Admission, connection_of, json_errors
from jachat.service.edge.http.frame import HttpFrame
from jachat.service.edge.http.request import unknown_model
from jachat.service.edge.http.response import error_response, json_response, model_body, models_body
from jachat.service.edge.http.sse import EventStream
from jachat.service.edge.http.status import HttpError
from jachat.service.edge.http.tls import ReloadingTLS


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
        self.frame = HttpFrame(calls, max_calls, request_timeout, EventStream(stream_write_timeout))
        self.started = int(time.time())
        self.app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[_json_errors, _probes_see_health])
        self.app.add_routes(
            [
                web.post("/v1/chat/completions", self.chat_completions, expect_handler=self.frame.expect),
                web.post("/v1/completions", self.completions, expect_handler=self.frame.expect),
                web.get("/v1/models", self.models),
                web.get("/v1/models/{model:.+}", self.model),
                web.get("/health", self.health),
            ]
        )
        # A client that disconnects cancels its handler, so its sequence stops at once (calls are drained before the
        # runner stops, so its own wait for handlers is short). aiohttp's own trust in the client is turned off by
        # CONNECTION_SETTINGS (connections.py).
        self.runner = web.AppRunner(self.app, handler_cancellation=True, shutdown_timeout=2.0, **CONNECTION_SETTINGS)
        self.admission = Admission(max_connections, max_connections_per_peer)
        self.listener: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> int:
        await self.runner.setup()
        assert self.runner.server is not None
        loop = asyncio.get_running_loop()
        self.listener = await loop.create_server(
            self.admission.protocol(json_errors(self.runner.server, CONNECTION_SETTINGS)),
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

    # ---- routes ----

    async def health(self, request: web.Request) -> web.Response:
        """Not a call: no auth, no metrics; 200 once the model serves, 503 while it loads, drains or its engine is
        stalled."""
        serving = self.calls.serving
        return json_response({"status": "SERVING" if serving else "NOT_SERVING"}, 200 if serving else 503)

    async def models(self, request: web.Request) -> web.StreamResponse:
        async def work(call: Call) -> web.StreamResponse:
            with self.frame.slot(call, request):
                return json_response(models_body(self.calls.engine().info, self.started))

        return await self.frame.serve(request, "/v1/models", work)

    async def model(self, request: web.Request) -> web.StreamResponse:
        async def work(call: Call) -> web.StreamResponse:
            with self.frame.slot(call, request):
                info = self.calls.engine().info
                if request.match_info["model"] != info.model_name:
                    raise unknown_model(request.match_info["model"], info.model_name)
                return json_response(model_body(info, self.started))

        return await self.frame.serve(request, "/v1/models/{model}", work)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self.frame.serve(
            request, "/v1/chat/completions", lambda call: self.frame.complete(request, call, chat.answer)
        )

    async def completions(self, request: web.Request) -> web.StreamResponse:
        async def work(call: Call) -> web.StreamResponse:
            if not self.completions_on:
                raise NotFound("/v1/completions is turned off on this server (--completions false)")
            return await self.frame.complete(request, call, completions.answer)

        return await self.frame.serve(request, "/v1/completions", work)


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
