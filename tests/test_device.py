"""The engine on a device: reduced-precision compute types agree with float32 greedy, streaming, cancellation and
deadlines. On the CPU in every run (float32, int8_float32, int8); on a GPU through scripts/gpu-check, which sets
JACHAT_TEST_DEVICE=cuda (float32, float16, int8_float16)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from jachat.converter.convert import ConvertOptions, convert
from jachat.v1 import chat_pb2
from tests.conftest import SCRIPTED_REPLY
from tests.helpers import greedy, user
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
    with serving(model, "--device", DEVICE, "--replicas", "1") as server:
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
    deadline = time.monotonic() + 10
    while server.scrape().get("jachat_tokens_after_cancel_count", 0) <= before.get(
        "jachat_tokens_after_cancel_count", 0
    ):
        assert time.monotonic() < deadline, "the cancellation was never recorded"
        time.sleep(0.02)
    after = server.scrape()
    assert (
        after['jachat_tokens_after_cancel_bucket{le="2.0"}']
        - before.get('jachat_tokens_after_cancel_bucket{le="2.0"}', 0)
        == 1
    )
