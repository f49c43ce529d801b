"""jachat.v1.ChatService: the only code that speaks protobuf. It converts requests to dataclasses, calls the
engine, converts results back, and turns errors into statuses through `errors.to_status`."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from importlib import import_module
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from jachat.v1 import chat_pb2, chat_pb2_grpc
from service.engine import Completion, Engine
from service.errors import (
    DeadlineExceeded,
    FieldViolation,
    InvalidRequest,
    JachatError,
    ModelNotReady,
    ShuttingDown,
    to_status,
)
from service.logs import REQUEST_ID_HEADER, request_id, request_id_from
from service.metrics import Metrics
from service.preparation import MAX_TURNS, ChatRequest, PreparedRequest, Prompt
from service.prompt import Speaker, Turn
from service.sampling import SamplingOptions
from service.scheduler import DEADLINE_SLACK, FinishReason

log = logging.getLogger("jachat.servicer")
# What grpc.aio raises when a message is written to a call that is already over (no public name exists for it).
_CALL_OVER: type[Exception] = getattr(import_module("grpc._cython.cygrpc"), "ExecuteBatchError", RuntimeError)

_SPEAKERS = {chat_pb2.SPEAKER_USER: Speaker.USER, chat_pb2.SPEAKER_SYSTEM: Speaker.SYSTEM}
_FINISH_REASONS = {
    FinishReason.END_OF_TURN: chat_pb2.FINISH_REASON_END_OF_TURN,
    FinishReason.LENGTH: chat_pb2.FINISH_REASON_LENGTH,
    FinishReason.STOP: chat_pb2.FINISH_REASON_STOP,
}
SAMPLING_DEFAULTS = SamplingOptions()
_REJECTIONS = {  # refused before any generation: jachat_rejected_total{reason}
    grpc.StatusCode.INVALID_ARGUMENT: "invalid",
    grpc.StatusCode.RESOURCE_EXHAUSTED: "overloaded",
    grpc.StatusCode.UNAVAILABLE: "unavailable",
}


class MalformedRequest:
    """What the service receives instead of a request whose bytes do not parse as its protobuf message."""

    def __init__(self, type_name: str) -> None:
        self.type_name = type_name


def tolerant_parser(message_type: Any) -> Callable[[bytes], Any]:
    """A request deserializer that never raises: gRPC would answer UNKNOWN with the exception's text."""

    def parse(data: bytes) -> Any:
        try:
            return message_type.FromString(data)
        except DecodeError:
            return MalformedRequest(message_type.DESCRIPTOR.full_name)

    return parse


def check_parsed(request: object) -> None:
    if isinstance(request, MalformedRequest):
        raise InvalidRequest([FieldViolation("request", f"not a valid {request.type_name} message")])


def turns_from_pb(turns: Sequence[chat_pb2.Turn]) -> list[Turn]:
    """Turns of a request, their speakers checked (the other rules are request preparation's)."""
    if len(turns) > MAX_TURNS:  # before looking at any turn
        raise InvalidRequest([FieldViolation("turns", f"{len(turns)} turns; at most {MAX_TURNS}")])
    violations = []
    result = []
    for i, turn in enumerate(turns):
        speaker = _SPEAKERS.get(turn.speaker)
        if speaker is None:
            name = chat_pb2.Speaker.Name(turn.speaker) if turn.speaker in chat_pb2.Speaker.values() else turn.speaker
            violations.append(
                FieldViolation(f"turns[{i}].speaker", f"is {name}; must be SPEAKER_USER or SPEAKER_SYSTEM")
            )
            continue
        result.append(Turn(speaker, turn.text))
    if violations:
        raise InvalidRequest(violations)
    return result


_OPTIONAL_SAMPLING_FIELDS = (
    "max_new_tokens",
    "min_new_tokens",
    "temperature",
    "top_k",
    "top_p",
    "repetition_penalty",
    "no_repeat_ngram_size",
)


def sampling_from_pb(
    params: chat_pb2.SamplingParams, context_length: int = 2048, vocab_size: int = 32000
) -> tuple[SamplingOptions, bool]:
    """Options with unset fields at their defaults, and whether max_new_tokens was set explicitly."""
    given = {name: getattr(params, name) for name in _OPTIONAL_SAMPLING_FIELDS if params.HasField(name)}
    options = dataclasses.replace(SAMPLING_DEFAULTS, **given, stop=tuple(params.stop))
    violations = options.violations(context_length, vocab_size)
    if violations:
        raise InvalidRequest(violations)
    return options, "max_new_tokens" in given


def sampling_to_pb(options: SamplingOptions) -> chat_pb2.SamplingParams:
    fields = {name: getattr(options, name) for name in _OPTIONAL_SAMPLING_FIELDS}
    return chat_pb2.SamplingParams(**fields, stop=list(options.stop))


def usage_to_pb(completion: Completion, dropped_turns: int = 0) -> chat_pb2.Usage:
    return chat_pb2.Usage(
        prompt_tokens=completion.prompt_tokens,
        completion_tokens=completion.completion_tokens,
        dropped_turns=dropped_turns,
    )


class ChatServicer(chat_pb2_grpc.ChatServiceServicer):
    def __init__(
        self, metrics: Metrics, stream_write_timeout: float = 30.0, max_response_bytes: int = 4 * 1024 * 1024
    ) -> None:
        self.metrics = metrics
        self.max_response_bytes = max_response_bytes
        self.stream_write_timeout = stream_write_timeout
        self.engine: Engine | None = None
        self.draining = False
        self.in_flight = 0
        self.idle = asyncio.Event()
        self.idle.set()

    def attach(self, engine: Engine) -> None:
        self.engine = engine

    def _engine(self) -> Engine:
        if self.draining:
            raise ShuttingDown("the server is shutting down; retry on another replica")
        if self.engine is None:
            raise ModelNotReady("the model is still loading; retry shortly")
        return self.engine

    @asynccontextmanager
    async def _rpc(self, name: str, context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
        """The frame of every RPC: its request id (sent back as x-request-id), its log line and metrics, the
        mapping of every error to its status, in one place, and its release, exactly once whatever ends it."""
        started = time.perf_counter()
        remaining = context.time_remaining()
        deadline = None if remaining is None else time.monotonic() + remaining
        rid = request_id_from(context.invocation_metadata())
        # Each RPC runs in a task of its own, with its own copy of the context, so the id is never reset: a
        # stream's generator may be closed from another context, where reset() raises.
        request_id.set(rid)
        code: grpc.StatusCode | None = grpc.StatusCode.OK
        self.in_flight += 1
        self.idle.clear()
        try:
            await context.send_initial_metadata(((REQUEST_ID_HEADER, rid),))
            yield
        except grpc.aio.AbortError:  # the status is already set
            raise
        except (asyncio.CancelledError, GeneratorExit):  # the client cancelled, went away, or its deadline passed
            expired = deadline is not None and time.monotonic() + DEADLINE_SLACK >= deadline
            code = grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED
            raise
        except Exception as exc:
            if not isinstance(exc, JachatError):
                log.exception("%s failed", name)
            status = to_status(exc)
            if status.code in _REJECTIONS:
                self.metrics.rejected.labels(_REJECTIONS[status.code]).inc()
            # abort() sends the status before it raises: record the outcome first, so no caller sees it earlier
            self._record(name, status.code, started)
            code = None
            await context.abort(status.code, status.details, status.trailing_metadata)
        finally:
            self.in_flight -= 1
            if self.in_flight == 0:
                self.idle.set()
            if code is not None:
                self._record(name, code, started)

    def _record(self, name: str, code: grpc.StatusCode, started: float) -> None:
        seconds = time.perf_counter() - started
        self.metrics.requests.labels(name, code.name).inc()
        self.metrics.request_duration.labels(name).observe(seconds)
        log.info(
            "%s %s in %.1f ms",
            name,
            code.name,
            seconds * 1000,
            extra={"rpc": name, "code": code.name, "duration_ms": round(seconds * 1000, 1)},
        )

    async def _prepare(self, request: chat_pb2.GenerateRequest | chat_pb2.GenerateStreamRequest) -> PreparedRequest:
        """The cheap checks on the event loop, the queue's room, then preparation on the worker pool."""
        check_parsed(request)
        engine = self._engine()
        turns = turns_from_pb(request.turns)
        options, explicit_max = sampling_from_pb(request.sampling, engine.info.context_length, engine.info.vocab_size)
        engine.check_capacity()  # a full server refuses before doing any work
        chat = ChatRequest(turns, options, explicit_max, request.drop_oldest_turns)
        return await engine.prepare(chat)

    async def _generate(
        self, request: PreparedRequest, context: grpc.aio.ServicerContext
    ) -> AsyncGenerator[str | Completion, None]:
        engine = self._engine()
        self.metrics.running.inc()
        try:
            stream = engine.stream(
                request.prompt.ids, request.options, request.max_new_tokens, timeout=context.time_remaining()
            )
            try:
                async for item in stream:
                    yield item
            finally:
                await stream.aclose()  # stops the sequence now if the caller left early
        finally:
            self.metrics.running.dec()

    async def Generate(
        self, request: chat_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> chat_pb2.GenerateResponse:
        async with self._rpc("Generate", context):
            prepared = await self._prepare(request)
            parts: list[str] = []
            completion: Completion | None = None
            async for item in self._generate(prepared, context):  # to its end, so its cleanup runs before we reply
                if isinstance(item, Completion):
                    completion = item
                else:
                    parts.append(item)
            if completion is not None:
                return chat_pb2.GenerateResponse(
                    text="".join(parts),
                    finish_reason=_FINISH_REASONS[completion.finish_reason],
                    usage=usage_to_pb(completion, prepared.prompt.dropped_turns),
                )
        raise AssertionError("engine stream ended without a Completion")  # pragma: no cover

    async def GenerateStream(self, request: chat_pb2.GenerateStreamRequest, context: grpc.aio.ServicerContext) -> None:
        async with self._rpc("GenerateStream", context):
            prepared = await self._prepare(request)
            messages = self._generate(prepared, context)
            try:
                async for item in messages:
                    if isinstance(item, Completion):
                        message = chat_pb2.GenerateStreamResponse(
                            finish_reason=_FINISH_REASONS[item.finish_reason],
                            usage=usage_to_pb(item, prepared.prompt.dropped_turns),
                        )
                    else:
                        message = chat_pb2.GenerateStreamResponse(text=item)
                    await self._write(context, message)
            finally:
                await messages.aclose()

    async def _write(self, context: grpc.aio.ServicerContext, message: chat_pb2.GenerateStreamResponse) -> None:
        """Send one stream message; a client that reads nothing for stream_write_timeout seconds (its flow-control
        window stays full) loses the stream, so it stops holding a sequence and counting as running."""
        try:
            await asyncio.wait_for(context.write(message), self.stream_write_timeout)
        except asyncio.TimeoutError:
            raise DeadlineExceeded(
                f"the client read nothing for {self.stream_write_timeout:g} s; the stream was ended"
            ) from None
        except _CALL_OVER:
            # gRPC refuses a write on a call the client already cancelled (or whose deadline passed), often before
            # context.cancelled() says so; its own streaming path reads this error the same way: the caller left
            raise asyncio.CancelledError from None

    async def Tokenize(
        self, request: chat_pb2.TokenizeRequest, context: grpc.aio.ServicerContext
    ) -> chat_pb2.TokenizeResponse:
        async with self._rpc("Tokenize", context):
            check_parsed(request)
            engine = self._engine()
            prompt = await engine.tokenize(turns_from_pb(request.turns))
            return await engine.offload(lambda: self._tokenize_response(prompt, engine.tokenizer.pieces))
        raise AssertionError("unreachable")  # pragma: no cover

    def _tokenize_response(self, prompt: Prompt, pieces: Sequence[str]) -> chat_pb2.TokenizeResponse:
        """Tokenize's reply, refused before it is built when it could exceed the message limit (per token at most
        8 bytes of framing and id besides its piece)."""
        size = len(prompt.text.encode()) + sum(len(pieces[i].encode()) + 8 for i in prompt.ids) + 64
        if size > self.max_response_bytes:
            raise InvalidRequest(
                [
                    FieldViolation(
                        "turns",
                        f"the reply would take up to {size} bytes ({len(prompt.ids)} tokens); at most "
                        f"{self.max_response_bytes} can be sent",
                    )
                ]
            )
        return chat_pb2.TokenizeResponse(
            token_count=len(prompt.ids),
            pieces=[pieces[i] for i in prompt.ids],
            token_ids=prompt.ids,
            prompt=prompt.text,
        )

    async def GetModelInfo(
        self, request: chat_pb2.GetModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> chat_pb2.GetModelInfoResponse:
        async with self._rpc("GetModelInfo", context):
            check_parsed(request)
            info = self._engine().info
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


def method_handlers(servicer: ChatServicer) -> grpc.GenericRpcHandler:
    """ChatService's handlers, as the generated add_ChatServiceServicer_to_server makes them, but with request
    parsers that turn unparseable bytes into INVALID_ARGUMENT instead of UNKNOWN."""
    pb = chat_pb2
    handlers = {
        "Generate": grpc.unary_unary_rpc_method_handler(
            servicer.Generate, tolerant_parser(pb.GenerateRequest), pb.GenerateResponse.SerializeToString
        ),
        "GenerateStream": grpc.unary_stream_rpc_method_handler(
            servicer.GenerateStream,
            tolerant_parser(pb.GenerateStreamRequest),
            pb.GenerateStreamResponse.SerializeToString,
        ),
        "Tokenize": grpc.unary_unary_rpc_method_handler(
            servicer.Tokenize, tolerant_parser(pb.TokenizeRequest), pb.TokenizeResponse.SerializeToString
        ),
        "GetModelInfo": grpc.unary_unary_rpc_method_handler(
            servicer.GetModelInfo, tolerant_parser(pb.GetModelInfoRequest), pb.GetModelInfoResponse.SerializeToString
        ),
    }
    return grpc.method_handlers_generic_handler(CHAT_SERVICE, handlers)


CHAT_SERVICE = chat_pb2.DESCRIPTOR.services_by_name["ChatService"].full_name
