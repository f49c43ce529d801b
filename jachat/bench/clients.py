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
import math
import random
import time

import grpc

from jachat.bench.workload import Progress, Record, Report, Workload
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
    request = chat_pb2.GenerateStreamRequest(turns=turns, sampling=workload.sampling_pb())
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
    """Closed loop: `concurrency` clients, each sending its next request when the last one ends. With `rate`,
    an open loop: Poisson arrivals at `rate` requests/s (at most `concurrency` in flight). With cancel_fraction,
    that share of calls is cancelled by the client after a random number of messages."""
    if requests is None and duration is None:
        requests = 4 * concurrency
    name = label or (f"service, {concurrency} streams" if rate is None else f"service, {rate}/s")
    progress = Progress(name, requests, duration)
    records: list[Record] = []
    counter = iter(range(10**9))
    stop_at = None if duration is None else time.monotonic() + duration

    def more() -> bool:
        return (requests is None or len(records) + in_flight[0] < requests) and (
            stop_at is None or time.monotonic() < stop_at
        )

    in_flight = [0]
    most = [0]
    async with grpc.aio.insecure_channel(target) as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        await _grpc_request(stub, workload, 0, timeout)  # warm-up, not counted
        started = time.perf_counter()

        chance = random.Random(1)

        async def one() -> None:
            """One call, already counted in flight by whoever launched it (so `more` never overshoots)."""
            cancel_after = chance.randint(1, max(1, workload.tokens - 1)) if chance.random() < cancel_fraction else None
            record = await _grpc_request(stub, workload, next(counter), timeout, cancel_after)
            in_flight[0] -= 1
            records.append(record)
            progress.advance()

        def launched() -> None:
            in_flight[0] += 1
            most[0] = max(most[0], in_flight[0])

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
    return report
