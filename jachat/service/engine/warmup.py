"""Warm start: every replica generates a little before health turns SERVING, so no caller pays for first use.

First use is expensive on a GPU: the ctranslate2 wheel has no compiled code for GPUs newer than sm_86 (H100, H200),
so each kernel is JIT-compiled from PTX by the driver the first time it runs, and cuBLAS picks and loads its
kernels per shape; each replica (a CUDA stream and its own buffers) pays again. On a CPU the first call still
allocates and touches the replica's buffers and primes its caches. So each replica runs the shapes that bring the
kernels in: one short greedy sequence, then batches with sampling (the model card's top-k, temperature and
repetition penalty) at growing prompt lengths and batch sizes, up to the largest batch the scheduler makes. The
replicas run them side by side (one call per replica at a time: CTranslate2 gives each concurrent call a free
replica).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

NEW_TOKENS = 4  # decoding steps per shape: the per-token kernels run as in a reply
GREEDY = {"sampling_topk": 1}
CARD = {"sampling_topk": 50, "sampling_temperature": 0.7, "repetition_penalty": 1.1}


@dataclass(frozen=True)
class Shape:
    batch: int
    prompt: int  # tokens
    sampling: bool


@dataclass(frozen=True)
class WarmUp:
    shapes: tuple[Shape, ...]
    replicas: int
    seconds: float


def shapes(device: str, max_batch_size: int, context_length: int) -> tuple[Shape, ...]:
    """What to run: a short greedy sequence, then sampling batches up to the scheduler's largest (on a CPU up to
    4 x 128 tokens, which touches every buffer without costing seconds on a large model)."""
    longest = max(1, context_length - NEW_TOKENS - 1)
    if device == "cpu":
        plan = [(1, 16, False), (min(4, max_batch_size), min(128, longest), True)]
    else:
        plan = [
            (1, 16, False),
            (1, min(256, longest), True),
            (min(8, max_batch_size), min(256, longest), True),
            (max_batch_size, min(1024, longest), True),
        ]
    unique = dict.fromkeys(Shape(b, min(p, longest), s) for b, p, s in plan)
    return tuple(unique)


def warm_up(generator: Any, pieces: Sequence[str], eos_id: int, replicas: int, plan: Sequence[Shape]) -> WarmUp:
    """Run every shape on every replica; returns what ran and how long it took (the model is then warm)."""
    filler = [p for p in pieces[100:400] if not p.startswith("<")] or list(pieces[100:101])
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=replicas, thread_name_prefix="jachat-warm") as pool:
        for shape in plan:
            prompt = [filler[i % len(filler)] for i in range(shape.prompt)]

            def run(_: int, shape: Shape = shape, prompt: list[str] = prompt) -> None:
                generator.generate_batch(
                    [prompt] * shape.batch,
                    max_length=NEW_TOKENS,
                    min_length=NEW_TOKENS,
                    include_prompt_in_result=False,
                    end_token=[eos_id],
                    return_scores=True,
                    callback=lambda step: False,  # as the scheduler calls it: the streaming path
                    **(CARD if shape.sampling else GREEDY),
                )

            list(pool.map(run, range(replicas)))  # side by side: one call per replica
    return WarmUp(tuple(plan), replicas, time.perf_counter() - started)
