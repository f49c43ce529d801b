"""The baselines the service is compared with: CTranslate2 driven directly, and the model card's Transformers code."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from jachat.bench.workload import Progress, Record, Report, Workload
from jachat.converter.manifest import TOKENIZER_FILE


def _ct2(model: Path) -> tuple[Any, Any]:
    import ctranslate2

    from jachat.converter.manifest import read_manifest
    from jachat.service.engine import resolve_compute_type
    from jachat.service.tokenizer import Tokenizer

    compute_type = resolve_compute_type("default", read_manifest(model).quantization, "cpu")
    return ctranslate2.Generator(str(model), device="cpu", compute_type=compute_type), Tokenizer(model / TOKENIZER_FILE)


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


def run_ct2(model: Path, workload: Workload, batch_size: int, rounds: int) -> Report:
    """`rounds` calls of generate_batch with `batch_size` prompts each (1: one sequence at a time)."""
    generator, tokenizer = _ct2(model)
    name = "ctranslate2, 1 sequence" if batch_size == 1 else f"ctranslate2, batch of {batch_size}"
    _ct2_batch(generator, tokenizer, workload, list(range(batch_size)))  # warm-up
    progress = Progress(name, rounds * batch_size, None)
    records: list[Record] = []
    started = time.perf_counter()
    for r in range(rounds):
        for record in _ct2_batch(generator, tokenizer, workload, [r * batch_size + b for b in range(batch_size)]):
            records.append(record)
            progress.advance()
    seconds = time.perf_counter() - started
    progress.close()
    del generator
    return Report.of(name, batch_size, records, seconds)


def run_hf(checkpoint: Path, workload: Workload, requests: int) -> Report:
    """The model card's code path: AutoModelForCausalLM (float32, CPU) and generate(do_sample=...)."""
    import torch
    import transformers

    from jachat.service.tokenizer import Tokenizer

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
