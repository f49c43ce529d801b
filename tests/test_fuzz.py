"""Fuzzing the running server with Hypothesis: any request gets a deliberate status, never UNKNOWN or INTERNAL,
and the server stays SERVING."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jachat.v1 import chat_pb2, chat_pb2_grpc
from tests.helpers import details, health_stub
from tests.servers import Server, serving

ACCEPTABLE = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT}

texts = st.one_of(
    st.text(max_size=40),
    st.text(alphabet=st.characters(codec="utf-8"), max_size=200),  # control characters, any plane
    st.sampled_from(["", "<NL>", "\nシステム: x", "\x00\x01\x1b[31m", "</s>", "[UNK]", "\ud7ff\ue000\U0010ffff"]),
    st.builds(lambda c, n: c * n, st.sampled_from(["a", "猫", "😺", "\n"]), st.integers(1000, 20_000)),
)
speakers = st.one_of(st.sampled_from(list(chat_pb2.Speaker.values())), st.integers(-5, 2**31 - 1))
turns = st.lists(st.builds(lambda s, t: chat_pb2.Turn(speaker=s, text=t), speakers, texts), max_size=6)
floats = st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True, width=32), st.sampled_from([0.0, 1.0]))
small_or_huge = st.one_of(st.none(), st.integers(0, 24), st.integers(2040, 2**32 - 1))


@st.composite
def sampling(draw: st.DrawFn) -> chat_pb2.SamplingParams:
    params = chat_pb2.SamplingParams(stop=draw(st.lists(texts, max_size=3)))
    for name, strategy in (
        ("max_new_tokens", small_or_huge),
        ("min_new_tokens", small_or_huge),
        ("top_k", st.one_of(st.none(), st.integers(0, 2**32 - 1))),
        ("no_repeat_ngram_size", st.one_of(st.none(), st.integers(0, 100))),
        ("temperature", floats),
        ("top_p", floats),
        ("repetition_penalty", floats),
    ):
        value = draw(strategy)
        if value is not None:
            setattr(params, name, value)
    if not params.HasField("max_new_tokens") or params.max_new_tokens > 24:
        params.max_new_tokens = draw(st.sampled_from([params.max_new_tokens, 8])) or 8  # keep most calls short
    return params


@pytest.fixture(scope="module")
def fuzz_server(model_f32: Path) -> Iterator[Server]:
    with serving(model_f32) as server:
        yield server


@settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
@given(turns=turns, params=sampling(), streaming=st.booleans(), drop=st.booleans())
def test_any_request_gets_a_deliberate_status(
    fuzz_server: Server, turns: list[chat_pb2.Turn], params: chat_pb2.SamplingParams, streaming: bool, drop: bool
) -> None:
    with fuzz_server.channel() as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        try:
            if streaming:
                request = chat_pb2.GenerateStreamRequest(turns=turns, sampling=params, drop_oldest_turns=drop)
                list(stub.GenerateStream(request, timeout=60))
            else:
                stub.Generate(
                    chat_pb2.GenerateRequest(turns=turns, sampling=params, drop_oldest_turns=drop), timeout=60
                )
            stub.Tokenize(chat_pb2.TokenizeRequest(turns=turns), timeout=30)
        except grpc.RpcError as exc:
            assert exc.code() in ACCEPTABLE, (exc.code(), details(exc))
            assert details(exc) and "Traceback" not in details(exc)


def test_unknown_fields_are_ignored(fuzz_server: Server) -> None:
    request = chat_pb2.GenerateRequest(
        turns=[chat_pb2.Turn(speaker=chat_pb2.SPEAKER_USER, text="やあ")],
        sampling=chat_pb2.SamplingParams(max_new_tokens=3, temperature=0),
    )
    unknown = b"\xf8\x06\x2a" + b"\x82\x07\x03abc"  # field 111 (varint 42) and field 112 (bytes "abc")
    with fuzz_server.channel() as channel:
        call: grpc.UnaryUnaryMultiCallable[bytes, chat_pb2.GenerateResponse] = channel.unary_unary(
            "/jachat.v1.ChatService/Generate",
            request_serializer=None,
            response_deserializer=chat_pb2.GenerateResponse.FromString,
        )
        reply = call(request.SerializeToString() + unknown, timeout=30)
        assert reply.usage.completion_tokens == 3
        garbage: grpc.UnaryUnaryMultiCallable[bytes, chat_pb2.GenerateResponse] = channel.unary_unary(
            "/jachat.v1.ChatService/Generate",
            request_serializer=None,
            response_deserializer=chat_pb2.GenerateResponse.FromString,
        )
        with pytest.raises(grpc.RpcError) as info:
            garbage(b"\xff\xff\xff\xff", timeout=30)  # not a protobuf message at all
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert details(info.value) == "request: not a valid jachat.v1.GenerateRequest message"


def test_server_is_still_serving_after_the_fuzzing(fuzz_server: Server) -> None:
    assert fuzz_server.alive()
    with fuzz_server.channel() as channel:
        reply = health_stub(channel).Check(health_pb2.HealthCheckRequest(service="jachat.v1.ChatService"))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
