"""jachat-bench fairness: what a flood does to everyone else's first token.

On a fresh server: the light tenant's calls alone (its TTFT at rest), then tenant A floods `flood` calls and tenant
B sends `few` just after (B's TTFT under the flood, against A's); then the same with priorities: `flood` batch calls,
then `few` interactive ones. With a fair scheduler the light calls start within about one batch of their arrival;
first-come-first-served would put them behind the whole flood. Last, starvation: tenant A keeps `flood`
interactive calls waiting (each one that starts is replaced at once) while tenant B sends one batch call; with the
server's aging (`--batch-promotion-seconds`, `promotion` here) B's first token comes after about that long plus one
batch, where strict priority would make it wait for as long as A keeps up.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import grpc

from jachat.bench.launcher import ServerProcess, spawn
from jachat.bench.reports import write_report
from jachat.bench.workload import percentile
from jachat.v1 import chat_pb2, chat_pb2_grpc


async def _ttft(
    stub: chat_pb2_grpc.ChatServiceAsyncStub,
    text: str,
    tokens: int,
    tenant: str,
    priority: int,
    started_generating: Callable[[], None] | None = None,
) -> float:
    """Seconds from sending a streaming call to its first message (when `started_generating` is called), read to
    its end."""
    sampling = chat_pb2.SamplingParams(temperature=0, max_new_tokens=tokens, min_new_tokens=tokens)
    request = chat_pb2.GenerateStreamRequest(
        turns=[chat_pb2.Turn(speaker=chat_pb2.SPEAKER_USER, text=text)],
        sampling=sampling,
        priority=chat_pb2.Priority.ValueType(priority),
    )
    started = time.perf_counter()
    first = None
    async for _ in stub.GenerateStream(request, metadata=(("x-jachat-tenant", tenant),), timeout=600):
        if first is None:
            first = time.perf_counter() - started
            if started_generating is not None:
                started_generating()
    return first if first is not None else time.perf_counter() - started


STREAMS_PER_CHANNEL = 64  # well under the server's --max-streams-per-connection (128): no REFUSED_STREAM


class _Channels:
    """Enough connections for `calls` streams at once; stub(i) spreads them."""

    def __init__(self, target: str, calls: int) -> None:
        # a local subchannel pool each: grpc shares one connection between channels to the same target otherwise
        options = [("grpc.use_local_subchannel_pool", 1)]
        count = calls // STREAMS_PER_CHANNEL + 1
        self.channels = [grpc.aio.insecure_channel(target, options=options) for _ in range(count)]
        self.stubs = [chat_pb2_grpc.ChatServiceStub(c) for c in self.channels]

    def stub(self, i: int) -> chat_pb2_grpc.ChatServiceAsyncStub:
        return self.stubs[i % len(self.stubs)]

    async def close(self) -> None:
        await asyncio.gather(*(c.close() for c in self.channels))


async def _scenario(server: ServerProcess, flood: int, few: int, tokens: int, by_priority: bool) -> dict[str, Any]:
    batch, interactive = chat_pb2.PRIORITY_BATCH, chat_pb2.PRIORITY_INTERACTIVE
    heavy = ("a", batch if by_priority else interactive)
    light = ("b" if not by_priority else "a", interactive)
    channels = _Channels(server.target, flood + few)
    try:
        stub = channels.stub
        alone = [await _ttft(stub(i), f"一人{i}", tokens, light[0], light[1]) for i in range(few)]
        flooding = [asyncio.ensure_future(_ttft(stub(i), f"大量{i}", tokens, *heavy)) for i in range(flood)]
        await asyncio.sleep(0.2)  # the flood is queued
        under = await asyncio.gather(*(_ttft(stub(i), f"少し{i}", tokens, *light) for i in range(few)))
        heavy_ttft = await asyncio.gather(*flooding)
    finally:
        await channels.close()
    return {
        "light_alone_ttft_p50_s": percentile(alone, 0.5),
        "light_under_flood_ttft_p50_s": percentile(under, 0.5),
        "light_under_flood_ttft_max_s": max(under),
        "flood_ttft_p50_s": percentile(heavy_ttft, 0.5),
        "flood_ttft_max_s": max(heavy_ttft),
    }


async def _starvation(server: ServerProcess, waiting: int, tokens: int, load_seconds: float) -> dict[str, Any]:
    """One batch call's TTFT while another tenant keeps `waiting` interactive calls queued (each call that starts
    is replaced at once, so the queue never drains), for at most `load_seconds` or until the batch call has its
    reply: under strict priority the batch call waits for the whole load."""
    channels = _Channels(server.target, 2 * waiting + 64)
    served: list[float] = []
    try:
        stop = asyncio.Event()
        asyncio.get_running_loop().call_later(load_seconds, stop.set)
        room = asyncio.Semaphore(waiting)

        async def interactive(i: int) -> None:  # once it has a place, the next takes its place in the queue
            ttft = await _ttft(channels.stub(i), f"常時{i}", tokens, "a", chat_pb2.PRIORITY_INTERACTIVE, room.release)
            served.append(ttft)

        async def keep_queued() -> None:
            calls, i = [], 0
            while not stop.is_set():
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(room.acquire(), 0.1)
                    calls.append(asyncio.ensure_future(interactive(i)))
                    i += 1
            await asyncio.gather(*calls)

        load = asyncio.ensure_future(keep_queued())
        deadline = time.monotonic() + 10
        while server.scrape().get("jachat_queue_size", 0) < waiting // 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)  # until the interactive queue has filled (the server's own gauge)
        waited = await _ttft(channels.stub(-1), "後回し", tokens, "b", chat_pb2.PRIORITY_BATCH)
        stop.set()
        await load
    finally:
        await channels.close()
    return {
        "batch_ttft_s": waited,
        "interactive_ttft_p50_s": percentile(served, 0.5),
        "interactive_calls": len(served),
        "load_seconds": load_seconds,
        "interactive_waiting": waiting,
    }


def fairness_main(
    model: Path,
    flood: int,
    few: int,
    tokens: int,
    serve_args: Sequence[str],
    output: Path | None,
    meta: dict[str, Any],
    promotion: float = 2.0,
) -> int:
    server = spawn(
        model,
        "--device",
        "cpu",
        "--max-queued-per-tenant",
        str(flood + few),
        "--batch-promotion-seconds",
        str(promotion),
        *serve_args,
    )
    try:
        tenants = asyncio.run(_scenario(server, flood, few, tokens, by_priority=False))
        priorities = asyncio.run(_scenario(server, flood, few, tokens, by_priority=True))
        starvation = asyncio.run(_starvation(server, flood, tokens, min(60.0, max(5.0, 3 * promotion))))
    finally:
        server.stop()
    starvation["promotion_s"] = promotion
    result = {
        "tenants": tenants,
        "priorities": priorities,
        "starvation": starvation,
        "flood": flood,
        "few": few,
        "tokens": tokens,
    }
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
    print(
        f"{'a batch call under interactive load':<34} TTFT {round(starvation['batch_ttft_s'] * 1000)} ms "
        f"({flood} interactive calls kept waiting by another tenant, {starvation['interactive_calls']} served "
        f"meanwhile; promotion after {promotion:g} s; the load lasts at most {starvation['load_seconds']:g} s)"
    )
    if output is not None:
        write_report(output, {"meta": meta, "fairness": result})
    return 0
