"""jachat-bench fairness: what a flood does to everyone else's first token.

On a fresh server: the light tenant's calls alone (its TTFT at rest), then tenant A floods `flood` calls and tenant
B sends `few` just after (B's TTFT under the flood, against A's); then the same with priorities: `flood` batch calls,
then `few` interactive ones. With a fair scheduler the light calls start within about one batch of their arrival;
first-come-first-served would put them behind the whole flood.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc

from jachat.bench.launcher import ServerProcess, spawn
from jachat.bench.workload import percentile
from jachat.v1 import chat_pb2, chat_pb2_grpc


async def _ttft(stub: chat_pb2_grpc.ChatServiceAsyncStub, text: str, tokens: int, tenant: str, priority: int) -> float:
    """Seconds from sending a streaming call to its first message."""
    sampling = chat_pb2.SamplingParams(temperature=0, max_new_tokens=tokens, min_new_tokens=tokens)
    request = chat_pb2.GenerateStreamRequest(
        turns=[chat_pb2.Turn(speaker=chat_pb2.SPEAKER_USER, text=text)],
        sampling=sampling,
        priority=chat_pb2.Priority.ValueType(priority),
    )
    started = time.perf_counter()
    first = None
    async for _ in stub.GenerateStream(request, metadata=(("x-jachat-tenant", tenant),), timeout=600):
        first = first if first is not None else time.perf_counter() - started
    return first if first is not None else time.perf_counter() - started


async def _scenario(server: ServerProcess, flood: int, few: int, tokens: int, by_priority: bool) -> dict[str, Any]:
    batch, interactive = chat_pb2.PRIORITY_BATCH, chat_pb2.PRIORITY_INTERACTIVE
    heavy = ("a", batch if by_priority else interactive)
    light = ("b" if not by_priority else "a", interactive)
    async with grpc.aio.insecure_channel(server.target) as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        alone = [await _ttft(stub, f"一人{i}", tokens, light[0], light[1]) for i in range(few)]
        flooding = [asyncio.ensure_future(_ttft(stub, f"大量{i}", tokens, *heavy)) for i in range(flood)]
        await asyncio.sleep(0.2)  # the flood is queued
        under = await asyncio.gather(*(_ttft(stub, f"少し{i}", tokens, *light) for i in range(few)))
        heavy_ttft = await asyncio.gather(*flooding)
    return {
        "light_alone_ttft_p50_s": percentile(alone, 0.5),
        "light_under_flood_ttft_p50_s": percentile(under, 0.5),
        "light_under_flood_ttft_max_s": max(under),
        "flood_ttft_p50_s": percentile(heavy_ttft, 0.5),
        "flood_ttft_max_s": max(heavy_ttft),
    }


def fairness_main(
    model: Path, flood: int, few: int, tokens: int, serve_args: Sequence[str], output: Path | None, meta: dict[str, Any]
) -> int:
    server = spawn(model, "--device", "cpu", "--max-queued-per-tenant", str(flood + few), *serve_args)
    try:
        tenants = asyncio.run(_scenario(server, flood, few, tokens, by_priority=False))
        priorities = asyncio.run(_scenario(server, flood, few, tokens, by_priority=True))
    finally:
        server.stop()
    result = {"tenants": tenants, "priorities": priorities, "flood": flood, "few": few, "tokens": tokens}
    for name, figures in (
        ("tenant B under tenant A's flood", tenants),
        ("interactive under a batch flood", priorities),
    ):
        ms = {key: round(value * 1000) for key, value in figures.items()}
        print(
            f"{name:<34} TTFT p50 {ms['light_under_flood_ttft_p50_s']} ms, max {ms['light_under_flood_ttft_max_s']} ms"
            f" (alone {ms['light_alone_ttft_p50_s']} ms); the flood's TTFT p50 {ms['flood_ttft_p50_s']} ms, max "
            f"{ms['flood_ttft_max_s']} ms"
        )
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps({"meta": meta, "fairness": result}, indent=2, ensure_ascii=False) + "\n")
    return 0
