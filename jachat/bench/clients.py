"""gRPC clients of the benchmark: closed loops of streams, or an open loop of Poisson arrivals.

The open loop offers what it says. Drawing exponential gaps until time runs out sends rate x duration calls only
on average: the count of a Poisson process over 20 s at 1 call/s varies by about 22%, and reseeding the same
generator at every rate repeated one sample, whose first gaps were long (steps offered 73-91% of their nominal
calls). So `arrivals` draws the schedule as a Poisson process conditioned on its count: exactly round(rate x
duration) arrival times, uniform and sorted over the window (the same distribution of times, given the count),
from a seed of the step's own. The report gives the rate actually offered beside the nominal one.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from jachat.bench.workload import Progress, Record, Report, Workload, percentile
from jachat.v1 import chat_pb2, chat_pb2_grpc


async def _grpc_request(
    stub: chat_pb2_grpc.ChatServiceAsyncStub,
    workload: Workload,
    i: int,
    timeout: float,
    cancel_after: int | None = None,
) -> Record:
    """One GenerateStream call; with cancel_after, the client cancels it after that many messages."""
    turns = [chat_pb2.Turn(speaker=chat_pb2.SPEAKER_USER, text=workload.prompts[i % len(workload.prompts)])]
    request = chat_pb2.GenerateStreamRequest(turns=turns, sampling=workload.sampling_pb(i))
    started = time.perf_counter()
    first: float | None = None
    tokens = 0
    call = stub.GenerateStream(request, timeout=timeout)
    try:
        received = 0
        async for message in call:
            received += 1
            if first is None and message.text:
                first = time.perf_counter() - started
            if message.HasField("usage"):
                tokens = message.usage.completion_tokens
            if cancel_after is not None and received >= cancel_after:
                call.cancel()
                return Record(math.nan, time.perf_counter() - started, 0, "CANCELLED_BY_CLIENT")
    except grpc.aio.AioRpcError as exc:
        return Record(math.nan, time.perf_counter() - started, 0, exc.code().name)
    e2e = time.perf_counter() - started
    return Record(first if first is not None else e2e, e2e, tokens)


def arrivals(rate: float, duration: float, seed: int = 0) -> list[float]:
    """Arrival times (seconds from the start) of a Poisson process at `rate` over `duration`, conditioned on the
    count being exactly round(rate x duration) (at least one)."""
    count = max(1, round(rate * duration))
    chance = random.Random(f"{seed}:{rate!r}:{duration!r}")  # each rate its own sample, the same on every run
    return sorted(chance.uniform(0.0, duration) for _ in range(count))


Call = Callable[[int, "int | None"], Awaitable[Record]]  # (request index, cancel after n messages) -> its record


async def run_grpc(
    target: str,
    workload: Workload,
    concurrency: int,
    requests: int | None = None,
    duration: float | None = None,
    rate: float | None = None,
    timeout: float = 600.0,
    label: str | None = None,
    cancel_fraction: float = 0.0,
) -> Report:
    """The load against a jachat's gRPC API (GenerateStream)."""
    async with grpc.aio.insecure_channel(target) as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)

        async def call(i: int, cancel_after: int | None) -> Record:
            return await _grpc_request(stub, workload, i, timeout, cancel_after)

        return await run_load(call, workload, concurrency, requests, duration, rate, label, cancel_fraction)


async def run_openai(
    base_url: str,
    workload: Workload,
    concurrency: int,
    requests: int | None = None,
    duration: float | None = None,
    rate: float | None = None,
    timeout: float = 600.0,
    label: str | None = None,
    model: str | None = None,
    extra: dict[str, Any] | None = None,
) -> Report:
    """The same load against any OpenAI-compatible server (`base_url` ends in /v1): each call one streamed chat
    completion of the same prompt as the same user turn, with the same sampling, exactly `workload.tokens` tokens
    where the server allows it (min_tokens; `extra` adds what another server wants, e.g. {"ignore_eos": true})."""
    import aiohttp

    base = base_url.rstrip("/")
    limits = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=limits, timeout=aiohttp.ClientTimeout(total=timeout)) as session:
        if model is None:
            async with session.get(f"{base}/models") as listed:
                model = str((await listed.json())["data"][0]["id"])
        body = openai_body(workload, model, extra or {})

        async def call(i: int, cancel_after: int | None) -> Record:
            return await _openai_request(session, f"{base}/chat/completions", body, workload, i)

        name = label or (f"{base}, {rate}/s" if rate is not None else f"{base}, {concurrency} streams")
        return await run_load(call, workload, concurrency, requests, duration, rate, name, 0.0)


def openai_body(workload: Workload, model: str, extra: dict[str, Any]) -> dict[str, Any]:
    """The request body of every call but its messages: the workload's sampling under OpenAI's names (top_k,
    repetition_penalty and min_tokens as vLLM and jachat name them), streamed, with usage."""
    return {
        "model": model,
        "max_tokens": workload.tokens,
        "min_tokens": workload.tokens,
        "temperature": workload.temperature,
        "top_p": workload.top_p,
        "top_k": workload.top_k,
        "repetition_penalty": workload.repetition_penalty,
        "stream": True,
        "stream_options": {"include_usage": True},
        **extra,
    }


async def _openai_request(session: Any, url: str, body: dict[str, Any], workload: Workload, i: int) -> Record:
    """One streamed chat completion: TTFT at the first content, tokens from the usage chunk."""
    import aiohttp

    messages = [{"role": "user", "content": workload.prompts[i % len(workload.prompts)]}]
    started = time.perf_counter()
    first: float | None = None
    tokens = 0
    try:
        async with session.post(url, json={**body, "messages": messages}) as response:
            if response.status != 200:
                return Record(math.nan, time.perf_counter() - started, 0, f"HTTP_{response.status}")
            async for line in response.content:
                if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return Record(math.nan, time.perf_counter() - started, 0, "STREAM_ERROR")
                choices = chunk.get("choices") or []
                if first is None and choices and (choices[0].get("delta") or {}).get("content"):
                    first = time.perf_counter() - started
                if chunk.get("usage"):
                    tokens = int(chunk["usage"].get("completion_tokens", 0))
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        return Record(math.nan, time.perf_counter() - started, 0, type(exc).__name__)
    e2e = time.perf_counter() - started
    return Record(first if first is not None else e2e, e2e, tokens)


async def run_load(
    call: Call,
    workload: Workload,
    concurrency: int,
    requests: int | None = None,
    duration: float | None = None,
    rate: float | None = None,
    label: str | None = None,
    cancel_fraction: float = 0.0,
) -> Report:
    """Closed loop: `concurrency` clients, each sending its next request when the last one ends. With `rate`,
    an open loop: exactly rate x duration (or `requests`) Poisson arrivals (`arrivals`), at most `concurrency` in
    flight. With cancel_fraction, that share of calls is cancelled by the client after a random number of messages.
    One warm-up call first, not counted."""
    if requests is None and duration is None:
        requests = 4 * concurrency
    name = label or (f"service, {concurrency} streams" if rate is None else f"service, {rate}/s")
    progress = Progress(name, requests, duration)
    records: list[Record] = []
    numbered: list[tuple[int, Record]] = []  # each record with its launch number (1 is the first counted call)
    counter = iter(range(10**9))
    await call(0, None)  # warm-up, not counted
    started = time.perf_counter()
    stop_at = None if duration is None else time.monotonic() + duration

    def more() -> bool:
        return (requests is None or len(records) + in_flight[0] < requests) and (
            stop_at is None or time.monotonic() < stop_at
        )

    in_flight = [0]
    most = [0]
    chance = random.Random(1)

    async def one() -> None:
        """One call, already counted in flight by whoever launched it (so `more` never overshoots)."""
        cancel_after = chance.randint(1, max(1, workload.tokens - 1)) if chance.random() < cancel_fraction else None
        n = next(counter)
        record = await call(n, cancel_after)
        in_flight[0] -= 1
        records.append(record)
        numbered.append((n, record))
        progress.advance()

    def launched() -> None:
        in_flight[0] += 1
        most[0] = max(most[0], in_flight[0])

    offered = (0, 1.0)
    if rate is None:

        async def client() -> None:
            while more():
                launched()
                await one()

        await asyncio.gather(*(client() for _ in range(concurrency)))
    else:
        window = duration if duration is not None else (requests or 1) / rate
        schedule = arrivals(rate, window)
        tasks: set[asyncio.Task[None]] = set()
        limit = asyncio.Semaphore(concurrency)
        loop = asyncio.get_running_loop()
        opened = loop.time()
        for at in schedule:
            await asyncio.sleep(max(0.0, opened + at - loop.time()))
            await limit.acquire()  # held until the call ends: at most `concurrency` in flight
            launched()
            task = asyncio.ensure_future(one())
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            task.add_done_callback(lambda _: limit.release())
        offered = (len(schedule), max(window, loop.time() - opened))
        await asyncio.gather(*tasks)
    seconds = time.perf_counter() - started
    progress.close()
    report = Report.of(name, concurrency, records, seconds, most[0])
    if rate is not None:
        report.nominal_rate, report.offered_rate = rate, offered[0] / offered[1]
    else:  # past the opening burst, where every client started at once
        later = [r.ttft for n, r in numbered if n > concurrency and r.code == "OK"]
        report.ttft_after_opening = {f"p{q}": percentile(later, q) for q in (50, 90, 99)}
    return report
