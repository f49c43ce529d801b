"""The engine: a CTranslate2 Generator with rinna's tokenizer, streaming replies into asyncio.

It speaks dataclasses only (no protobuf). `Engine.stream()` yields text deltas and ends with a `Completion`. The
blocking `generate_batch` runs on the engine's own worker threads; its per-token callback decodes the token,
assembles the reply (<NL>, stop strings) and hands the delta to the caller's event loop. The callback returns
True, which stops that sequence, on a stop string or when the caller has gone away (cancelled, disconnected).
"""

from __future__ import annotations

import asyncio
import enum
import logging
import threading
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ctranslate2

from converter.manifest import Manifest, read_manifest, verify_manifest
from service.errors import EngineFailure, FieldViolation, InvalidRequest
from service.reply import ReplyAssembler
from service.sampling import SamplingOptions
from service.tokenizer import Tokenizer

log = logging.getLogger("jachat.engine")

TOKENIZER_FILE = "spiece.model"

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


class FinishReason(enum.Enum):
    END_OF_TURN = "end_of_turn"  # the model wrote </s>
    LENGTH = "length"  # max_new_tokens (or the context) was reached
    STOP = "stop"  # a stop string was generated
    CANCELLED = "cancelled"  # the caller went away


@dataclass(frozen=True)
class Completion:
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int  # tokens generated, including a final </s>
    token_ids: tuple[int, ...]  # generated ids, without a final </s>


@dataclass(frozen=True)
class ModelInfo:
    model_name: str
    quantization: str
    compute_type: str
    device: str
    vocab_size: int
    context_length: int


@dataclass(frozen=True)
class EngineOptions:
    model_dir: Path
    device: str = "auto"  # auto, cpu or cuda
    compute_type: str = "default"  # default keeps the converted type
    device_index: int = 0
    inter_threads: int = 1
    intra_threads: int = 0
    verify_checksums: bool = True


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if ctranslate2.get_cuda_device_count() > 0 else "cpu"
    if device not in ("cpu", "cuda"):
        raise ValueError(f"unknown device {device!r}; choose one of: auto, cpu, cuda")
    return device


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


class _Sequence:
    """One request's state, shared between the generation thread and the caller's event loop."""

    def __init__(self, engine: Engine, options: SamplingOptions, loop: asyncio.AbstractEventLoop) -> None:
        self.decoder = engine.tokenizer.decoder()
        self.reply = ReplyAssembler(options.stop)
        self.eos_id = engine.tokenizer.eos_id
        self.loop = loop
        self.queue: asyncio.Queue[str | BaseException | None] = asyncio.Queue()
        self.cancelled = threading.Event()
        self.token_ids: list[int] = []
        self.steps = 0
        self.ended_by_eos = False

    def send(self, item: str | BaseException | None) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)

    def on_step(self, step: Any) -> bool:
        """CTranslate2's per-token callback (generation thread). True stops this sequence."""
        if self.cancelled.is_set():
            return True
        self.steps += 1
        if step.token_id == self.eos_id:
            self.ended_by_eos = True
            return True
        self.token_ids.append(step.token_id)
        text = self.reply.push(self.decoder.feed(step.token_id))
        if text:
            self.send(text)
        return self.reply.stopped

    def on_done(self) -> None:
        if not self.reply.stopped:
            text = self.reply.push(self.decoder.flush())
            text += self.reply.finish()
            if text:
                self.send(text)
        self.send(None)

    def finish_reason(self) -> FinishReason:
        if self.reply.stopped:
            return FinishReason.STOP
        if self.ended_by_eos:
            return FinishReason.END_OF_TURN
        if self.cancelled.is_set():
            return FinishReason.CANCELLED
        return FinishReason.LENGTH


class Engine:
    def __init__(self, options: EngineOptions) -> None:
        model_dir = Path(options.model_dir)
        self.manifest: Manifest = read_manifest(model_dir)
        if options.verify_checksums:
            verify_manifest(model_dir, self.manifest)
        self.tokenizer = Tokenizer(model_dir / TOKENIZER_FILE)
        device = resolve_device(options.device)
        compute_type = resolve_compute_type(options.compute_type, self.manifest.quantization, device)
        self.generator = ctranslate2.Generator(
            str(model_dir),
            device=device,
            device_index=options.device_index,
            compute_type=compute_type,
            inter_threads=options.inter_threads,
            intra_threads=options.intra_threads,
        )
        self.info = ModelInfo(
            model_name=self.manifest.source,
            quantization=self.manifest.quantization,
            compute_type=self.generator.compute_type,
            device=device,
            vocab_size=self.manifest.shape.vocab_size,
            context_length=self.manifest.shape.context_length,
        )
        self._executor = ThreadPoolExecutor(max_workers=options.inter_threads, thread_name_prefix="jachat-gen")
        log.info(
            "loaded %s (%s) on %s as %s", self.info.model_name, self.info.quantization, device, self.info.compute_type
        )

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
        self.generator.unload_model()
        del self.generator

    def prompt_ids(self, prompt: str) -> list[int]:
        return self.tokenizer.encode(prompt)

    def max_new_tokens(self, prompt_tokens: int, options: SamplingOptions, explicit: bool) -> int:
        """max_new_tokens for this prompt; an explicit value that overflows the context is an error."""
        room = self.info.context_length - prompt_tokens
        if room < 1:
            raise InvalidRequest(
                [
                    FieldViolation(
                        "turns", f"the prompt has {prompt_tokens} tokens; the context holds {self.info.context_length}"
                    )
                ]
            )
        if options.max_new_tokens <= room:
            return options.max_new_tokens
        if explicit:
            raise InvalidRequest(
                [
                    FieldViolation(
                        "sampling.max_new_tokens",
                        f"prompt ({prompt_tokens} tokens) + max_new_tokens ({options.max_new_tokens}) exceeds the "
                        f"context of {self.info.context_length} tokens; at most {room} fit",
                    )
                ]
            )
        return room

    def _generate(self, prompt_ids: list[int], options: SamplingOptions, max_new: int, seq: _Sequence) -> None:
        try:
            if not seq.cancelled.is_set():
                self.generator.generate_batch(
                    [[self.tokenizer.pieces[i] for i in prompt_ids]],
                    max_length=max_new,
                    include_prompt_in_result=False,
                    end_token=[seq.eos_id],
                    callback=seq.on_step,
                    **options.ctranslate2_kwargs(),
                )
            seq.on_done()
        except Exception:  # reported to the caller, never raised in the worker thread
            log.exception("generation failed")
            seq.send(EngineFailure("generation failed"))

    async def stream(
        self, prompt_ids: list[int], options: SamplingOptions, max_new_tokens: int | None = None
    ) -> AsyncIterator[str | Completion]:
        """Text deltas of the reply, then one Completion. Closing the iterator early stops the sequence."""
        max_new = max_new_tokens if max_new_tokens is not None else options.max_new_tokens
        seq = _Sequence(self, options, asyncio.get_running_loop())
        future = asyncio.get_running_loop().run_in_executor(
            self._executor, self._generate, prompt_ids, options, max_new, seq
        )
        try:
            while (item := await seq.queue.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item
            await future
            yield Completion(
                finish_reason=seq.finish_reason(),
                prompt_tokens=len(prompt_ids),
                completion_tokens=seq.steps,
                token_ids=tuple(seq.token_ids),
            )
        finally:
            seq.cancelled.set()
