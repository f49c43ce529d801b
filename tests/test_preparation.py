"""Request preparation: off the event loop, linear in the request, and after the cheap refusals."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from prometheus_client import CollectorRegistry

from jachat.v1 import chat_pb2, chat_pb2_grpc
from service.preparation import ChatRequest, Preparer
from service.prompt import Speaker, Turn, render_prompt
from service.sampling import SamplingOptions
from service.server import Service
from service.settings import Settings
from service.tokenizer import Tokenizer
from tests.helpers import greedy, user


class CountingTokenizer(Tokenizer):
    """The real tokenizer, recording which thread encoded how much."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.calls: list[tuple[str, int]] = []

    def encode(self, text: str) -> list[int]:
        self.calls.append((threading.current_thread().name, len(text)))
        return super().encode(text)


def conversation(turns: int, text: str) -> list[Turn]:
    return [Turn(Speaker.USER if i % 2 == 0 else Speaker.SYSTEM, f"{i}: {text}") for i in range(turns - 1)] + [
        Turn(Speaker.USER, "最後の質問")
    ]


def test_drop_oldest_turns_finds_its_cut_in_one_pass(demo_checkpoint: Path) -> None:
    tokenizer = CountingTokenizer(demo_checkpoint / "spiece.model")
    preparer = Preparer(tokenizer, 2048)
    turns = conversation(255, "吾輩は猫である。名前はまだ無い。" * 16)
    tokenizer.calls.clear()
    prepared = preparer.prepare_now(ChatRequest(turns, SamplingOptions(max_new_tokens=100), True, True))
    kept = len(turns) - prepared.prompt.dropped_turns
    # each kept turn once, the first dropped one once, the kept prompt once: not once per dropped turn
    assert len(tokenizer.calls) <= kept + 2
    assert sum(n for _, n in tokenizer.calls) < 3 * len(render_prompt(turns[-kept:]))
    # and the cut is the one the quadratic search found: the newest turns that fit, one more would not
    ids = tokenizer.encode(render_prompt(turns[-kept:]))
    assert prepared.prompt.ids == ids and len(ids) + 100 <= 2048
    assert len(tokenizer.encode(render_prompt(turns[-kept - 1 :]))) + 100 > 2048


async def until(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the condition never held"
        await asyncio.sleep(0.01)


def test_preparation_runs_off_the_event_loop_and_a_full_server_refuses_before_any(model_f32: Path) -> None:
    async def scenario() -> None:
        settings = Settings(
            model=model_f32, host="127.0.0.1", port=0, metrics_port=-1, device="cpu", replicas=1, max_queued_requests=1
        )
        service = await Service.start(settings, CollectorRegistry())
        try:
            engine = await service.load_model()
            tokenizer = CountingTokenizer(engine.tokenizer.path)
            engine.preparer.tokenizer = engine.preparer.guard.tokenizer = tokenizer
            async with grpc.aio.insecure_channel(f"127.0.0.1:{service.port}") as channel:
                stub = chat_pb2_grpc.ChatServiceStub(channel)
                history = [user("吾輩は猫である。" * 100) for _ in range(60)]
                reply = await stub.Generate(
                    chat_pb2.GenerateRequest(turns=history, sampling=greedy(4), drop_oldest_turns=True)
                )
                assert reply.usage.dropped_turns > 0
                assert tokenizer.calls and {name.split("_")[0] for name, _ in tokenizer.calls} == {"jachat-prepare"}

                long = chat_pb2.GenerateRequest(turns=[user("やあ")], sampling=greedy(1900, min_new_tokens=1900))
                running = asyncio.ensure_future(stub.Generate(long))
                # the earlier request's batch may still be winding down: wait for this one's
                await until(lambda: any(g.max_new_tokens == 1900 for g in engine.scheduler.running))
                queued = asyncio.ensure_future(stub.Generate(long))
                await until(lambda: bool(engine.scheduler.pending))
                tokenizer.calls.clear()
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await stub.Generate(chat_pb2.GenerateRequest(turns=history, drop_oldest_turns=True))
                assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert tokenizer.calls == []  # refused before any text was encoded
                running.cancel()
                queued.cancel()
        finally:
            await service.stop(grace=1)

    asyncio.run(scenario())


def test_too_many_waiting_preparations_are_refused_as_overloaded(demo_checkpoint: Path) -> None:
    from service.errors import Overloaded

    preparer = Preparer(Tokenizer(demo_checkpoint / "spiece.model"), 2048, workers=1, max_waiting=2)
    release = threading.Event()

    async def scenario() -> None:
        blocked = [asyncio.ensure_future(preparer.run(release.wait)) for _ in range(2)]
        await asyncio.sleep(0.05)
        with pytest.raises(Overloaded):
            await preparer.run(lambda: None)
        release.set()
        await asyncio.gather(*blocked)
        assert await preparer.run(lambda: 7) == 7  # room again

    asyncio.run(scenario())
    preparer.close()
