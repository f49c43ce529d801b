"""The batching policy, a pure function: given the time, the waiting work in its fairness order, the batches running
and the scheduler's estimates, what starts now, or until when to wait. No clock, no event loop, no thread: the
scheduler (scheduler.py) reads the clock, snapshots what runs, acts on the decision, and wakes on an arrival, a freed
replica or the decision's time, whichever comes first; the fast tier calls `decide` at any `now` it likes.

CTranslate2 has no continuous batching: one `generate_batch` call is one static batch with one set of decoding
options, and nothing joins it once it runs. So the policy decides what starts together:

- A batch starts when a replica (`inter_threads`) is free. Its head is the first waiting work in fairness order; it
  takes the other waiting requests that can share the call, in that order, up to `max_batch_size`, and no more than
  its share when other replicas are free too: n compatible requests and k free replicas make k batches of about n/k
  that run side by side, instead of one batch of n while the other replicas idle (on 2 one-thread CPU replicas, two
  batches of 8 generate 1.6x the tokens/s of one batch of 16; a batch's step costs little more for more rows, but
  one replica's thread does them all). While requests keep arriving it waits for more: it starts when it is full,
  when none has arrived for `batch_idle` seconds, or `max_batch_wait` after its head arrived, whichever comes first.
  A lone caller so waits only `batch_idle`, and callers that arrive together (closed-loop clients whose replies
  ended together) start together. A replica that frees counts as an arrival (and as the head's arrival, for
  `max_batch_wait`): the callers its batch just answered come back together, and the calls that waited for the
  replica share it with them rather than start alone.
- Requests share a call only with identical decoding options (their `key`: temperature, top-k, top-p, repetition
  penalty, n-gram blocking, min_new_tokens). Their prompts may differ in length by at most
  `max_prompt_length_spread` tokens: CTranslate2 decodes a longer prompt's extra tokens one step at a time, which
  costs latency. With a history-dependent penalty (`exact_length`) the prompts must be equally long, because those
  extra prompt tokens would count as generated tokens for the penalty and the reply would depend on its batch-mates.
- Spare replicas (--spare-replicas) take a batch only while the load is light (`spare_allowed`); --stagger-batches
  starts batches half a batch apart under load (`staggered`).
- Scoring jobs share with nothing, start at once, and at most SCORING_AT_ONCE run at a time (the scheduler's
  docstring says why).

The decode loop runs this policy as admission (engine.loop_admission): a place per row, every call a job of its own,
started the moment a place is free.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Generic, Protocol, TypeVar

from jachat.service.engine.options import SchedulerOptions

SOON = 4  # a running batch with at most this many tokens to go is about to free its replica
STAGGER_CALLS = 2  # a running batch this large means the load is not light (--stagger-batches)
SPARE_RECHECK = 0.01  # seconds between looks at whether a held-back batch may take a spare replica
SPARE_LIGHT = 2  # a spare replica takes a batch only while at most this many calls wait (the load is light)
MIN_SHARE = 4  # calls are split over replicas only into batches of at least this many
SCORING_AT_ONCE = 1  # scoring jobs running at once (their memory, and replicas left to generation)


class Waiting(Protocol):
    """What the policy reads of waiting work (work.Work: a generation or a scoring job)."""

    @property
    def key(self) -> object: ...
    @property
    def length(self) -> int: ...
    @property
    def exact_length(self) -> bool: ...
    @property
    def scoring(self) -> bool: ...

    arrived: float

    def tokens_left(self) -> int: ...


W = TypeVar("W", bound=Waiting)


@dataclasses.dataclass(frozen=True)
class Running:
    """A batch (or scoring job) on a replica, as the policy sees it: a snapshot."""

    calls: int  # the work it started with
    unfinished: int  # its generations still running (0 for a scoring job)
    tokens_left: int  # the most tokens any of them may still produce: how far it is from freeing its replica
    started_at: float  # when it started (its head's started_at; 0: not yet)
    scoring: bool = False


@dataclasses.dataclass(frozen=True)
class Pace:
    """The scheduler's estimates and recent events, which the policy's times count from."""

    batch_seconds: float = 1.0  # running estimate of a batch's duration (also Retry-After)
    step_seconds: float = 0.0  # running estimate of a batch's time per token (0: none ran yet)
    last_arrival: float = 0.0  # when work last arrived
    freed_at: float = 0.0  # when a batch last ended (its replica freed)

    def after_batch(self, seconds: float, steps: int) -> Pace:
        """The estimates once a batch of `steps` tokens ran for `seconds`."""
        step = self.step_seconds
        if steps:
            pace = seconds / steps
            step = pace if not step else 0.8 * step + 0.2 * pace
        return dataclasses.replace(self, batch_seconds=0.8 * self.batch_seconds + 0.2 * seconds, step_seconds=step)


@dataclasses.dataclass(frozen=True)
class Start(Generic[W]):
    """Start this batch now, on a free replica."""

    batch: list[W]


@dataclasses.dataclass(frozen=True)
class Wait:
    """Start nothing: look again at `until` (a monotonic time; None: only once something arrives or frees)."""

    until: float | None


def decide(
    now: float, waiting: Sequence[W], running: Sequence[Running], pace: Pace, options: SchedulerOptions
) -> Start[W] | Wait:
    """What starts now on a free replica. `waiting` is every waiting work in its fairness order (interactive first,
    tenants' fair shares within each); `running`, the batches that hold the other replicas."""
    queued = len(waiting)
    if sum(batch.scoring for batch in running) >= SCORING_AT_ONCE:
        waiting = [work for work in waiting if not work.scoring]
    if not waiting:  # nothing, or only scoring jobs while one runs
        return Wait(None)
    batch = compatible(waiting, options)
    head = batch[0]
    full = len(batch) >= options.max_batch_size
    start = 0.0 if head.scoring else start_at(head, pace, options)
    if not full and now < start:
        return Wait(start)
    hold = 0.0 if full else staggered(batch, running, pace, options)
    if now < hold:  # in phase with a loaded replica: start half a batch after it
        return Wait(hold)
    if not spare_allowed(running, queued, options):  # all replicas busy and the load not light
        return Wait(now + SPARE_RECHECK)
    return Start(batch[: share(len(batch), queued, running, options)])


def compatible(waiting: Sequence[W], options: SchedulerOptions) -> list[W]:
    """The batch `waiting[0]` heads: the waiting work after it, in order, that can share its call (a scoring job
    shares with nothing)."""
    head = waiting[0]
    batch, low, high = [head], head.length, head.length
    spread = 0 if head.exact_length else options.max_prompt_length_spread
    for work in waiting[1:]:
        if len(batch) >= options.max_batch_size or head.scoring:
            break
        length = work.length
        if work.key == head.key and max(high, length) - min(low, length) <= spread:
            batch.append(work)
            low, high = min(low, length), max(high, length)
    return batch


def start_at(head: Waiting, pace: Pace, options: SchedulerOptions) -> float:
    """When the batch `head` heads starts if it does not fill first: `batch_idle` after the last arrival, at most
    `max_batch_wait` after the head's. A replica that has just freed counts as an arrival (and as the head's): the
    callers of the batch that ended come back together (closed loops), and the calls that waited for the replica
    share it with them rather than start alone the instant it frees."""
    freed = pace.freed_at
    return min(
        max(head.arrived, freed) + options.max_batch_wait,
        max(pace.last_arrival, freed) + options.batch_idle,
    )


def staggered(batch: Sequence[Waiting], running: Sequence[Running], pace: Pace, options: SchedulerOptions) -> float:
    """--stagger-batches: when the replica that started last runs a loaded batch (STAGGER_CALLS or more) that
    began less than half a batch ago, a batch on a free replica starts half a batch after it (never later than
    half a batch after its head's arrival). Replies of equal length end together, so replicas that start
    together stay in phase, and a call that arrives just after they start waits a whole batch; staggered by half
    a batch, a replica frees every half batch. But a batch is held at most half its own expected length (the
    per-token pace times its longest budget): a short call is never held for a long batch's sake, and a call
    that no running batch is like starts at once. Returns the monotonic time to start at (0: now)."""
    head = batch[0]
    if not options.stagger or head.scoring:
        return 0.0
    started = [run.started_at for run in running if run.calls >= STAGGER_CALLS and run.started_at and not run.scoring]
    if not started:
        return 0.0
    step = pace.step_seconds
    own = step * max(work.tokens_left() for work in batch) if step else pace.batch_seconds  # (no pace yet)
    half = min(pace.batch_seconds, own) / 2
    return min(max(started) + half, head.arrived + half)


def spare_allowed(running: Sequence[Running], queued: int, options: SchedulerOptions) -> bool:
    """Whether a batch may start now. On one of the `replicas`, always. On a spare (all `replicas` busy) only
    while the load is light: at most SPARE_LIGHT calls wait and no running batch is about to end. Then an
    arrival starts at once instead of waiting a whole reply for a replica, at the price of sharing the cores
    with the running batches for a while; under load, the spares stay idle, and the batches stay large."""
    busy = len(running)
    if busy < options.replicas:
        return True
    ending = any(run.tokens_left <= SOON for run in running)
    return busy < options.all_replicas and queued <= SPARE_LIGHT and not ending


def share(compatible: int, queued: int, running: Sequence[Running], options: SchedulerOptions) -> int:
    """How many of the `compatible` waiting calls (of `queued` in all) this batch takes. The idle replicas split the
    waiting calls evenly. A busy replica whose batch is about to end (at most SOON tokens to go) counts as one more
    replica, and its unfinished calls as calls to share: callers whose replies end together (closed loops) come
    back together, and a replica that frees a moment before another must take its own share, not everyone's
    (measured: that alone left batches of 10 and 5 where 8 and 8 were due). A batch far from its end counts for
    nothing: calls never wait behind a long reply while a replica idles."""
    free = max(1, options.replicas - len(running))  # this replica and the others idle now
    ending = [run for run in running if run.tokens_left <= SOON]
    each = -(-(queued + sum(run.unfinished for run in ending)) // (free + len(ending)))
    # but never a split into slivers: a few calls share one batch (it costs them little), and the other replica
    # stays free for the next arrival instead of making it wait a whole reply
    return max(1, min(compatible, max(each, MIN_SHARE)))
