"""The engine: a CTranslate2 Generator with rinna's tokenizer, streaming replies into asyncio.

It speaks dataclasses only (no protobuf), and it is the only door to the scheduler: front ends call
`check_capacity`, `prepare` (or `tokenize`), then `stream()`, which yields `Delta`s (text and tokens) and ends with a
`Completion`; the drain calls `abandon`.
Requests go through the batching scheduler (scheduler.py), whose generation threads run `generate_batch`; the
per-token callback decodes each token, assembles the reply (<NL>, stop strings) and hands the delta to the
caller's event loop, which is never blocked by generation.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import time
from collections.abc import AsyncGenerator, Callable, Sequence
from pathlib import Path
from typing import TypeVar

import ctranslate2

from jachat.manifest import TOKENIZER_FILE, Manifest, read_manifest, verify_manifest
from jachat.service.domain.errors import DeadlineExceeded
from jachat.service.domain.request import ChatRequest
from jachat.service.domain.results import Completion, Delta, FinishReason, ModelInfo, Priority
from jachat.service.domain.sampling import SamplingOptions
from jachat.service.engine import gpu
from jachat.service.engine.options import EngineOptions
from jachat.service.engine.preparation import PreparedRequest, Preparer, Prompt
from jachat.service.engine.scheduler import Scheduler, SchedulerObserver
from jachat.service.engine.sequence import Generation
from jachat.service.engine.warmup import WarmUp, shapes, warm_up
from jachat.service.text.prompt import TURN_MARKERS, Turn
from jachat.service.text.reply import ReplyAssembler
from jachat.service.text.tokenizer import Tokenizer

log = logging.getLogger("jachat.engine")
T = TypeVar("T")


# What to run when the device cannot run a compute type (first supported entry wins).
_FALLBACKS = {
    "int8_float16": ("int8_bfloat16", "int8_float32", "int8", "float32"),
    "int8_bfloat16": ("int8_float16", "int8_float32", "int8", "float32"),
    "int8_float32": ("int8", "float32"),
    "int8": ("int8_float32", "float32"),
    "float16": ("bfloat16", "float32"),
    "bfloat16": ("float16", "float32"),
    "int16": ("int8", "float32"),
    "float32": (),
}


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if ctranslate2.get_cuda_device_count() > 0 else "cpu"
    if device not in ("cpu", "cuda"):
        raise ValueError(f"unknown device {device!r}; choose one of: auto, cpu, cuda")
    return device


def check_vocabulary(tokenizer: Tokenizer, model_dir: Path) -> None:
    """spiece.model must be the tokenizer the model was converted with: same pieces at the same ids."""
    path = model_dir / "vocabulary.json"
    try:
        vocabulary = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read {path}: {exc}") from exc
    pieces = tokenizer.pieces
    if len(vocabulary) < len(pieces) or vocabulary[: len(pieces)] != pieces:
        first = next((i for i, (a, b) in enumerate(zip(pieces, vocabulary, strict=False)) if a != b), len(vocabulary))
        raise ValueError(
            f"{tokenizer.path} does not match the model's vocabulary ({path}): {len(pieces)} pieces against "
            f"{len(vocabulary)} tokens, first difference at id {first}; the tokenizer and the weights must come from "
            "the same conversion"
        )


def cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def resolve_threads(device: str, replicas: int, intra_threads: int) -> tuple[int, int]:
    """(replicas, intra_threads), 0 meaning auto. On CPU the cores are shared out: a single sequence's decoding is
    bound by memory, not compute (one thread decodes as fast as two here), so several one-thread replicas serve
    concurrent batches better than one wide one. On GPU one replica; intra_threads only matters for the CPU."""
    if device != "cpu":
        return replicas or 1, intra_threads
    cores = cpu_cores()
    replicas = replicas or min(4, cores)
    return replicas, intra_threads or max(1, cores // replicas)


def resolve_compute_type(requested: str, quantization: str, device: str) -> str:
    """The compute type to run: the requested one (default: the converted one), or a fallback the device has."""
    wanted = quantization if requested == "default" else requested
    if wanted == "auto":
        return "auto"
    supported = ctranslate2.get_supported_compute_types(device)
    if wanted in supported:
        return wanted
    if wanted not in _FALLBACKS:
        raise ValueError(f"unknown compute type {wanted!r}; choose one of: default, auto, {', '.join(_FALLBACKS)}")
    for fallback in _FALLBACKS[wanted]:
        if fallback in supported:
            log.warning("compute type %s is not supported on %s; falling back to %s", wanted, device, fallback)
            return fallback
    raise ValueError(f"no compute type close to {wanted} runs on {device} (supported: {sorted(supported)})")


class Engine:
    def __init__(self, options: EngineOptions, observer: SchedulerObserver | None = None) -> None:
        model_dir = Path(options.model_dir)
        self.manifest: Manifest = read_manifest(model_dir)
        if options.verify_checksums:
            verify_manifest(model_dir, self.manifest)
        self.tokenizer = Tokenizer(model_dir / TOKENIZER_FILE)
        check_vocabulary(self.tokenizer, model_dir)
        device = resolve_device(options.device)
        if device == "cuda":  # the driver checked and cuBLAS 12 found before CTranslate2 needs them (gpu.py)
            log.info("cuBLAS 12 from %s", gpu.prepare(options.device_index, ctranslate2.get_cuda_device_count()))
        compute_type = resolve_compute_type(options.compute_type, self.manifest.quantization, device)
        replicas, intra_threads = resolve_threads(device, options.scheduler.replicas, options.intra_threads)
        scheduler_options = dataclasses.replace(options.scheduler, replicas=replicas)
        weights = (model_dir / "model.bin").stat().st_size
        explained = gpu.explain(options.device_index, weights) if device == "cuda" else contextlib.nullcontext()
        with explained:
            self.generator = ctranslate2.Generator(
                str(model_dir),
                device=device,
                device_index=options.device_index,
                compute_type=compute_type,
                inter_threads=replicas,
                intra_threads=intra_threads,
            )
        self.info = ModelInfo(
            model_name=self.manifest.source,
            quantization=self.manifest.quantization,
            compute_type=self.generator.compute_type,
            device=device,
            vocab_size=self.manifest.shape.vocab_size,
            context_length=self.manifest.shape.context_length,
        )
        pieces, eos_id = self.tokenizer.pieces, self.tokenizer.eos_id
        self.warm: WarmUp | None = None
        if options.warm_up:
            plan = shapes(device, scheduler_options.max_batch_size, self.info.context_length)
            with explained:
                self.warm = warm_up(self.generator, pieces, eos_id, replicas, plan)
            log.info(
                "warm start: %d shapes (batches up to %d, prompts up to %d tokens) on %d replicas in %.2f s",
                len(plan),
                max(s.batch for s in plan),
                max(s.prompt for s in plan),
                replicas,
                self.warm.seconds,
            )
        self.scheduler = Scheduler(self.generator, pieces, eos_id, scheduler_options, observer)
        self.preparer = Preparer(self.tokenizer, self.info.context_length)
        log.info(
            "loaded %s (%s) on %s as %s, %d replicas x %d threads",
            self.info.model_name,
            self.info.quantization,
            device,
            self.info.compute_type,
            replicas,
            intra_threads,
        )

    def close(self) -> None:
        """Stop taking work, wait for the batches running, then destroy the CTranslate2 generator here and now.
        Destroying it joins its replicas' threads while Python is fully alive; left to the interpreter's
        finalization, a replica thread that once ran our callback could meet Python shutting down, and the process
        ended with SIGABRT ("terminate called without an active exception") about once in 25 drains with two
        replicas used."""
        self.preparer.close()
        self.scheduler.close()
        self.generator.unload_model()
        del self.generator  # the last reference (the scheduler dropped its own): the C++ pool is destroyed now

    def check_capacity(self, priority: Priority = Priority.INTERACTIVE, tenant: str = "default") -> None:
        """Raise Overloaded at once when the queue is full for this priority or tenant: before any work."""
        self.scheduler.check_capacity(priority, tenant)

    async def prepare(self, request: ChatRequest) -> PreparedRequest:
        """Validate, render, encode and fit a generation request (on the preparation pool)."""
        return await self.preparer.prepare(request)

    async def tokenize(self, turns: Sequence[Turn]) -> Prompt:
        """The conversation's prompt as the model would see it (on the preparation pool)."""
        return await self.preparer.tokenize(turns)

    async def offload(self, work: Callable[[], T]) -> T:
        """Run other CPU work of a request (building a large reply) on the preparation pool, off the event loop."""
        return await self.preparer.run(work)

    def abandon(self, error: BaseException) -> None:
        """End every waiting and running generation now, telling each caller `error` (the drain's grace is over)."""
        self.scheduler.abandon(error)

    async def stream(
        self,
        prompt_ids: list[int],
        options: SamplingOptions,
        max_new_tokens: int | None = None,
        timeout: float | None = None,
        include_stop: bool = False,
        priority: Priority = Priority.INTERACTIVE,
        tenant: str = "default",
    ) -> AsyncGenerator[Delta | Completion, None]:
        """Deltas of the reply (text and tokens), then one Completion. Closing the iterator early stops the sequence.
        With include_stop, the text ends with the caller's stop string that ended it.

        Raises Overloaded when the queue is full, DeadlineExceeded when `timeout` seconds pass first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        max_new = options.max_new_tokens if max_new_tokens is None else max_new_tokens
        gen = Generation(
            prompt_ids,
            options,
            max_new,
            deadline,
            self.tokenizer.eos_id,
            self.tokenizer.decoder(),
            ReplyAssembler(options.stop, TURN_MARKERS, include_stop),
            asyncio.get_running_loop(),
            priority,
            tenant,
        )
        self.scheduler.submit(gen)
        try:
            while (item := await gen.queue.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item
            if gen.finish_reason is FinishReason.DEADLINE:
                raise DeadlineExceeded(f"the deadline passed after {gen.steps} generated tokens")
            assert gen.finish_reason is not None
            yield Completion(
                finish_reason=gen.finish_reason,
                prompt_tokens=len(prompt_ids),
                completion_tokens=gen.steps,
                token_ids=tuple(gen.token_ids),
                stop_sequence=gen.reply.matched,
                started_at=gen.started_at,
                first_token_at=gen.first_token_at,
                finished_at=gen.finished_at,
                batch_size=gen.batch_size,
            )
        finally:
            if gen.finish_reason is None:
                self.scheduler.withdraw(gen)
