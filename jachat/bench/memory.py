"""Memory of the engine process under long rows (jachat-bench loop): its resident set while 16 rows of 512 positions
run, for each engine, and under a flood of long prompts with a small KV-cache budget, where the calls that do not fit
must wait (none fails, the memory stays bounded)."""

from __future__ import annotations

import dataclasses
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc

from jachat.bench.launcher import ServerProcess
from jachat.bench.processes import children, cmdline, rss_bytes
from jachat.manifest import TOKENIZER_FILE
from jachat.service.text.prompt import Speaker, Turn, render_prompt
from jachat.service.text.tokenizer import Tokenizer
from jachat.v1 import chat_pb2

MIB = 2**20
TEXT = "吾輩は猫である。名前はまだ無い。どこで生れたかとんと見当がつかぬ。"


@dataclasses.dataclass
class MemoryRun:
    name: str
    rows: int  # calls sent at once
    positions: int  # each call's prompt and reply, in tokens
    idle_mib: float  # the engine process before the calls
    peak_mib: float  # the most it held while they ran (sampled every 10 ms)
    errors: int
    seconds: float


def long_text(model: Path, prompt_tokens: int) -> str:
    """A user turn whose rendered prompt has at most `prompt_tokens` tokens, as close as whole sentences allow."""
    tokenizer = Tokenizer(model / TOKENIZER_FILE)
    text = TEXT
    while len(tokenizer.encode(render_prompt([Turn(Speaker.USER, text + TEXT)]))) <= prompt_tokens:
        text += TEXT
    return text


def measure(server: ServerProcess, name: str, text: str, rows: int, new_tokens: int, positions: int) -> MemoryRun:
    """`rows` greedy calls of `text` at once, each exactly `new_tokens` long; the engine's RSS sampled meanwhile."""
    (engine,) = [pid for pid in children(server.process.pid) if b"engine.core" in cmdline(pid)]
    idle = rss_bytes(engine)
    peak = [idle]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.01):
            peak[0] = max(peak[0], rss_bytes(engine))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    sampling = chat_pb2.SamplingParams(
        temperature=0, max_new_tokens=new_tokens, min_new_tokens=new_tokens, repetition_penalty=1.0
    )
    request = chat_pb2.GenerateRequest(
        turns=[chat_pb2.Turn(speaker=chat_pb2.SPEAKER_USER, text=text)], sampling=sampling
    )
    started = time.perf_counter()
    errors = 0
    with server.channel() as channel, ThreadPoolExecutor(rows) as pool:
        stub = server.stub(channel)
        futures = [pool.submit(stub.Generate, request, timeout=600) for _ in range(rows)]
        for future in futures:
            try:
                future.result()
            except grpc.RpcError:
                errors += 1
    seconds = time.perf_counter() - started
    done.set()
    sampler.join()
    return MemoryRun(name, rows, positions, idle / MIB, max(peak[0], rss_bytes(engine)) / MIB, errors, seconds)


def targets(runs: dict[str, MemoryRun], budget_mib: float) -> list[tuple[str, float, float, bool, bool]]:
    """(what, value, limit, floor, met), as the other targets print: the loop's peak at 16 long rows against static
    batches', and the flood: no call failed, and what the engine grew by against the budget's own size."""
    rows: list[tuple[str, float, float, bool, bool]] = []
    if "static" in runs and "loop" in runs:
        ratio = runs["loop"].peak_mib / runs["static"].peak_mib
        rows.append((f"loop RSS peak at {runs['loop'].rows} rows x {runs['loop'].positions} / static's", ratio, 1.2,
                     False, ratio <= 1.2))  # fmt: skip
    if "flood" in runs:
        flood = runs["flood"]
        rows.append(
            ("flood of long prompts over the KV budget: failed calls", flood.errors, 0, False, flood.errors == 0)
        )
        grown = (flood.peak_mib - flood.idle_mib) / budget_mib
        rows.append(("flood: engine RSS growth / the KV budget's size", grown, 2.0, False, grown <= 2.0))
    return rows
