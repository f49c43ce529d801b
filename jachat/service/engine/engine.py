"""The engine: rinna's tokenizer and the scheduler here, CTranslate2 in the engine process, replies into asyncio.

It speaks dataclasses only (no protobuf), and it is the only door to the scheduler: front ends call
`check_capacity`, `prepare` (or `prepare_text`, `tokenize`), then `stream()`, which yields `Delta`s (text and tokens)
and ends with a `Completion`, or `score` / `score_prompts`, which queue a scoring job; `offload` runs a big
answer's building on the preparation pool; the drain calls `abandon`.
Requests go through the batching scheduler (scheduler.py), which runs each batch in the engine process (core.py,
through link.py: CTranslate2 never shares a GIL with the edge). The tokens it generates come back in batches; a
receiver thread decodes each, assembles the reply (<NL>, stop strings) and hands the deltas to the caller's event
loop, which is never blocked by generation.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from collections.abc import AsyncGenerator, Callable, Sequence
from pathlib import Path
from typing import TypeVar

from jachat.manifest import TOKENIZER_FILE, Manifest, read_manifest, verify_manifest
from jachat.service.domain.errors import DeadlineExceeded, FieldPath, FieldViolation, InvalidRequest
from jachat.service.domain.request import ChatRequest, ScoreRequest, TextRequest
from jachat.service.domain.results import (
    Completion,
    Delta,
    FinishReason,
    GeneratedToken,
    ModelInfo,
    Priority,
    PromptScores,
    Scored,
)
from jachat.service.domain.sampling import SamplingOptions
from jachat.service.engine.core import rss_bytes
from jachat.service.engine.link import EngineProcess
from jachat.service.engine.options import EngineOptions, SchedulerOptions
from jachat.service.engine.preparation import PreparedRequest, Preparer, Prompt
from jachat.service.engine.scheduler import Scheduler, SchedulerObserver
from jachat.service.engine.scoring import Scoring
from jachat.service.engine.sequence import Generation
from jachat.service.engine.wire import CoreOptions, ScoredRow
from jachat.service.text.prompt import TURN_MARKERS, Turn
from jachat.service.text.reply import ReplyAssembler
from jachat.service.text.tokenizer import Tokenizer

log = logging.getLogger("jachat.engine")
T = TypeVar("T")


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


def mib(size: int) -> str:
    return f"{size / 2**20:.0f} MiB"


AUTO_REPLICAS = 4  # the most replicas the engine process picks by itself (core.resolve_threads)
SEED_NEEDS_THE_LOOP = (
    "a seed is honoured by the decode loop only (--decode-loop native or auto): static batches share CTranslate2's "
    "one process-wide random state"
)
KV_BUDGET = "KV-cache budget (--kv-cache-tokens)"  # what holds a call when it is less than the context


def loop_admission(options: SchedulerOptions, rows: int) -> SchedulerOptions:
    """The scheduler as the decode loop's admission: a place per row (`rows` calls at once), every call a job of its
    own, started the moment a place is free (no waiting for a batch to fill, no staggering: a call that joins a
    running batch delays no one). The fairness order and priorities still decide who takes a freed place."""
    return dataclasses.replace(
        options, replicas=rows, spare_replicas=0, max_batch_size=1, max_batch_wait=0.0, batch_idle=0.0, stagger=False
    )


class Engine:
    def __init__(
        self,
        options: EngineOptions,
        observer: SchedulerObserver | None = None,
        on_lost: Callable[[str], None] | None = None,
    ) -> None:
        """Check the model folder and tokenizer here, then start the engine process, which loads the weights (once:
        this process never does). `on_lost` hears, from an engine thread, that the engine process died."""
        model_dir = Path(options.model_dir)
        self.manifest: Manifest = read_manifest(model_dir)
        if options.verify_checksums:
            verify_manifest(model_dir, self.manifest)
        self.tokenizer = Tokenizer(model_dir / TOKENIZER_FILE)
        check_vocabulary(self.tokenizer, model_dir)
        core_options = CoreOptions(
            model_dir=model_dir,
            quantization=self.manifest.quantization,
            context_length=self.manifest.shape.context_length,
            eos_id=self.tokenizer.eos_id,
            device=options.device,
            compute_type=options.compute_type,
            device_index=options.device_index,
            decode_loop=options.decode_loop,
            kv_cache_tokens=options.kv_cache_tokens,
            prefill_tokens=options.prefill_tokens,
            replicas=options.scheduler.replicas,
            intra_threads=options.intra_threads,
            max_batch_size=options.scheduler.max_batch_size,
            warm_up=options.warm_up,
            spare_replicas=options.scheduler.spare_replicas,
        )
        replicas = (options.scheduler.replicas or AUTO_REPLICAS) + options.scheduler.spare_replicas
        slots = replicas * options.scheduler.max_batch_size  # the decode loop's rows (max_batch_size) fit too
        self.core = EngineProcess(core_options, slots, on_lost)
        loaded = self.core.loaded
        self.info = ModelInfo(
            model_name=self.manifest.source,
            quantization=self.manifest.quantization,
            compute_type=loaded.compute_type,
            device=loaded.device,
            vocab_size=self.manifest.shape.vocab_size,
            context_length=self.manifest.shape.context_length,
        )
        self.warm = loaded.warm
        self.loop = loaded.loop  # the decode loop runs (each row its own options and seed), not static batches
        self.kv_cache_tokens = loaded.kv_cache_tokens  # its KV-cache budget, in positions (0: static batches)
        if self.warm is not None:
            plan = self.warm.shapes
            log.info(
                "warm start: %d shapes (batches up to %d, prompts up to %d tokens) on %d replicas in %.2f s",
                len(plan),
                max(s.batch for s in plan),
                max(s.prompt for s in plan),
                loaded.all_replicas,
                self.warm.seconds,
            )
        scheduler_options = dataclasses.replace(
            options.scheduler, replicas=loaded.replicas, spare_replicas=loaded.spare_replicas
        )
        if loaded.loop:  # admission, not batch assembly: each call joins the running batch as soon as it has room
            scheduler_options = loop_admission(scheduler_options, loaded.replicas)
        self.scheduler = Scheduler(self.core, scheduler_options, observer)
        if loaded.loop and loaded.kv_cache_tokens < self.info.context_length:  # no call may outgrow the cache
            self.preparer = Preparer(self.tokenizer, loaded.kv_cache_tokens, context_name=KV_BUDGET)
        else:
            self.preparer = Preparer(self.tokenizer, self.info.context_length)
        if loaded.loop:
            runs = (
                f"the decode loop: up to {loaded.replicas} calls in one running batch, {loaded.intra_threads} threads, "
                f"a KV cache of {loaded.kv_cache_tokens} positions "
                f"({mib(loaded.kv_cache_tokens * loaded.kv_bytes_per_token)})"
            )
        else:
            runs = (
                f"{loaded.replicas} replicas x {loaded.intra_threads} threads "
                f"(+{loaded.spare_replicas} spare, for light load)"
            )
        log.info(
            "loaded %s (%s) on %s as %s, %s",
            self.info.model_name,
            self.info.quantization,
            self.info.device,
            self.info.compute_type,
            runs,
        )
        log.info(
            "engine process pid %d: RSS %s (CTranslate2, the weights); this process: RSS %s",
            self.core.pid,
            mib(self.core.rss()),
            mib(rss_bytes()),
        )

    def close(self) -> None:
        """Stop taking work, wait for the batches running, then stop the engine process (it destroys CTranslate2's
        generator before it exits, while its Python is fully alive)."""
        self.preparer.close()
        self.scheduler.close()
        self.core.close()

    def check_capacity(self, priority: Priority = Priority.INTERACTIVE, tenant: str = "default") -> None:
        """Raise Overloaded at once when the queue is full for this priority or tenant: before any work."""
        self.scheduler.check_capacity(priority, tenant)

    async def prepare(self, request: ChatRequest) -> PreparedRequest:
        """Validate, render, encode and fit a generation request (on the preparation pool)."""
        return await self.preparer.prepare(request)

    async def prepare_text(self, request: TextRequest, where: FieldPath = ("prompt",)) -> PreparedRequest:
        """Check, encode and fit a raw prompt (on the preparation pool)."""
        return await self.preparer.prepare_text(request, where)

    async def tokenize(self, turns: Sequence[Turn]) -> Prompt:
        """The conversation's prompt as the model would see it (on the preparation pool)."""
        return await self.preparer.tokenize(turns)

    async def score(
        self,
        request: ScoreRequest,
        deadline: float | None = None,
        priority: Priority = Priority.INTERACTIVE,
        tenant: str = "default",
    ) -> Scored:
        """Each candidate reply's tokens and teacher-forced log-probabilities after the conversation: one scoring job,
        queued as model work (scoring.py). Raises InvalidRequest, Overloaded, DeadlineExceeded, EngineLost or
        EngineFailure."""
        prompt, candidates = await self.preparer.prepare_score(request)
        rows = await self._scored([prompt.ids + ids for ids in candidates], False, deadline, priority, tenant)
        start = len(prompt.ids) - 1  # log-probability i is that of sequence[i + 1]
        return Scored(
            len(prompt.ids),
            tuple(
                tuple(GeneratedToken(i, p) for i, p in zip(ids, scores[start:], strict=True))
                for ids, (scores, _, _) in zip(candidates, rows, strict=True)
            ),
        )

    async def score_prompts(
        self,
        prompts: list[list[int]],
        top: bool = False,
        deadline: float | None = None,
        priority: Priority = Priority.INTERACTIVE,
        tenant: str = "default",
    ) -> list[PromptScores]:
        """Each prompt's tokens after the first with their log-probabilities given the tokens before, and with `top`
        each place's most likely token: one scoring job for them all (one queue place, as a Score call's)."""
        scored = [ids for ids in prompts if len(ids) >= 2]  # a lone token has nothing before it
        rows = iter(await self._scored(scored, top, deadline, priority, tenant) if scored else [])
        out = []
        for ids in prompts:
            if len(ids) < 2:
                out.append(PromptScores(()))
                continue
            scores, best, best_scores = next(rows)
            out.append(
                PromptScores(
                    tuple(GeneratedToken(i, p) for i, p in zip(ids[1:], scores, strict=True)),
                    tuple(GeneratedToken(i, p) for i, p in zip(best, best_scores, strict=True)),
                )
            )
        return out

    async def _scored(
        self, sequences: list[list[int]], top: bool, deadline: float | None, priority: Priority, tenant: str
    ) -> list[ScoredRow]:
        job = Scoring(sequences, top, deadline, asyncio.get_running_loop(), priority, tenant)
        self.scheduler.submit(job)
        try:
            return await job.result()
        finally:
            if job.finish_reason is None:  # the caller left first: the job leaves the queue or stops
                self.scheduler.withdraw(job)

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
        deadline: float | None = None,
        include_stop: bool = False,
        priority: Priority = Priority.INTERACTIVE,
        tenant: str = "default",
        logprobs: bool = False,
        streaming: bool = True,
        raw: bool = False,
    ) -> AsyncGenerator[Delta | Completion, None]:
        """Deltas of the reply (text and tokens), then one Completion. Closing the iterator early stops the sequence.
        With include_stop, the text ends with the caller's stop string that ended it. With logprobs, each token
        carries its log-probability (else 0.0). Without streaming, the text and tokens come in one delta at the
        end (the caller wants the whole reply: its loop is not woken per token). A `raw` reply is the model's text as
        it wrote it (a completion: `<NL>` stays, and only the caller's stop strings and </s> end it).

        Raises Overloaded when the queue is full, DeadlineExceeded when the `deadline` (time.monotonic()) passes
        first."""
        if options.seed is not None and not options.greedy and not self.loop:
            raise InvalidRequest([FieldViolation(("sampling", "seed"), SEED_NEEDS_THE_LOOP)])
        max_new = options.max_new_tokens if max_new_tokens is None else max_new_tokens
        gen = Generation(
            prompt_ids,
            options,
            max_new,
            deadline,
            self.tokenizer.eos_id,
            self.tokenizer.decoder(),
            ReplyAssembler(options.stop, () if raw else TURN_MARKERS, include_stop, newlines=not raw),
            asyncio.get_running_loop(),
            priority,
            tenant,
            logprobs,
            streaming,
        )
        self.scheduler.submit(gen)
        try:
            ended = False
            while not ended:
                items = await gen.take()
                delta = gen.unsent.take()  # everything final since the last take: the caller's next delta
                if delta is not None:
                    yield delta
                for item in items:
                    if isinstance(item, BaseException):
                        raise item
                    ended = ended or item is None
            if gen.finish_reason is FinishReason.DEADLINE:
                raise DeadlineExceeded(f"the deadline passed after {gen.steps} generated tokens")
            assert gen.finish_reason is not None
            yield Completion(
                finish_reason=gen.finish_reason,
                prompt_tokens=len(prompt_ids),
                completion_tokens=gen.steps,
                token_ids=tuple(gen.token_ids),
                tokens=gen.unsent.tail(),
                stop_sequence=gen.reply.matched,
                started_at=gen.started_at,
                first_token_at=gen.first_token_at,
                finished_at=gen.finished_at,
                batch_size=gen.batch_size,
            )
        finally:
            if gen.finish_reason is None:
                self.scheduler.withdraw(gen)
