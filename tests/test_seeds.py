"""Seeds through the real server: `SamplingParams.seed` over gRPC and `seed` in both OpenAI bodies (the official SDK)
give the same sampled tokens three times, alone and beside other sampled traffic, and another seed gives others;
static batches refuse a sampled seed, naming the field."""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest

from jachat.v1 import chat_pb2
from tests.helpers import details, user
from tests.servers import Server, serving
from tests.test_http_api import client, http_flags, model_id, request
from tests.test_native import decoder_module

PROMPT = "日本の首都はどこですか?"


@pytest.fixture(scope="module")
def server(model_f32: Path) -> Iterator[Server]:
    decoder_module()  # the default engine is the decode loop where it is built
    with serving(model_f32, *http_flags()) as running:
        yield running


def sampled(seed: int | None, tokens: int = 16) -> chat_pb2.SamplingParams:
    """Wide sampling (temperature 1, no top-k), exactly `tokens` long, so that two draws almost never agree."""
    params = chat_pb2.SamplingParams(temperature=1.0, top_k=0, max_new_tokens=tokens, min_new_tokens=tokens)
    if seed is not None:
        params.seed = seed
    return params


def grpc_tokens(server: Server, seed: int | None, tokens: int = 16) -> list[int]:
    with server.channel() as channel:
        reply = server.stub(channel).Generate(
            chat_pb2.GenerateRequest(turns=[user(PROMPT)], sampling=sampled(seed, tokens)), timeout=60
        )
    return [token.id for token in reply.tokens]


def beside_traffic(server: Server, call: Any, others: int = 3) -> Any:
    """`call()`'s result while `others` unseeded sampled replies of their own length run beside it."""
    with ThreadPoolExecutor(others + 1) as pool:
        busy = [pool.submit(grpc_tokens, server, None, 40) for _ in range(others)]
        result = pool.submit(call).result()
        for future in busy:
            assert len(future.result()) == 40
    return result


def test_a_grpc_seed_gives_the_same_tokens_alone_and_beside_other_traffic(server: Server) -> None:
    alone = [grpc_tokens(server, 42) for _ in range(3)]
    assert alone[0] == alone[1] == alone[2] and len(alone[0]) == 16
    assert beside_traffic(server, lambda: grpc_tokens(server, 42)) == alone[0]
    assert grpc_tokens(server, 43) != alone[0]
    assert grpc_tokens(server, 2**64 - 1) != alone[0]  # the whole range is honoured


def chat_text(server: Server, seed: int) -> str:
    reply = client(server).chat.completions.create(
        model=model_id(server),
        messages=[{"role": "user", "content": PROMPT}],
        seed=seed,
        temperature=1.0,
        max_tokens=16,
        extra_body={"top_k": 0, "min_tokens": 16},
    )
    return reply.choices[0].message.content or ""


def completion_text(server: Server, seed: int) -> str:
    reply = client(server).completions.create(
        model=model_id(server), prompt=PROMPT, seed=seed, temperature=1.0, max_tokens=16, extra_body={"min_tokens": 16}
    )
    return reply.choices[0].text


@pytest.mark.parametrize("call", [chat_text, completion_text], ids=["chat", "completions"])
def test_an_openai_seed_gives_the_same_reply_alone_and_beside_other_traffic(server: Server, call: Any) -> None:
    alone = [call(server, 7) for _ in range(3)]
    assert alone[0] == alone[1] == alone[2] and alone[0]
    assert beside_traffic(server, lambda: call(server, 7)) == alone[0]
    assert call(server, 8) != alone[0]


def test_the_same_seed_gives_the_same_reply_over_both_apis(server: Server) -> None:
    """The chat body's unset fields take gRPC's defaults, so the same conversation and seed are the same call."""
    with server.channel() as channel:
        reply = server.stub(channel).Generate(
            chat_pb2.GenerateRequest(turns=[user(PROMPT)], sampling=sampled(5)), timeout=60
        )
    assert chat_text(server, 5) == reply.text


def test_a_seed_out_of_range_is_refused_naming_it(server: Server) -> None:
    status, _, body = request(
        server, "POST", "/v1/chat/completions",
        {"model": model_id(server), "messages": [{"role": "user", "content": PROMPT}], "seed": -1},
    )  # fmt: skip
    assert status == 400 and json.loads(body)["error"]["param"] == "seed", body


def test_static_batches_refuse_a_sampled_seed_naming_the_field(model_f32: Path) -> None:
    with serving(model_f32, "--decode-loop", "static", *http_flags()) as static:
        with static.channel() as channel, pytest.raises(grpc.RpcError) as refused:
            static.stub(channel).Generate(chat_pb2.GenerateRequest(turns=[user(PROMPT)], sampling=sampled(1)))
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "sampling.seed" in details(refused.value)
        body = {"model": model_id(static), "messages": [{"role": "user", "content": PROMPT}], "seed": 1}
        status, _, payload = request(static, "POST", "/v1/chat/completions", body)
        assert status == 400 and json.loads(payload)["error"]["param"] == "seed", payload
        greedy = {**body, "temperature": 0, "max_tokens": 4}
        assert request(static, "POST", "/v1/chat/completions", greedy)[0] == 200  # a seed that changes nothing
