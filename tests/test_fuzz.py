"""Fuzzing the running server with Hypothesis: any request gets a deliberate status, never UNKNOWN or INTERNAL,
and the server stays SERVING."""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2
from hypothesis import HealthCheck, example, given, settings
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
    with serving(model_f32, "--http-host", "127.0.0.1", "--http-port", "0") as server:
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


# JSON values of every kind, including integers beyond any float and deep nesting, for any field of a body
json_values = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**70), 2**70),
        st.sampled_from([10**400, -(10**400), 0, -1, 1, 2047, 2048]),
        st.floats(allow_nan=False, allow_infinity=False),
        st.text(max_size=20),
    ),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)),
    max_leaves=8,
)
BODY_FIELDS = [
    "model", "messages", "stream", "stream_options", "max_tokens", "max_completion_tokens", "temperature", "top_p",
    "top_k", "min_tokens", "repetition_penalty", "no_repeat_ngram_size", "stop", "logprobs", "top_logprobs", "n",
    "priority", "drop_oldest_turns", "include_stop_str_in_output", "user", "seed", "response_format", "tools",
]  # fmt: skip
messages = st.one_of(
    json_values,
    st.lists(
        st.fixed_dictionaries(
            {"role": st.one_of(st.sampled_from(["user", "assistant", "system"]), json_values), "content": json_values}
        ),
        max_size=3,
    ),
    st.just([{"role": "user", "content": "やあ"}]),
)


@st.composite
def bodies(draw: st.DrawFn) -> dict[str, object]:
    body = {name: draw(json_values) for name in draw(st.lists(st.sampled_from(BODY_FIELDS), unique=True, max_size=6))}
    body["messages"] = draw(messages)
    if draw(st.booleans()):
        body["max_tokens"] = draw(st.integers(1, 8))  # keep the calls that are valid short
        body.pop("max_completion_tokens", None)
    return body


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=bodies())
@example(body={"messages": [{"role": "user", "content": "x"}], "max_tokens": 10**400})  # each was a 500
@example(body={"messages": [{"role": "user", "content": "x"}], "top_k": -(10**30), "temperature": 10**400})
@example(body={"messages": [{"role": ["user"], "content": "x"}], "model": None})
def test_any_http_body_gets_a_deliberate_status_never_a_server_error(
    fuzz_server: Server, body: dict[str, object]
) -> None:
    """No body a client can send makes the HTTP API answer 5xx (each was recorded INTERNAL and paged someone)."""
    answered_deliberately(fuzz_server, "/v1/chat/completions", body)


def answered_deliberately(server: Server, path: str, body: dict[str, object]) -> None:
    """POST the body: 200, or 400/404 with OpenAI's error message; never a 5xx."""
    assert server.http_port is not None
    connection = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=60)
    try:
        connection.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        response = connection.getresponse()
        reply = response.read()
    finally:
        connection.close()
    assert response.status in (200, 400, 404), (response.status, reply[:300], body)
    if response.status != 200:
        assert json.loads(reply)["error"]["message"]


SERVED = "(the served model)"
COMPLETION_FIELDS = [
    "model", "prompt", "stream", "stream_options", "max_tokens", "temperature", "top_p", "top_k", "min_tokens",
    "repetition_penalty", "no_repeat_ngram_size", "stop", "logprobs", "echo", "n", "best_of", "suffix", "priority",
    "include_stop_str_in_output", "user", "seed", "logit_bias",
]  # fmt: skip
prompts = st.one_of(
    json_values,
    st.text(max_size=12),
    st.lists(st.integers(-3, 40000), max_size=6),
    st.lists(st.one_of(st.text(max_size=6), st.lists(st.integers(-3, 40000), max_size=4)), max_size=3),
    st.just("ユーザー: やあ<NL>システム: "),
)
valid_prompts = st.one_of(
    st.text(min_size=1, max_size=12),
    st.lists(st.integers(0, 31999), min_size=1, max_size=6),
    st.lists(st.text(min_size=1, max_size=6), min_size=1, max_size=3),
)


@st.composite
def completion_bodies(draw: st.DrawFn) -> dict[str, object]:
    names = draw(st.lists(st.sampled_from(COMPLETION_FIELDS), unique=True, max_size=6))
    body = {name: draw(json_values) for name in names}
    body["prompt"] = draw(prompts)
    if draw(st.booleans()):  # a call that may be valid: the served model, a prompt it takes, fewer other fields
        body = {k: v for k, v in body.items() if draw(st.booleans())}
        body["model"] = SERVED  # replaced by the served model's name
        body["prompt"] = draw(valid_prompts)
        body["max_tokens"] = draw(st.integers(0, 8))  # keep the calls that are valid short
    return body


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=completion_bodies())
@example(body={"model": SERVED, "prompt": [[1], [2**70]], "max_tokens": 0, "echo": True, "logprobs": 1})
@example(body={"model": SERVED, "prompt": [7], "max_tokens": 0, "echo": True, "logprobs": 1, "stream": True})
def test_any_completions_body_gets_a_deliberate_status_never_a_server_error(
    fuzz_server: Server, body: dict[str, object]
) -> None:
    """/v1/completions, as the chat route: no body makes it answer 5xx (the model is named where it parses)."""
    if body.get("model") == SERVED:
        body = {**body, "model": served_model(fuzz_server)}
    answered_deliberately(fuzz_server, "/v1/completions", body)


_served: dict[int, str] = {}  # by gRPC port: asked once per server


def served_model(server: Server) -> str:
    if server.port not in _served:
        with server.channel() as channel:
            info = server.stub(channel).GetModelInfo(chat_pb2.GetModelInfoRequest(), timeout=30)
        _served[server.port] = info.model_name
    return _served[server.port]
