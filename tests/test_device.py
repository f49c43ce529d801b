"""The engine on a device: reduced-precision compute types agree with float32 greedy, streaming, cancellation,
deadlines and prompt scoring. On the CPU in every run (float32, int8_float32, int8); on a GPU through
scripts/gpu-check, which sets JACHAT_TEST_DEVICE=cuda (float32, float16, int8_float16)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from jachat.converter.convert import ConvertOptions, convert
from jachat.v1 import chat_pb2
from tests.conftest import SCRIPTED_REPLY
from tests.helpers import greedy, user, wait_until
from tests.servers import Server, serving

DEVICE = os.environ.get("JACHAT_TEST_DEVICE", "cpu")
# what each device runs besides float32 (the converted type is what runs: compute type "default")
REDUCED = {"cpu": ("int8_float32", "int8"), "cuda": ("float16", "int8_float16")}[DEVICE]


@pytest.fixture(scope="module", params=("float32", *REDUCED))
def device_server(
    request: pytest.FixtureRequest, scripted_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, Server]]:
    quantization: str = request.param
    model = convert(
        ConvertOptions(str(scripted_checkpoint), tmp_path_factory.mktemp("device") / quantization, quantization)
    )
    flags = ("--device", DEVICE, "--replicas", "1", "--http-host", "127.0.0.1", "--http-port", "0")
    with serving(model, *flags) as server:
        yield quantization, server


def test_greedy_agrees_with_float32_at_every_compute_type(device_server: tuple[str, Server]) -> None:
    """The scripted checkpoint's greedy reply is fixed by clear margins, so every compute type that runs the model
    correctly writes it exactly; a wrong kernel or a broken conversion does not."""
    quantization, server = device_server
    with server.channel() as channel:
        stub = server.stub(channel)
        info = stub.GetModelInfo(chat_pb2.GetModelInfoRequest(), timeout=30)
        assert info.device == DEVICE and info.quantization == quantization
        reply = stub.Generate(chat_pb2.GenerateRequest(turns=[user("こんにちは")], sampling=greedy(32)), timeout=60)
    assert reply.text == SCRIPTED_REPLY and reply.finish_reason == chat_pb2.FINISH_REASON_END_OF_TURN


def test_streaming_gives_the_same_reply(device_server: tuple[str, Server]) -> None:
    _, server = device_server
    with server.channel() as channel:
        messages = list(
            server.stub(channel).GenerateStream(
                chat_pb2.GenerateStreamRequest(turns=[user("やあ")], sampling=greedy(32)), timeout=60
            )
        )
    assert "".join(m.text for m in messages) == SCRIPTED_REPLY
    assert messages[-1].finish_reason == chat_pb2.FINISH_REASON_END_OF_TURN


def test_cancellation_and_deadlines_stop_generation(device_server: tuple[str, Server]) -> None:
    """A cancelled stream stops within two tokens; a deadline ends a long call with DEADLINE_EXCEEDED."""
    _, server = device_server
    before = server.scrape()
    long = greedy(1500, min_new_tokens=1500)
    with server.channel() as channel:
        stub = server.stub(channel)
        stream = stub.GenerateStream(chat_pb2.GenerateStreamRequest(turns=[user("長く")], sampling=long), timeout=60)
        for i, _ in enumerate(stream):
            if i == 2:
                stream.cancel()
                break
        with pytest.raises(grpc.RpcError) as late:
            stub.Generate(chat_pb2.GenerateRequest(turns=[user("長く")], sampling=long), timeout=0.3)
        assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    stopped = "jachat_tokens_after_cancel_count"
    wait_until(lambda: server.scrape().get(stopped, 0) > before.get(stopped, 0), "the cancellation recorded", 10)
    after = server.scrape()
    assert (
        after['jachat_tokens_after_cancel_bucket{le="2.0"}']
        - before.get('jachat_tokens_after_cancel_bucket{le="2.0"}', 0)
        == 1
    )


def test_scoring_and_the_most_likely_tokens_agree_with_the_greedy_reply(device_server: tuple[str, Server]) -> None:
    """An echoed completion of the prompt and its greedy reply, scored both ways on the device: with logprobs 0
    (score_batch) and 1 (a forward pass, its distribution reduced to each place's best token, copied from the device
    first on a GPU). Each reply token is its place's most likely, and both paths give the log-probabilities the
    generation reported."""
    import json
    import urllib.request

    _, server = device_server
    turns = [user("こんにちは")]
    with server.channel() as channel:
        stub = server.stub(channel)
        prompt = stub.Tokenize(chat_pb2.TokenizeRequest(turns=turns), timeout=30)
        info = stub.GetModelInfo(chat_pb2.GetModelInfoRequest(), timeout=30)
        options = chat_pb2.ResponseOptions(token_logprobs=True)
        reply = stub.Generate(chat_pb2.GenerateRequest(turns=turns, sampling=greedy(32), response=options), timeout=60)
    ids = list(prompt.token_ids) + [t.id for t in reply.tokens]

    def echo(logprobs: int) -> dict[str, Any]:
        body = {"model": info.model_name, "prompt": ids, "max_tokens": 0, "echo": True, "logprobs": logprobs}
        request = urllib.request.Request(
            f"http://127.0.0.1:{server.http_port}/v1/completions",
            json.dumps(body).encode(),
            {"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            result: dict[str, Any] = json.load(response)["choices"][0]["logprobs"]
        return result

    scored, forward = echo(0), echo(1)
    tail = slice(len(prompt.token_ids), None)
    assert forward["tokens"][tail] == [next(iter(top)) for top in forward["top_logprobs"][tail]]
    generated = [t.logprob for t in reply.tokens]
    assert scored["token_logprobs"][tail] == pytest.approx(generated, abs=1e-3)
    assert forward["token_logprobs"][tail] == pytest.approx(generated, abs=1e-3)
