"""jachat.v1.ChatService: one frame per RPC (request id, log line, metrics, status mapping, release), the request
converted at the edge (protocol.py), one request-preparation step and one engine behind it."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import asynccontextmanager
from importlib import import_module
from typing import TYPE_CHECKING, Any

import grpc

from jachat.service.calls import Call, Calls, messages, whole, write_within
from jachat.service.errors import JachatError, to_status
from jachat.service.logs import REQUEST_ID_HEADER, request_id_from, tenant_from
from jachat.service.preparation import ChatRequest, PreparedRequest
from jachat.service.protocol import (
    CHAT_SERVICE,
    FINISH_REASONS,
    SAMPLING_DEFAULTS,
    check_parsed,
    priority_from_pb,
    sampling_from_pb,
    sampling_to_pb,
    timing_to_pb,
    tokenize_response,
    tokens_to_pb,
    turns_from_pb,
    usage_to_pb,
)
from jachat.service.results import DEADLINE_SLACK, Completion, Delta
from jachat.v1 import chat_pb2

log = logging.getLogger("jachat.servicer")
if TYPE_CHECKING:  # generic in grpc's type stubs only
    Context = grpc.aio.ServicerContext[Any, Any]
# What grpc.aio raises when a message is written to a call that is already over (no public name exists for it).
_CALL_OVER: type[Exception] = getattr(import_module("grpc._cython.cygrpc"), "ExecuteBatchError", RuntimeError)


class ChatServicer:
    """ChatService's methods, registered through protocol.method_handlers (tolerant request parsers); it does not
    subclass the generated servicer, whose signatures assume messages are yielded, not written."""

    def __init__(
        self, calls: Calls, stream_write_timeout: float = 30.0, max_response_bytes: int = 4 * 1024 * 1024
    ) -> None:
        self.calls = calls
        self.max_response_bytes = max_response_bytes
        # who the caller is: its bearer token's name (the server sets this when auth is on), else x-jachat-tenant
        self.tenant_of: Callable[[Any], str] = tenant_from
        self.stream_write_timeout = stream_write_timeout

    @asynccontextmanager
    async def _rpc(self, name: str, context: Context) -> AsyncIterator[Call]:
        """The frame of every RPC: its request id (sent back as x-request-id), the mapping of every error to its
        status, in one place, and its end (metrics, log line, span: calls.py), exactly once whatever ends it."""
        remaining = context.time_remaining()
        deadline = None if remaining is None else time.monotonic() + remaining
        metadata = context.invocation_metadata()
        rid = request_id_from(metadata)
        with self.calls.track("grpc", name, rid, metadata, f"{CHAT_SERVICE}/{name}") as call:
            try:
                await context.send_initial_metadata(((REQUEST_ID_HEADER, rid),))
                yield call
                self.calls.end(call, "OK")
            except grpc.aio.AbortError:  # the status is already set
                raise
            except (asyncio.CancelledError, GeneratorExit, _CALL_OVER) as exc:
                # the client cancelled, went away, or its deadline passed; gRPC says so with its own error when the
                # call is touched (written to, its metadata sent) after it ended, often before context.cancelled()
                expired = deadline is not None and time.monotonic() + DEADLINE_SLACK >= deadline
                self.calls.end(call, "DEADLINE_EXCEEDED" if expired else "CANCELLED")
                if isinstance(exc, _CALL_OVER):
                    raise asyncio.CancelledError from None
                raise
            except Exception as exc:
                if not isinstance(exc, JachatError):
                    log.exception("%s failed", name)
                status = to_status(exc)
                # abort() sends the status before it raises: record the outcome first, so no caller sees it earlier
                self.calls.end(call, status.code.name, status.details)
                try:
                    await context.abort(status.code, status.details, status.trailing_metadata)
                except _CALL_OVER:  # it ended first (gRPC's deadline beat ours): there is no one to tell
                    raise asyncio.CancelledError from None

    async def _prepare(
        self, request: chat_pb2.GenerateRequest | chat_pb2.GenerateStreamRequest, call: Call, context: Context
    ) -> PreparedRequest:
        """The cheap checks on the event loop, the queue's room, then preparation on the worker pool."""
        check_parsed(request)
        info = self.calls.engine().info
        call.priority = priority_from_pb(request.priority)
        call.tenant = self.tenant_of(context.invocation_metadata())
        turns = turns_from_pb(request.turns)
        options, explicit_max = sampling_from_pb(request.sampling, info.context_length, info.vocab_size)
        return await self.calls.prepare(call, ChatRequest(turns, options, explicit_max, request.drop_oldest_turns))

    def _generate(
        self, request: PreparedRequest, context: Context, include_stop: bool, call: Call
    ) -> AsyncGenerator[Delta | Completion, None]:
        return self.calls.generate(call, request, context.time_remaining(), include_stop)

    async def Generate(self, request: chat_pb2.GenerateRequest, context: Context) -> chat_pb2.GenerateResponse:
        async with self._rpc("Generate", context) as call:
            prepared = await self._prepare(request, call, context)
            options = request.response
            reply = await whole(self._generate(prepared, context, options.include_stop_sequence, call))
            return chat_pb2.GenerateResponse(
                text=reply.text,
                finish_reason=FINISH_REASONS[reply.completion.finish_reason],
                usage=usage_to_pb(reply.completion, prepared.prompt.dropped_turns),
                tokens=tokens_to_pb(reply.tokens, call.pieces, options.token_logprobs),
                stop_sequence=reply.completion.stop_sequence,
                timing=timing_to_pb(call.received, reply.completion),
            )
        raise AssertionError("unreachable")  # pragma: no cover

    async def GenerateStream(self, request: chat_pb2.GenerateStreamRequest, context: Context) -> None:
        async with self._rpc("GenerateStream", context) as call:
            prepared = await self._prepare(request, call, context)
            options = request.response
            items = self._generate(prepared, context, options.include_stop_sequence, call)
            try:
                async for item, own in messages(items):
                    tokens = tokens_to_pb(own, call.pieces, options.token_logprobs)
                    if isinstance(item, Completion):
                        message = chat_pb2.GenerateStreamResponse(
                            tokens=tokens,
                            finish_reason=FINISH_REASONS[item.finish_reason],
                            usage=usage_to_pb(item, prepared.prompt.dropped_turns),
                            stop_sequence=item.stop_sequence,
                            timing=timing_to_pb(call.received, item),
                        )
                    else:
                        message = chat_pb2.GenerateStreamResponse(text=item.text, tokens=tokens)
                    await self._write(context, message)
            finally:
                await items.aclose()

    async def _write(self, context: Context, message: chat_pb2.GenerateStreamResponse) -> None:
        await write_within(context.write(message), self.stream_write_timeout)

    async def Tokenize(self, request: chat_pb2.TokenizeRequest, context: Context) -> chat_pb2.TokenizeResponse:
        async with self._rpc("Tokenize", context):
            check_parsed(request)
            engine = self.calls.engine()
            prompt = await engine.tokenize(turns_from_pb(request.turns))
            pieces, limit = engine.tokenizer.pieces, self.max_response_bytes
            return await engine.offload(lambda: tokenize_response(prompt, pieces, limit))
        raise AssertionError("unreachable")  # pragma: no cover

    async def GetModelInfo(
        self, request: chat_pb2.GetModelInfoRequest, context: Context
    ) -> chat_pb2.GetModelInfoResponse:
        async with self._rpc("GetModelInfo", context):
            check_parsed(request)
            info = self.calls.engine().info
            return chat_pb2.GetModelInfoResponse(
                model_name=info.model_name,
                compute_type=info.compute_type,
                device=info.device,
                vocab_size=info.vocab_size,
                context_length=info.context_length,
                sampling_defaults=sampling_to_pb(SAMPLING_DEFAULTS),
                quantization=info.quantization,
            )
        raise AssertionError("unreachable")  # pragma: no cover
