"""Protobuf at the edge: requests to dataclasses, results to messages, and the method handlers that parse
tolerantly. Nothing past this module (and the servicer that calls it) sees a protobuf message."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import grpc
from google.protobuf import duration_pb2
from google.protobuf.message import DecodeError

from jachat.service.domain.errors import FieldViolation, InvalidRequest
from jachat.service.domain.request import check_turn_count
from jachat.service.domain.results import Completion, FinishReason, GeneratedToken, Priority
from jachat.service.domain.sampling import FIELDS, SamplingOptions
from jachat.service.engine.preparation import Prompt
from jachat.service.text.prompt import Speaker, Turn
from jachat.v1 import chat_pb2

SPEAKERS = {chat_pb2.SPEAKER_USER: Speaker.USER, chat_pb2.SPEAKER_SYSTEM: Speaker.SYSTEM}
FINISH_REASONS = {
    FinishReason.END_OF_TURN: chat_pb2.FINISH_REASON_END_OF_TURN,
    FinishReason.LENGTH: chat_pb2.FINISH_REASON_LENGTH,
    FinishReason.STOP: chat_pb2.FINISH_REASON_STOP,
}
CHAT_SERVICE = chat_pb2.DESCRIPTOR.services_by_name["ChatService"].full_name


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
        raise InvalidRequest([FieldViolation(("request",), f"not a valid {request.type_name} message")])


def turns_from_pb(turns: Sequence[chat_pb2.Turn]) -> list[Turn]:
    """Turns of a request, their speakers checked (the other rules are request preparation's)."""
    check_turn_count(len(turns))  # before looking at any turn
    violations = []
    result = []
    for i, turn in enumerate(turns):
        speaker = SPEAKERS.get(turn.speaker)
        if speaker is None:
            name = chat_pb2.Speaker.Name(turn.speaker) if turn.speaker in chat_pb2.Speaker.values() else turn.speaker
            violations.append(
                FieldViolation(("turns", i, "speaker"), f"is {name}; must be SPEAKER_USER or SPEAKER_SYSTEM")
            )
            continue
        result.append(Turn(speaker, turn.text))
    if violations:
        raise InvalidRequest(violations)
    return result


def sampling_from_pb(
    params: chat_pb2.SamplingParams, context_length: int = 2048, vocab_size: int = 32000
) -> tuple[SamplingOptions, bool]:
    """Options with unset fields at their defaults, and whether max_new_tokens was set explicitly."""
    given = {f.name: getattr(params, f.proto) for f in FIELDS if params.HasField(f.proto)}  # type: ignore[arg-type]
    seed = params.seed if params.HasField("seed") else None
    options = dataclasses.replace(SamplingOptions(), **given, stop=tuple(params.stop), seed=seed)
    violations = options.violations(context_length, vocab_size)
    if violations:
        raise InvalidRequest(violations)
    return options, "max_new_tokens" in given


def sampling_to_pb(options: SamplingOptions) -> chat_pb2.SamplingParams:
    fields = {f.proto: getattr(options, f.name) for f in FIELDS}
    return chat_pb2.SamplingParams(**fields, stop=list(options.stop), seed=options.seed)


PRIORITIES = {
    chat_pb2.PRIORITY_UNSPECIFIED: Priority.INTERACTIVE,
    chat_pb2.PRIORITY_INTERACTIVE: Priority.INTERACTIVE,
    chat_pb2.PRIORITY_BATCH: Priority.BATCH,
}


def priority_from_pb(value: int) -> Priority:
    if value not in PRIORITIES:
        raise InvalidRequest(
            [FieldViolation(("priority",), f"is {value}; must be PRIORITY_INTERACTIVE or PRIORITY_BATCH (or unset)")]
        )
    return PRIORITIES[chat_pb2.Priority.ValueType(value)]


def tokens_to_pb(tokens: Sequence[GeneratedToken], pieces: Sequence[str], logprobs: bool) -> list[chat_pb2.Token]:
    """Tokens as the API returns them; logprob stays 0 unless the caller asked for it."""
    return [chat_pb2.Token(id=t.id, piece=pieces[t.id], logprob=t.logprob if logprobs else 0.0) for t in tokens]


def _duration(seconds: float) -> duration_pb2.Duration:
    duration = duration_pb2.Duration()
    duration.FromNanoseconds(max(0, int(seconds * 1e9)))
    return duration


def timing_to_pb(received: float, completion: Completion) -> chat_pb2.Timing:
    """The call's timings from its receipt (time.monotonic()); a step never reached counts as the end."""
    end = completion.finished_at or received
    started = completion.started_at or end
    first = completion.first_token_at or end
    return chat_pb2.Timing(
        queued=_duration(started - received),
        time_to_first_token=_duration(max(first, started) - received),
        total=_duration(max(end, first, started) - received),
    )


def tokenize_response(prompt: Prompt, pieces: Sequence[str], max_bytes: int) -> chat_pb2.TokenizeResponse:
    """Tokenize's reply, refused before it is built when it could exceed `max_bytes` (per token at most 8 bytes of
    framing and id besides its piece)."""
    size = len(prompt.text.encode()) + sum(len(pieces[i].encode()) + 8 for i in prompt.ids) + 64
    if size > max_bytes:
        raise InvalidRequest(
            [
                FieldViolation(
                    ("turns",),
                    f"the reply would take up to {size} bytes ({len(prompt.ids)} tokens); at most {max_bytes} can "
                    "be sent",
                )
            ]
        )
    return chat_pb2.TokenizeResponse(
        token_count=len(prompt.ids), pieces=[pieces[i] for i in prompt.ids], token_ids=prompt.ids, prompt=prompt.text
    )


def usage_to_pb(completion: Completion, dropped_turns: int = 0) -> chat_pb2.Usage:
    return chat_pb2.Usage(
        prompt_tokens=completion.prompt_tokens,
        completion_tokens=completion.completion_tokens,
        dropped_turns=dropped_turns,
    )


def method_handlers(servicer: Any) -> grpc.GenericRpcHandler:
    """ChatService's handlers. Each RPC's request is one message, but every method is registered as taking a stream
    of them, so the handler runs from the call's start and reads its request itself (`read_request`), inside the
    call's frame: gRPC's own unary handlers read the request before the application sees the call, and a call whose
    caller goes away (its deadline, a cancel) before the request arrives never reaches the application, so it would
    go uncounted. The parsers turn unparseable bytes into INVALID_ARGUMENT instead of UNKNOWN."""
    pb = chat_pb2
    unary, stream = grpc.stream_unary_rpc_method_handler, grpc.stream_stream_rpc_method_handler
    handlers = {
        "Generate": unary(
            servicer.Generate, tolerant_parser(pb.GenerateRequest), pb.GenerateResponse.SerializeToString
        ),
        "GenerateStream": stream(
            servicer.GenerateStream,
            tolerant_parser(pb.GenerateStreamRequest),
            pb.GenerateStreamResponse.SerializeToString,
        ),
        "Tokenize": unary(
            servicer.Tokenize, tolerant_parser(pb.TokenizeRequest), pb.TokenizeResponse.SerializeToString
        ),
        "GetModelInfo": unary(
            servicer.GetModelInfo, tolerant_parser(pb.GetModelInfoRequest), pb.GetModelInfoResponse.SerializeToString
        ),
        "Score": unary(servicer.Score, tolerant_parser(pb.ScoreRequest), pb.ScoreResponse.SerializeToString),
    }
    return grpc.method_handlers_generic_handler(CHAT_SERVICE, handlers)


async def read_request(context: Any) -> Any:
    """The call's one request message, parsed (any further message is left unread, as gRPC's unary handlers leave
    it)."""
    request = await context.read()
    if request is grpc.aio.EOF:
        raise InvalidRequest([FieldViolation(("request",), "the call ended without its request message")])
    check_parsed(request)
    return request
