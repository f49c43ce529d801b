"""The baselines the service is compared with: CTranslate2 driven directly in the best configuration this machine
allows (threads, replicas, parallel batches), and the model card's Transformers code."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jachat.bench.workload import Progress, Record, Report, Workload
from jachat.manifest import TOKENIZER_FILE


def _ct2(model: Path, replicas: int = 1, threads: int = 0) -> tuple[Any, Any]:
    import ctranslate2

    from jachat.manifest import read_manifest
    from jachat.service.engine.core import resolve_compute_type
    from jachat.service.text.tokenizer import Tokenizer

    compute_type = resolve_compute_type("default", read_manifest(model).quantization, "cpu")
    generator = ctranslate2.Generator(
        str(model), device="cpu", compute_type=compute_type, inter_threads=replicas, intra_threads=threads
    )
    return generator, Tokenizer(model / TOKENIZER_FILE)


def _ct2_batch(generator: Any, tokenizer: Any, workload: Workload, indices: list[int]) -> list[Record]:
    prompts = [[tokenizer.pieces[i] for i in tokenizer.encode(workload.prompt(j))] for j in indices]
    firsts: dict[int, float] = {}
    started = time.perf_counter()

    def callback(step: Any) -> bool:
        firsts.setdefault(step.batch_id, time.perf_counter() - started)
        return False

    results = generator.generate_batch(
        prompts,
        max_length=workload.tokens,
        include_prompt_in_result=False,
        end_token=[tokenizer.eos_id],
        callback=callback,
        **workload.options().ctranslate2_kwargs(),
    )
    e2e = time.perf_counter() - started
    return [Record(firsts.get(b, e2e), e2e, len(r.sequences_ids[0])) for b, r in enumerate(results)]


@dataclass(frozen=True)
class Layout:
    """How CTranslate2 runs n sequences at once: `replicas` x `threads`, the n split into one batch per replica."""

    replicas: int
    threads: int

    def name(self, n: int) -> str:
        if n == 1:
            return f"ctranslate2, 1 sequence ({self.threads} thread{'s' * (self.threads > 1)})"
        size = -(-n // self.replicas)
        return f"ctranslate2 best: {self.replicas}x{self.threads}t, {self.replicas} x batch of {size}"


def layouts(n: int, cores: int) -> list[Layout]:
    """The configurations worth trying on `cores` cores: each replica count up to the cores (and n), the cores
    shared out among them; one sequence also alone on one thread (decoding one sequence is bound by memory)."""
    found = {Layout(r, max(1, cores // r)) for r in range(1, min(cores, n) + 1)}
    if n == 1:
        found = {Layout(1, 1), Layout(1, cores)}
    return sorted(found, key=lambda layout: (layout.replicas, layout.threads))


def _ct2_round(generator: Any, tokenizer: Any, workload: Workload, layout: Layout, first: int, n: int) -> list[Record]:
    """n sequences at once as one batch per replica, the batches in parallel (generate_batch releases the GIL and
    each call takes a free replica)."""
    size = -(-n // layout.replicas)
    chunks = [list(range(first + i, min(first + i + size, first + n))) for i in range(0, n, size)]
    with ThreadPoolExecutor(len(chunks)) as pool:
        return [r for rs in pool.map(lambda c: _ct2_batch(generator, tokenizer, workload, c), chunks) for r in rs]


def run_ct2(model: Path, workload: Workload, n: int, rounds: int, cores: int | None = None) -> Report:
    """CTranslate2 alone at its best on this machine for n sequences at once: every layout is probed with one
    round, and the fastest is measured for `rounds` rounds (its name says which it was)."""
    from jachat.service.engine.core import cpu_cores

    cores = cores or cpu_cores()
    best: tuple[float, Layout] | None = None
    for layout in layouts(n, cores):
        generator, tokenizer = _ct2(model, layout.replicas, layout.threads)
        _ct2_round(generator, tokenizer, workload, layout, 0, n)  # warm-up
        started = time.perf_counter()
        tokens = sum(r.tokens for r in _ct2_round(generator, tokenizer, workload, layout, n, n))
        speed = tokens / (time.perf_counter() - started)
        del generator
        if best is None or speed > best[0]:
            best = (speed, layout)
    assert best is not None
    layout = best[1]
    generator, tokenizer = _ct2(model, layout.replicas, layout.threads)
    _ct2_round(generator, tokenizer, workload, layout, 0, n)  # warm-up
    progress = Progress(layout.name(n), rounds * n, None)
    records: list[Record] = []
    started = time.perf_counter()
    for r in range(rounds):
        for record in _ct2_round(generator, tokenizer, workload, layout, r * n, n):
            records.append(record)
            progress.advance()
    seconds = time.perf_counter() - started
    progress.close()
    del generator
    return Report.of(layout.name(n), n, records, seconds)


def run_hf(checkpoint: Path, workload: Workload, requests: int) -> Report:
    """The model card's code path: AutoModelForCausalLM (float32, CPU) and generate(do_sample=...)."""
    import torch
    import transformers

    from jachat.service.text.tokenizer import Tokenizer

    tokenizer = Tokenizer(checkpoint / TOKENIZER_FILE)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(checkpoint), dtype=torch.float32)
    model.eval()  # type: ignore[no-untyped-call]

    class FirstToken(transformers.generation.streamers.BaseStreamer):
        def __init__(self) -> None:
            self.calls = 0
            self.first: float | None = None

        def put(self, value: Any) -> None:
            self.calls += 1
            if self.calls == 2:  # the first call carries the prompt
                self.first = time.perf_counter()

        def end(self) -> None:
            pass

    def one(i: int) -> Record:
        ids = torch.tensor([tokenizer.encode(workload.prompt(i))])
        streamer = FirstToken()
        started = time.perf_counter()
        with torch.no_grad():
            out: Any = model.generate(
                ids,
                do_sample=workload.temperature > 0,
                max_new_tokens=workload.tokens,
                min_new_tokens=workload.tokens,
                temperature=workload.temperature or None,
                top_k=workload.top_k,
                top_p=workload.top_p,
                repetition_penalty=workload.repetition_penalty,
                pad_token_id=0,
                bos_token_id=2,
                eos_token_id=3,
                streamer=streamer,
            )
        e2e = time.perf_counter() - started
        first = (streamer.first - started) if streamer.first else e2e
        return Record(first, e2e, out.shape[1] - ids.shape[1])

    one(0)  # warm-up
    progress = Progress("transformers (card), 1", requests, None)
    records = []
    started = time.perf_counter()
    for i in range(requests):
        records.append(one(i))
        progress.advance()
    seconds = time.perf_counter() - started
    progress.close()
    return Report.of("transformers (card), 1 sequence", 1, records, seconds)
