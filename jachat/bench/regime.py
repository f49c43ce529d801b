"""The GPU regime on a CPU: is the service as fast as CTranslate2 when a decode step takes a millisecond?

On a GPU a decode step of the 3.6B model takes milliseconds, and every token calls back into Python. A tiny
rinna-shaped model (hidden 96, 3 layers) has steps of about a millisecond on one CPU thread, so this machine shows
what the GPU would: whether the per-token path and the edge keep up with the engine. One run, side by side:

- the floor: CTranslate2 alone, one thread, the same `concurrency` prompts as one batch, with a trivial per-token
  callback (any streaming server pays for one; CTranslate2 without a callback is printed beside it);
- the service (`--replicas 1 --intra-threads 1`): `concurrency` closed-loop unary Generate clients, then the same
  number of GenerateStream clients, exactly `tokens` tokens each.

Ratios are the service's tokens/s over the floor's. The CPU time each process spent per generated token is printed
beside them (the server's bounds what one server process can carry; the engine's is CTranslate2's plus the
callback): the figures behind the README's projection for a GPU. This machine's speed drifts by several percent from
minute to minute, so the floor is measured before and after the service, and the ratios use the mean of the two.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

from jachat.bench.processes import children, cpu_model, cpu_seconds
from jachat.bench.workload import Record, Report, Workload
from jachat.v1 import chat_pb2, chat_pb2_grpc

SERVE = ("--device", "cpu", "--replicas", "1", "--intra-threads", "1")


def per_token(pids: dict[str, int], run: Callable[[], Report]) -> tuple[Report, dict[str, float]]:
    """Run, and the CPU microseconds each process spent per token generated meanwhile."""
    before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    report = run()
    tokens = max(1, report.output_tokens)
    return report, {name: (cpu_seconds(pid) - before[name]) / tokens * 1e6 for name, pid in pids.items()}


def engine_floor(model: Path, workload: Workload, n: int, rounds: int, callback: bool) -> float:
    """CTranslate2's tokens/s on one thread: n prompts as one batch, `rounds` times (after one warm-up round)."""
    import ctranslate2

    from jachat.manifest import TOKENIZER_FILE
    from jachat.service.text.tokenizer import Tokenizer

    tokenizer = Tokenizer(model / TOKENIZER_FILE)
    generator = ctranslate2.Generator(str(model), device="cpu", inter_threads=1, intra_threads=1)
    prompts = [[tokenizer.pieces[i] for i in tokenizer.encode(workload.prompt(j))] for j in range(n)]
    kwargs: dict[str, Any] = dict(
        max_length=workload.tokens,
        include_prompt_in_result=False,
        end_token=[tokenizer.eos_id],
        **workload.options().ctranslate2_kwargs(),
    )
    if callback:
        kwargs["callback"] = lambda step: False
    generator.generate_batch(prompts, **kwargs)  # warm-up
    started = time.perf_counter()
    tokens = 0
    for _ in range(rounds):
        tokens += sum(len(r.sequences_ids[0]) for r in generator.generate_batch(prompts, **kwargs))
    seconds = time.perf_counter() - started
    del generator
    return tokens / seconds


async def _unary(stub: chat_pb2_grpc.ChatServiceAsyncStub, workload: Workload, i: int) -> Record:
    turns = [chat_pb2.Turn(speaker=chat_pb2.SPEAKER_USER, text=workload.prompts[i % len(workload.prompts)])]
    started = time.perf_counter()
    try:
        reply = await stub.Generate(chat_pb2.GenerateRequest(turns=turns, sampling=workload.sampling_pb()), timeout=600)
    except grpc.aio.AioRpcError as exc:
        return Record(float("nan"), time.perf_counter() - started, 0, exc.code().name)
    e2e = time.perf_counter() - started
    return Record(e2e, e2e, reply.usage.completion_tokens)


async def run_unary(target: str, workload: Workload, n: int, rounds: int) -> Report:
    """n closed-loop clients of unary Generate, `rounds` calls each (after one warm-up call each)."""
    async with grpc.aio.insecure_channel(target) as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        await asyncio.gather(*(_unary(stub, workload, i) for i in range(n)))

        async def client(c: int) -> list[Record]:
            return [await _unary(stub, workload, c + r * n) for r in range(rounds)]

        started = time.perf_counter()
        records = [r for rs in await asyncio.gather(*(client(c) for c in range(n))) for r in rs]
        seconds = time.perf_counter() - started
    return Report.of(f"service, {n} unary", n, records, seconds)


def regime_main(model: Path, n: int, rounds: int, tokens: int, serve_args: list[str], output: Path | None) -> int:
    from jachat.bench.clients import run_grpc
    from jachat.bench.launcher import spawn
    from jachat.bench.reports import write_report

    workload = Workload(tokens=tokens)
    figures: dict[str, Any] = {}
    before = engine_floor(model, workload, n, rounds, callback=True)
    server = spawn(model, *SERVE, "--max-batch-size", str(n), *serve_args)
    try:
        pids = {"server": server.process.pid, "engine": children(server.process.pid)[0]}
        unary, unary_cpu = per_token(pids, lambda: asyncio.run(run_unary(server.target, workload, n, rounds)))
        stream, stream_cpu = per_token(
            pids, lambda: asyncio.run(run_grpc(server.target, workload, n, n * rounds, label=f"service, {n} streams"))
        )
        server_log = [line.rstrip() for line in server.log if "engine" in line and "RSS" in line]
    finally:
        server.stop()
    after = engine_floor(model, workload, n, rounds, callback=True)
    floor = (before + after) / 2
    bare = engine_floor(model, workload, n, rounds, callback=False)
    figures = {
        "ctranslate2_no_callback": bare,
        "ctranslate2_trivial_callback_before": before,
        "ctranslate2_trivial_callback_after": after,
        "ctranslate2_trivial_callback": floor,
        "service_unary": unary.tokens_per_second,
        "service_streaming": stream.tokens_per_second,
        "unary_ratio": unary.tokens_per_second / floor,
        "streaming_ratio": stream.tokens_per_second / floor,
        "callback_microseconds_per_token": (1 / floor - 1 / bare) * 1e6,
        "unary_cpu_microseconds_per_token": unary_cpu,
        "streaming_cpu_microseconds_per_token": stream_cpu,
        "errors": {**unary.errors, **stream.errors},
    }
    print(f"GPU regime on {cpu_model()}: {model.name}, one thread, {n} concurrent, {tokens} tokens")
    print(f"{'CTranslate2, no callback':<44} {bare:>9.0f} tok/s")
    floor_label = "CTranslate2, trivial callback (the floor)"
    print(f"{floor_label:<44} {floor:>9.0f} tok/s  (before {before:.0f}, after {after:.0f})")
    print(f"{'service, unary Generate':<44} {unary.tokens_per_second:>9.0f} tok/s  {figures['unary_ratio']:.2f}x")
    print(f"{'service, GenerateStream':<44} {stream.tokens_per_second:>9.0f} tok/s  {figures['streaming_ratio']:.2f}x")
    print(f"a trivial callback costs CTranslate2 {figures['callback_microseconds_per_token']:.1f} µs per token")
    for label, cpu in (("unary", unary_cpu), ("streaming", stream_cpu)):
        print(f"CPU per token, {label}: server {cpu['server']:.1f} µs, engine {cpu['engine']:.1f} µs")
    for line in server_log:
        print(line)
    if figures["errors"]:
        print(f"errors: {figures['errors']}")
    if output is not None:
        meta = {"cpu": cpu_model(), "model": str(model), "concurrency": n, "rounds": rounds, "tokens": tokens}
        write_report(output, {"meta": meta, "figures": figures})
    return 1 if figures["errors"] else 0
