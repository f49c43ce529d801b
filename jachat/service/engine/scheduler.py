"""The batching scheduler: concurrent requests become CTranslate2 `generate_batch` calls.

CTranslate2 has no continuous batching: one call is one static batch with one set of decoding options, and nothing
joins it once it runs. So the scheduler decides what starts together:

- A batch starts when a replica (`inter_threads`) is free. Its head is the oldest waiting request; it takes the
  other waiting requests that can share the call, in arrival order, up to `max_batch_size`, and no more than its
  share when other replicas are free too: n compatible requests and k free replicas make k batches of about n/k
  that run side by side, instead of one batch of n while the other replicas idle (on 2 one-thread CPU replicas, two
  batches of 8 generate 1.6x the tokens/s of one batch of 16; a batch's step costs little more for more rows, but
  one replica's thread does them all). While requests keep
  arriving it waits for more: it starts when it is full, when none has arrived for `batch_idle` seconds, or
  `max_batch_wait` after its head arrived, whichever comes first. A lone caller so waits only `batch_idle`, and
  callers that arrive together (closed-loop clients whose replies ended together) start together. A replica that
  frees counts as an arrival (and as the head's arrival, for `max_batch_wait`): the callers its batch just answered
  come back together, and the calls that waited for the replica share it with them rather than start alone.
- Requests share a call only with identical decoding options (temperature, top-k, top-p, repetition penalty,
  n-gram blocking, min_new_tokens). Their prompts may differ in length by at most `max_prompt_length_spread`
  tokens: CTranslate2 decodes a longer prompt's extra tokens one step at a time, which costs latency. With a
  history-dependent penalty (repetition_penalty != 1 or no_repeat_ngram_size > 0) the prompts must be equally
  long, because those extra prompt tokens would count as generated tokens for the penalty and the reply would
  depend on its batch-mates.
- Each sequence stops on its own (its row's stop flag in the engine process): at its own max_new_tokens, a stop
  string, </s>, cancellation by its caller, or its deadline. Its caller hears of the end at once, not when the
  batch ends.
- At most `max_queued` requests wait; beyond that `submit` raises Overloaded at once.
- Scoring jobs (scoring.py) are model work too: they wait in the same queue, by the same priorities and fair
  shares, until their deadline, and each takes a replica of its own while it runs. At most SCORING_AT_ONCE runs at a
  time: CTranslate2 holds two float vectors of the vocabulary per position it scores, so this bounds the engine's
  memory for scoring, and with more replicas than that, generation always finds one that scoring does not hold.
- Work that waits past its deadline ends then (DEADLINE_EXCEEDED), whether or not a replica frees meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

from jachat.service.domain.errors import EngineFailure, JachatError, Overloaded
from jachat.service.domain.results import FinishedGeneration, FinishReason, Priority
from jachat.service.engine.fairness import FairOrder
from jachat.service.engine.options import SchedulerOptions
from jachat.service.engine.scoring import Scoring
from jachat.service.engine.sequence import Generation, TokenObserver
from jachat.service.engine.wire import ScoredRow
from jachat.service.engine.work import Work

log = logging.getLogger("jachat.scheduler")


class SchedulerObserver(TokenObserver, Protocol):
    """What the scheduler and its sequences report (the service's metrics implement it). Called from any thread."""

    def queue_changed(self, size: int) -> None: ...
    def work_started(self, queued: Sequence[tuple[float, Priority]]) -> None: ...
    def batch_started(self, size: int) -> None: ...
    def replicas_changed(self, busy: int, replicas: int, sequences: int) -> None: ...
    def generation_finished(self, record: FinishedGeneration) -> None: ...
    def scored(self, tokens: int) -> None: ...


class Decoder(Protocol):
    """What runs the work: the engine process (link.py's EngineProcess), or a fake in the fast tier. `run` blocks
    until the batch ends, calling each row's `on_token` meanwhile (from another thread), and sets each row's `halt`
    while it runs; `score` blocks until the job's rows are scored (fewer once its `halt` was called)."""

    def run(self, rows: Sequence[Generation], max_length: int, options: dict[str, Any]) -> None: ...
    def score(self, job: Scoring) -> list[ScoredRow]: ...


SOON = 4  # a running batch with at most this many tokens to go is about to free its replica
STAGGER_CALLS = 2  # a running batch this large means the load is not light (--stagger-batches)
SPARE_RECHECK = 0.01  # seconds between looks at whether a held-back batch may take a spare replica
SPARE_LIGHT = 2  # a spare replica takes a batch only while at most this many calls wait (the load is light)
MIN_SHARE = 4  # calls are split over replicas only into batches of at least this many
SCORING_AT_ONCE = 1  # scoring jobs running at once (their memory, and replicas left to generation)


def _tokens_left(batch: list[Work]) -> tuple[int, int]:
    """(unfinished sequences, most tokens any of them may still produce) of a running batch (or scoring job)."""
    left = [work.tokens_left() for work in batch if work.finish_reason is None]
    return len(left) if isinstance(batch[0], Generation) else 0, max(left, default=0)


class Scheduler:
    def __init__(self, decoder: Decoder, options: SchedulerOptions, observer: SchedulerObserver | None = None) -> None:
        self.decoder: Decoder | None = decoder
        self.options = options
        self.observer = observer
        self.pending: list[Work] = []
        self._arrived: asyncio.Event | None = None
        self._slots: asyncio.Semaphore | None = None
        self._executor = ThreadPoolExecutor(max_workers=options.all_replicas, thread_name_prefix="jachat-gen")
        self._task: asyncio.Task[None] | None = None
        # the batches (and scoring jobs, alone) given to a replica and not yet over, one per busy replica: added on
        # the event loop when dispatched, removed by its engine thread when it ends; under _running_lock
        self._batches: list[list[Work]] = []
        self._running_lock = threading.Lock()
        self._batch_seconds = 1.0  # running estimate of a batch's duration, for Retry-After
        self._step_seconds = 0.0  # running estimate of a batch's time per token (0: none ran yet)
        self.fair = FairOrder(options.batch_promotion)
        self._last_arrival = 0.0
        self._freed_at = 0.0  # when a batch last ended (its replica freed)

    def _ensure_started(self) -> None:
        """Start the batching task on the running event loop (again, if an earlier loop has gone)."""
        loop = asyncio.get_running_loop()
        if self._task is None or self._task.done() or self._task.get_loop() is not loop:
            self.pending = [gen for gen in self.pending if gen.loop is loop]
            self._arrived = asyncio.Event()
            self._slots = asyncio.Semaphore(self.options.all_replicas)
            self._task = asyncio.get_running_loop().create_task(self._run(), name="jachat-scheduler")

    def check_capacity(self, priority: Priority = Priority.INTERACTIVE, tenant: str = "default") -> None:
        """Raise Overloaded when the queue is full for a call of this priority and tenant: an interactive call still
        finds room while a batch call waits (that one is shed when the interactive call is submitted); a tenant
        finds none once it has max_queued_per_tenant calls waiting."""
        mine = sum(gen.tenant == tenant for gen in self.pending)
        if mine >= self.options.max_queued_per_tenant:
            raise Overloaded(
                f"{mine} calls of this tenant already wait (at most {self.options.max_queued_per_tenant}); retry "
                f"after {self._batch_seconds:.1f} s",
                retry_after=self._batch_seconds,
            )
        if len(self.pending) < self.options.max_queued:
            return
        if priority is Priority.INTERACTIVE and self._sheddable() is not None:
            return
        raise Overloaded(
            f"the queue is full ({self.options.max_queued} requests wait); retry after {self._batch_seconds:.1f} s",
            retry_after=self._batch_seconds,
        )

    def _sheddable(self) -> Work | None:
        """The newest waiting batch call: the first to give its place up."""
        return next((gen for gen in reversed(self.pending) if gen.priority is Priority.BATCH), None)

    def submit(self, gen: Work) -> None:
        """Queue the work (raises Overloaded when there is no room for it); it ends at its deadline if it is still
        waiting then."""
        self._ensure_started()
        assert self._arrived is not None
        self.check_capacity(gen.priority, gen.tenant)
        if len(self.pending) >= self.options.max_queued:  # an interactive call takes a batch call's place
            shed = self._sheddable()
            assert shed is not None
            self.pending.remove(shed)
            shed.finish(
                FinishReason.SHED,
                Overloaded(
                    "an interactive call took this batch call's place in the full queue; retry after "
                    f"{self._batch_seconds:.1f} s",
                    retry_after=self._batch_seconds,
                ),
            )
        active = {g.tenant for g in self.running}
        self.fair.arrived(gen, active | {g.tenant for g in self.pending})
        gen.on_finish = self._finished
        if isinstance(gen, Generation):
            gen.observer = self.observer
        self._last_arrival = time.monotonic()
        self.pending.append(gen)
        if gen.deadline is not None:
            gen.expiry = gen.loop.call_later(max(0.0, gen.deadline - self._last_arrival), self._expire, gen)
        self._queue_changed()
        self._arrived.set()

    def withdraw(self, gen: Work) -> None:
        """The caller is gone: waiting work leaves the queue (running work stops at its next token or piece)."""
        gen.cancel()
        if gen in self.pending:
            self._leave(gen)
            self._queue_changed()
            gen.finish(gen.stop_reason())

    def _leave(self, gen: Work) -> None:
        """Work leaves the queue: its deadline's timer goes with it."""
        self.pending.remove(gen)
        if gen.expiry is not None:
            gen.expiry.cancel()
            gen.expiry = None

    def _expire(self, gen: Work) -> None:
        """The deadline of waiting work: it ends now, while every replica may still be busy."""
        gen.expiry = None
        if gen in self.pending:
            self._leave(gen)
            self._queue_changed()
            gen.finish(FinishReason.DEADLINE)

    def _finished(self, gen: Work) -> None:
        if self.observer is None:
            return
        if isinstance(gen, Generation):
            self.observer.generation_finished(gen.record())
        elif gen.finish_reason is FinishReason.LENGTH:  # a scoring job scored to its end
            self.observer.scored(gen.cost)

    def _queue_changed(self) -> None:
        if self.observer is not None:
            self.observer.queue_changed(len(self.pending))

    def _replicas_changed(self) -> None:
        """Busy replicas and the sequence slots their batches hold (a row that ended early keeps its slot until its
        batch ends: a static batch admits no one)."""
        if self.observer is not None:
            with self._running_lock:
                busy, sequences = len(self._batches), sum(len(b) for b in self._batches)
            self.observer.replicas_changed(busy, self.options.all_replicas, sequences)

    async def _run(self) -> None:
        assert self._slots is not None
        loop = asyncio.get_running_loop()
        while True:
            await self._slots.acquire()
            try:
                batch = await self._next_batch()
            except BaseException:
                self._slots.release()
                raise
            with self._running_lock:
                self._batches.append(batch)
            self._replicas_changed()
            future = loop.run_in_executor(self._executor, self._execute, batch)
            future.add_done_callback(self._replica_freed)

    def _replica_freed(self, _: object) -> None:
        if self._slots is not None:
            self._slots.release()
        if self._arrived is not None:  # a batch held back for want of a replica may start now
            self._arrived.set()

    def _staggered(self, batch: list[Work]) -> float:
        """--stagger-batches: when the replica that started last runs a loaded batch (STAGGER_CALLS or more) that
        began less than half a batch ago, a batch on a free replica starts half a batch after it (never later than
        half a batch after its head's arrival). Replies of equal length end together, so replicas that start
        together stay in phase, and a call that arrives just after they start waits a whole batch; staggered by half
        a batch, a replica frees every half batch. But a batch is held at most half its own expected length (the
        per-token pace times its longest budget): a short call is never held for a long batch's sake, and a call
        that no running batch is like starts at once. Returns the monotonic time to start at (0: now)."""
        head = batch[0]
        if not self.options.stagger or not isinstance(head, Generation):
            return 0.0
        with self._running_lock:
            started = [b[0].started_at for b in self._batches if len(b) >= STAGGER_CALLS and b[0].started_at]
        if not started:
            return 0.0
        pace = self._step_seconds
        own = pace * max(gen.tokens_left() for gen in batch) if pace else self._batch_seconds  # (no pace yet)
        half = min(self._batch_seconds, own) / 2
        return min(max(started) + half, head.arrived + half)

    def _spare_allowed(self) -> bool:
        """Whether a batch may start now. On one of the `replicas`, always. On a spare (all `replicas` busy) only
        while the load is light: at most SPARE_LIGHT calls wait and no running batch is about to end. Then an
        arrival starts at once instead of waiting a whole reply for a replica, at the price of sharing the cores
        with the running batches for a while; under load, the spares stay idle, and the batches stay large."""
        with self._running_lock:
            busy = len(self._batches)
            ending = any(_tokens_left(batch)[1] <= SOON for batch in self._batches)
        if busy < self.options.replicas:
            return True
        return busy < self.options.all_replicas and len(self.pending) <= SPARE_LIGHT and not ending

    @property
    def running(self) -> set[Work]:
        """The sequences of the batches given to a replica and not yet over (a snapshot)."""
        with self._running_lock:
            return {gen for batch in self._batches for gen in batch}

    def _share(self, compatible: int) -> int:
        """How many of the compatible waiting calls this batch takes. The idle replicas split the waiting calls
        evenly. A busy replica whose batch is about to end (at most SOON tokens to go) counts as one more replica,
        and its unfinished calls as calls to share: callers whose replies end together (closed loops) come back
        together, and a replica that frees a moment before another must take its own share, not everyone's (measured:
        that alone left batches of 10 and 5 where 8 and 8 were due). A batch far from its end counts for nothing:
        calls never wait behind a long reply while a replica idles."""
        with self._running_lock:
            free = max(1, self.options.replicas - len(self._batches))  # this replica and the others idle now
            ending = [left for left in map(_tokens_left, self._batches) if left[1] <= SOON]
        share = -(-(len(self.pending) + sum(n for n, _ in ending)) // (free + len(ending)))
        # but never a split into slivers: a few calls share one batch (it costs them little), and the other replica
        # stays free for the next arrival instead of making it wait a whole reply
        return max(1, min(compatible, max(share, MIN_SHARE)))

    def _drop_expired(self) -> None:
        now = time.monotonic()
        for gen in [s for s in self.pending if s.expired(now)]:
            self._leave(gen)
            gen.finish(FinishReason.DEADLINE)
        self._queue_changed()

    def _waiting(self) -> list[Work]:
        """Waiting work in the order it gets places: interactive first (and batch calls that have waited too long),
        tenants' fair shares within each; scoring jobs only while fewer than SCORING_AT_ONCE run."""
        waiting = self.fair.order(self.pending, time.monotonic())
        with self._running_lock:
            scoring = sum(isinstance(b[0], Scoring) for b in self._batches)
        if scoring >= SCORING_AT_ONCE:
            waiting = [work for work in waiting if not isinstance(work, Scoring)]
        return waiting

    def _compatible(self, waiting: list[Work]) -> list[Work]:
        """The batch `waiting[0]` heads: the waiting sequences after it, in order, that can share its call (a
        scoring job shares with nothing)."""
        head = waiting[0]
        batch, low, high = [head], head.length, head.length
        spread = 0 if head.exact_length else self.options.max_prompt_length_spread
        for gen in waiting[1:]:
            if len(batch) >= self.options.max_batch_size or isinstance(head, Scoring):
                break
            length = gen.length
            if gen.key == head.key and max(high, length) - min(low, length) <= spread:
                batch.append(gen)
                low, high = min(low, length), max(high, length)
        return batch

    def _start_at(self, head: Work) -> float:
        """When the batch `head` heads starts if it does not fill first: `batch_idle` after the last arrival, at most
        `max_batch_wait` after the head's. A replica that has just freed counts as an arrival (and as the head's): the
        callers of the batch that ended come back together (closed loops), and the calls that waited for the replica
        share it with them rather than start alone the instant it frees."""
        freed = self._freed_at
        return min(
            max(head.arrived, freed) + self.options.max_batch_wait,
            max(self._last_arrival, freed) + self.options.batch_idle,
        )

    async def _next_batch(self) -> list[Work]:
        assert self._arrived is not None
        while True:
            self._drop_expired()
            waiting = self._waiting()
            if not waiting:  # nothing, or only scoring jobs while one runs: wait for an arrival or a replica
                self._arrived.clear()
                await self._arrived.wait()
                continue
            batch = self._compatible(waiting)
            now = time.monotonic()
            head = batch[0]
            start_at = 0.0 if isinstance(head, Scoring) else self._start_at(head)
            hold = self._staggered(batch) if len(batch) < self.options.max_batch_size else 0.0
            if now < hold and now >= start_at:  # in phase with a loaded replica: start half a batch after it
                self._arrived.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._arrived.wait(), hold - now)
                continue
            if (len(batch) >= self.options.max_batch_size or now >= start_at) and not self._spare_allowed():
                self._arrived.clear()  # all replicas busy and the load not light: wait for one to free
                with contextlib.suppress(asyncio.TimeoutError):  # (or for the load, or a batch's end, to change)
                    await asyncio.wait_for(self._arrived.wait(), SPARE_RECHECK)
                continue
            if len(batch) >= self.options.max_batch_size or now >= start_at:
                batch = batch[: self._share(len(batch))]
                break
            self._arrived.clear()
            with contextlib.suppress(asyncio.TimeoutError):  # not the builtin TimeoutError on Python 3.10
                await asyncio.wait_for(self._arrived.wait(), start_at - now)
        for gen in batch:
            self._leave(gen)
        self.fair.started(batch)
        self._queue_changed()
        if self.observer is not None:
            now = time.monotonic()
            self.observer.work_started([(now - s.arrived, s.priority) for s in batch])
            if isinstance(head, Generation):
                self.observer.batch_started(len(batch))
        return batch

    def _execute(self, work: list[Work]) -> None:
        """Run a batch, or a scoring job, in the engine, waiting on a thread of the scheduler's (one per replica)."""
        if isinstance(work[0], Scoring):
            self._score(work[0])
        else:
            self._generate(work)

    def _score(self, job: Scoring) -> None:
        job.started_at, job.batch_size = time.monotonic(), len(job.sequences)
        try:
            assert self.decoder is not None
            rows = self.decoder.score(job)
            if len(rows) == len(job.sequences):
                job.resolve(rows)
            else:  # halted before its end: its caller left, its deadline passed, or the drain
                job.finish(job.stop_reason())
        except Exception as exc:
            self._failed([job], exc, "scoring")
        finally:
            job.finish(job.stop_reason())  # no-op once it ended
            self._ran([job])

    def _failed(self, work: list[Work], exc: Exception, what: str) -> None:
        """The engine failed (its traceback logged by link.py), or was lost: every caller of `work` is told."""
        if isinstance(exc, JachatError):
            error: JachatError = exc
        else:
            log.exception("%s failed for %d calls", what, len(work))
            error = EngineFailure(f"{what} failed")
        for gen in work:  # one line per call, in its context: each carries the call's request id
            gen.context.run(log.error, "%s failed (%d calls); the call ends %s", what, len(work), error.kind.value)
            gen.fail(error)

    def _ran(self, work: list[Work]) -> None:
        """A replica frees: the work is no longer running."""
        with self._running_lock:
            self._batches.remove(work)
        self._replicas_changed()
        self._freed_at = time.monotonic()

    def _generate(self, work: list[Work]) -> None:
        batch = [gen for gen in work if isinstance(gen, Generation)]
        started = time.monotonic()
        for gen in batch:
            gen.started_at, gen.batch_size = started, len(batch)
        try:
            assert self.decoder is not None
            options = {**batch[0].options.ctranslate2_kwargs(), "return_scores": batch[0].logprobs}
            self.decoder.run(batch, max(gen.max_new_tokens for gen in batch), options)
        except Exception as exc:  # reported to every caller in the batch, never raised in the worker thread
            self._failed(work, exc, "generation")
        finally:
            for gen in batch:  # no-op for sequences that already ended
                gen.finish(gen.stop_reason() if gen.cancelled.is_set() else FinishReason.LENGTH)
            self._ran(work)
            seconds = time.monotonic() - started
            self._batch_seconds = 0.8 * self._batch_seconds + 0.2 * seconds
            steps = max(gen.steps for gen in batch)
            if steps:  # the pace of a step, for the stagger's hold
                pace = seconds / steps
                self._step_seconds = pace if not self._step_seconds else 0.8 * self._step_seconds + 0.2 * pace

    def abandon(self, error: BaseException) -> None:
        """End all waiting and running work now, telling each caller `error` (the drain's grace is over)."""
        for gen in [*self.pending, *self.running]:
            gen.cancel()
            gen.finish(FinishReason.CANCELLED, error)
        self.pending.clear()
        self._queue_changed()

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        for gen in list(self.pending):
            self.withdraw(gen)
        self._executor.shutdown(wait=True, cancel_futures=True)
        self.decoder = None
