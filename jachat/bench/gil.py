"""The GIL micro-benchmark: decode throughput with and without a busy edge, CTranslate2 in this process or in the
engine process.

A decode thread's per-token callback must take the GIL. When CTranslate2 runs in the server's own process, a busy
Python thread there (an event loop under load) makes every callback wait for it; in the engine process (core.py,
driven through link.py as the server drives it) the busy thread has a GIL of its own. Each figure is tokens/s of
the same `n` prompts as one batch on one thread of a tiny model (steps of about a millisecond: the GPU regime).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from jachat.bench.processes import cpu_model
from jachat.bench.reports import write_report
from jachat.bench.workload import Workload


@contextmanager
def busy_thread(on: bool) -> Iterator[None]:
    """A pure-Python thread that never sleeps: the worst an event loop under load does to the GIL."""
    stop = threading.Event()

    def spin() -> None:
        n = 0
        while not stop.is_set():
            n += 1

    thread = threading.Thread(target=spin, daemon=True)
    if on:
        thread.start()
    try:
        yield
    finally:
        stop.set()
        if on:
            thread.join()


class _Row:
    """A row as the scheduler hands it to the engine process, counting its tokens and nothing else."""

    def __init__(self, prompt_ids: list[int], max_new_tokens: int) -> None:
        self.prompt_ids = prompt_ids
        self.max_new_tokens = max_new_tokens
        self.tokens = 0
        self.halt: Callable[[], None] = lambda: None

    @property
    def seed(self) -> int | None:
        return None

    def on_token(self, token_id: int, log_prob: float | None, at: float) -> bool:
        self.tokens += 1
        return False

    def fail(self, error: BaseException) -> None:
        raise error


def _timed(rounds: int, run: Callable[[], int]) -> float:
    run()  # warm-up
    started = time.perf_counter()
    tokens = sum(run() for _ in range(rounds))
    return tokens / (time.perf_counter() - started)


def in_process(model: Path, prompts: list[list[int]], workload: Workload, rounds: int, busy: bool) -> float:
    import ctranslate2

    vocabulary = json.loads((model / "vocabulary.json").read_text(encoding="utf-8"))
    generator = ctranslate2.Generator(str(model), device="cpu", inter_threads=1, intra_threads=1)
    pieces = [[vocabulary[i] for i in ids] for ids in prompts]
    kwargs: dict[str, Any] = workload.options().ctranslate2_kwargs()

    def run() -> int:
        results = generator.generate_batch(
            pieces, max_length=workload.tokens, include_prompt_in_result=False, callback=lambda step: False, **kwargs
        )
        return sum(len(r.sequences_ids[0]) for r in results)

    with busy_thread(busy):
        return _timed(rounds, run)


def engine_process(model: Path, prompts: list[list[int]], workload: Workload, rounds: int, busy: bool) -> float:
    from jachat.manifest import read_manifest
    from jachat.service.engine.link import EngineProcess
    from jachat.service.engine.wire import CoreOptions

    manifest = read_manifest(model)
    options = CoreOptions(
        model, manifest.quantization, manifest.shape.context_length, eos_id=3, device="cpu", replicas=1,
        intra_threads=1, max_batch_size=len(prompts), warm_up=False,
    )  # fmt: skip
    core = EngineProcess(options, len(prompts))
    kwargs: dict[str, Any] = workload.options().ctranslate2_kwargs()

    def run() -> int:
        rows = [_Row(ids, workload.tokens) for ids in prompts]
        core.run(rows, workload.tokens, kwargs)
        return sum(row.tokens for row in rows)

    try:
        with busy_thread(busy):
            speed = _timed(rounds, run)
    finally:
        core.close()
    return speed


def gil_main(model: Path, n: int, rounds: int, tokens: int, output: Path | None) -> int:
    from jachat.manifest import TOKENIZER_FILE
    from jachat.service.text.tokenizer import Tokenizer

    workload = Workload(tokens=tokens)
    tokenizer = Tokenizer(model / TOKENIZER_FILE)
    prompts = [tokenizer.encode(workload.prompt(i)) for i in range(n)]
    figures: dict[str, float] = {}  # tokens/s by run
    for where, run in (("in_process", in_process), ("engine_process", engine_process)):
        for busy in (False, True):
            figures[f"{where}{'_busy' if busy else ''}"] = run(model, prompts, workload, rounds, busy)
    print(f"GIL micro-benchmark on {cpu_model()}: {model.name}, one thread, {n} sequences, {tokens} tokens")
    print(f"{'':<36} {'alone':>10} {'busy thread':>12} {'ratio':>6}")
    for where, label in (("in_process", "CTranslate2 in this process"), ("engine_process", "in the engine process")):
        alone, beside = figures[where], figures[f"{where}_busy"]
        print(f"{label:<36} {alone:>10.0f} {beside:>12.0f} {beside / alone:>6.2f}")
    if output is not None:
        meta = {"cpu": cpu_model(), "model": str(model), "sequences": n, "rounds": rounds, "tokens": tokens}
        write_report(output, {"meta": meta, "tokens_per_second": figures})
    return 0
