"""Request preparation in a real server: off the event loop, and after the cheap refusals."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest
from prometheus_client import CollectorRegistry

from jachat.service.server import Service
from jachat.service.settings import Settings
from jachat.v1 import chat_pb2, chat_pb2_grpc
from tests.fast.test_preparation import CountingTokenizer
from tests.helpers import greedy, until, user


def test_preparation_runs_off_the_event_loop_and_a_full_server_refuses_before_any(model_f32: Path) -> None:
    async def scenario() -> None:
        settings = Settings(
            model=model_f32,
            host="127.0.0.1",
            port=0,
            metrics_port=-1,
            device="cpu",
            replicas=1,
            max_batch_size=1,
            max_queued_requests=1,
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
                await until(lambda: any(g.tokens_left() > 1000 for g in engine.scheduler.running))
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
