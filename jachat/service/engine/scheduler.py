"""The batching scheduler: concurrent requests become CTranslate2 `generate_batch` calls (or, on the decode loop,
rows admitted to its running batch: engine.loop_admission).

What starts together, and when, is the policy's decision (policy.py, a pure function of the time, the waiting work,
the running batches and the estimates). The scheduler keeps the state it decides over and acts on the decision:

- It reads the clock, snapshots what runs (policy.Running), keeps the estimates (policy.Pace: a batch's duration,
  a token's pace, the last arrival, the last freed replica), and wakes to decide again on an arrival, a freed
  replica, or the decision's own time, whichever comes first.
- Each sequence stops on its own (its row's stop flag in the engine process): at its own max_new_tokens, a stop
  string, </s>, cancellation by its caller, or its deadline. Its caller hears of the end at once, not when the
  batch ends.
- At most `max_queued` requests wait; beyond that `submit` raises Overloaded at once (an interactive call takes the
  newest batch call's place), and a tenant finds no room once `max_queued_per_tenant` of its calls wait.
- Scoring jobs (scoring.py) are model work too: they wait in the same queue, by the same priorities and fair
  shares, until their deadline, and each takes a replica of its own while it runs. At most
  policy.SCORING_AT_ONCE runs at a time: CTranslate2 holds two float vectors of the vocabulary per position it
  scores, so this bounds the engine's memory for scoring, and with more replicas than that, generation always finds
  one that scoring does not hold.
- Work that waits past its deadline ends then (DEADLINE_EXCEEDED), whether or not a replica frees meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

from jachat.service.domain.errors import EngineFailure, JachatError, Overloaded
from jachat.service.domain.results import FinishedGeneration, FinishReason, Priority
from jachat.service.engine import policy
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


def _snapshot(batch: list[Work]) -> policy.Running:
    """A running batch (or scoring job) as the policy sees it."""
    left = [work.tokens_left() for work in batch if work.finish_reason is None]
    head = batch[0]
    return policy.Running(
        calls=len(batch),
        unfinished=0 if head.scoring else len(left),
        tokens_left=max(left, default=0),
        started_at=head.started_at or 0.0,
        scoring=head.scoring,
    )


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
        self.pace = policy.Pace()  # the estimates and recent events the policy counts from; under _running_lock
        self.fair = FairOrder(options.batch_promotion)

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
                f"after {self.pace.batch_seconds:.1f} s",
                retry_after=self.pace.batch_seconds,
            )
        if len(self.pending) < self.options.max_queued:
            return
        if priority is Priority.INTERACTIVE and self._sheddable() is not None:
            return
        raise Overloaded(
            f"the queue is full ({self.options.max_queued} requests wait); retry after {self.pace.batch_seconds:.1f} s",
            retry_after=self.pace.batch_seconds,
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
                    f"{self.pace.batch_seconds:.1f} s",
                    retry_after=self.pace.batch_seconds,
                ),
            )
        active = {g.tenant for g in self.running}
        self.fair.arrived(gen, active | {g.tenant for g in self.pending})
        gen.on_finish = self._finished
        if isinstance(gen, Generation):
            gen.observer = self.observer
        now = time.monotonic()
        self._paced(last_arrival=now)
        self.pending.append(gen)
        if gen.deadline is not None:
            gen.expiry = gen.loop.call_later(max(0.0, gen.deadline - now), self._expire, gen)
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

    @property
    def running(self) -> set[Work]:
        """The sequences of the batches given to a replica and not yet over (a snapshot)."""
        with self._running_lock:
            return {gen for batch in self._batches for gen in batch}

    def _drop_expired(self) -> None:
        now = time.monotonic()
        for gen in [s for s in self.pending if s.expired(now)]:
            self._leave(gen)
            gen.finish(FinishReason.DEADLINE)
        self._queue_changed()

    def _paced(self, **changes: float) -> None:
        with self._running_lock:
            self.pace = dataclasses.replace(self.pace, **changes)

    def decide(self, now: float) -> policy.Start[Work] | policy.Wait:
        """The policy's decision at `now` over the waiting work (in fairness order) and the running batches."""
        waiting = self.fair.order(self.pending, now)
        with self._running_lock:
            running, pace = [_snapshot(batch) for batch in self._batches], self.pace
        return policy.decide(now, waiting, running, pace, self.options)

    async def _next_batch(self) -> list[Work]:
        assert self._arrived is not None
        while True:
            self._drop_expired()
            now = time.monotonic()
            decision = self.decide(now)
            if isinstance(decision, policy.Start):
                break
            self._arrived.clear()  # wait for an arrival, a freed replica, or the decision's time
            if decision.until is None:
                await self._arrived.wait()
            else:
                with contextlib.suppress(asyncio.TimeoutError):  # not the builtin TimeoutError on Python 3.10
                    await asyncio.wait_for(self._arrived.wait(), max(0.0, decision.until - now))
        batch = decision.batch
        for gen in batch:
            self._leave(gen)
        self.fair.started(batch)
        self._queue_changed()
        if self.observer is not None:
            now = time.monotonic()
            self.observer.work_started([(now - s.arrived, s.priority) for s in batch])
            if not batch[0].scoring:
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
        self._paced(freed_at=time.monotonic())

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
            with self._running_lock:  # the pace of a step, for the stagger's hold
                self.pace = self.pace.after_batch(seconds, max(gen.steps for gen in batch))

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
