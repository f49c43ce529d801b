"""jachat.v1.ChatService: each RPC is its work and the one frame (edge/calls.py), with gRPC's way of rendering a
failure (a status, edge/grpc/status.py); requests are converted at the edge (protocol.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

import grpc

from jachat.service.domain.request import ChatRequest, ScoreRequest, check_candidates, check_turn_count
from jachat.service.domain.results import Completion
from jachat.service.domain.sampling import SamplingOptions
from jachat.service.edge.calls import Call, Calls, Opening, write_within
from jachat.service.edge.grpc.protocol import (
    CHAT_SERVICE,
    FINISH_REASONS,
    priority_from_pb,
    read_request,
    sampling_from_pb,
    sampling_to_pb,
    timing_to_pb,
    tokenize_response,
    tokens_to_pb,
    turns_from_pb,
    usage_to_pb,
)
from jachat.service.edge.grpc.security import authenticated_tenant
from jachat.service.edge.grpc.status import to_status
from jachat.service.edge.identity import REQUEST_ID_HEADER
from jachat.service.engine.preparation import PreparedRequest
from jachat.v1 import chat_pb2

if TYPE_CHECKING:  # generic in grpc's type stubs only
    Context = grpc.aio.ServicerContext[Any, Any]
R = TypeVar("R")
# What grpc.aio raises when a message is written to a call that is already over: its ExecuteBatchError, which has
# no public name; grpc.aio.InternalError, its public base, is what native code raises when an operation fails.
_CALL_OVER = grpc.aio.InternalError


class ChatServicer:
    """ChatService's methods, registered through protocol.method_handlers (tolerant request parsers); it does not
    subclass the generated servicer, whose signatures assume messages are yielded, not written."""

    def __init__(
        self, calls: Calls, stream_write_timeout: float = 30.0, max_response_bytes: int = 4 * 1024 * 1024
    ) -> None:
        self.calls = calls
        self.max_response_bytes = max_response_bytes
        self.stream_write_timeout = stream_write_timeout

    async def _rpc(self, name: str, context: Context, work: Callable[[Call, Any], Awaitable[R]]) -> R:
        """Run one RPC in the frame: its request id goes back first (x-request-id), then its request is read (in
        the frame, so a caller gone before it arrived is counted too: protocol.method_handlers), and a failure
        becomes its status. gRPC says a call is over with its own error when it is touched after it ended (a write, its
        metadata), often before context.cancelled(): that is the caller gone."""
        opening = Opening(
            "grpc",
            name,
            f"{CHAT_SERVICE}/{name}",
            context.invocation_metadata() or (),
            context.time_remaining(),
            authenticated_tenant.get(),
            gone=(_CALL_OVER,),
        )

        async def run(call: Call) -> R:
            await context.send_initial_metadata(((REQUEST_ID_HEADER, call.request_id),))
            return await work(call, await read_request(context))

        async def render(call: Call, exc: BaseException) -> R:
            status = to_status(exc)
            try:
                await context.abort(status.code, status.details, status.trailing_metadata)
            except _CALL_OVER:  # it ended first (gRPC's deadline beat ours): there is no one to tell
                raise asyncio.CancelledError from None
            raise AssertionError("abort returned")  # pragma: no cover

        return await self.calls.serve(opening, run, render)

    async def _prepare(
        self, request: chat_pb2.GenerateRequest | chat_pb2.GenerateStreamRequest, call: Call
    ) -> PreparedRequest:
        """The cheap checks on the event loop, the queue's room, then preparation on the worker pool."""
        info = self.calls.engine().info
        call.priority = priority_from_pb(request.priority)
        turns = turns_from_pb(request.turns)
        options, explicit_max = sampling_from_pb(request.sampling, info.context_length, info.vocab_size)
        return await self.calls.prepare(call, ChatRequest(turns, options, explicit_max, request.drop_oldest_turns))

    async def Generate(self, requests: object, context: Context) -> chat_pb2.GenerateResponse:
        async def work(call: Call, request: chat_pb2.GenerateRequest) -> chat_pb2.GenerateResponse:
            prepared = await self._prepare(request, call)
            options = request.response
            reply = await self.calls.reply(call, prepared, options.include_stop_sequence, options.token_logprobs)
            return chat_pb2.GenerateResponse(
                text=reply.text,
                finish_reason=FINISH_REASONS[reply.completion.finish_reason],
                usage=usage_to_pb(reply.completion, prepared.prompt.dropped_turns),
                tokens=tokens_to_pb(reply.tokens, call.pieces, options.token_logprobs),
                stop_sequence=reply.completion.stop_sequence,
                timing=timing_to_pb(call.received, reply.completion),
            )

        return await self._rpc("Generate", context, work)

    async def GenerateStream(self, requests: object, context: Context) -> None:
        async def work(call: Call, request: chat_pb2.GenerateStreamRequest) -> None:
            prepared = await self._prepare(request, call)
            options = request.response
            items = self.calls.generate(call, prepared, options.include_stop_sequence, options.token_logprobs)
            try:
                async for item in items:  # every delta has text; the Completion carries the tail's tokens
                    tokens = tokens_to_pb(item.tokens, call.pieces, options.token_logprobs)
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
                    await write_within(context.write(message), self.stream_write_timeout)
            finally:
                await items.aclose()

        await self._rpc("GenerateStream", context, work)

    async def Tokenize(self, requests: object, context: Context) -> chat_pb2.TokenizeResponse:
        async def work(call: Call, request: chat_pb2.TokenizeRequest) -> chat_pb2.TokenizeResponse:
            engine = self.calls.engine()
            prompt = await self.calls.tokenize(call, turns_from_pb(request.turns))
            pieces, limit = engine.tokenizer.pieces, self.max_response_bytes
            return await engine.offload(lambda: tokenize_response(prompt, pieces, limit))

        return await self._rpc("Tokenize", context, work)

    async def Score(self, requests: object, context: Context) -> chat_pb2.ScoreResponse:
        async def work(call: Call, request: chat_pb2.ScoreRequest) -> chat_pb2.ScoreResponse:
            call.priority = priority_from_pb(request.priority)
            check_turn_count(len(request.turns))
            check_candidates(request.candidates)
            scored = await self.calls.score(call, ScoreRequest(turns_from_pb(request.turns), list(request.candidates)))
            return chat_pb2.ScoreResponse(
                prompt_tokens=scored.prompt_tokens,
                candidates=[
                    chat_pb2.CandidateScore(
                        tokens=tokens_to_pb(tokens, call.pieces, True), logprob=sum(t.logprob for t in tokens)
                    )
                    for tokens in scored.candidates
                ],
            )

        return await self._rpc("Score", context, work)

    async def GetModelInfo(self, requests: object, context: Context) -> chat_pb2.GetModelInfoResponse:
        async def work(call: Call, request: chat_pb2.GetModelInfoRequest) -> chat_pb2.GetModelInfoResponse:
            info = self.calls.engine().info
            return chat_pb2.GetModelInfoResponse(
                model_name=info.model_name,
                compute_type=info.compute_type,
                device=info.device,
                vocab_size=info.vocab_size,
                context_length=info.context_length,
                sampling_defaults=sampling_to_pb(SamplingOptions()),
                quantization=info.quantization,
            )

        return await self._rpc("GetModelInfo", context, work)
