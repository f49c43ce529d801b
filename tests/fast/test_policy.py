"""The batching policy as the pure function it is (policy.decide and its parts): no clock, no event loop, no model.
Every time below is a `now` the test picks, so nothing depends on how fast the machine runs."""

from __future__ import annotations

import dataclasses

import pytest

from jachat.service.engine import policy
from jachat.service.engine.options import SchedulerOptions
from jachat.service.engine.policy import (
    MIN_SHARE,
    SOON,
    SPARE_LIGHT,
    SPARE_RECHECK,
    STAGGER_CALLS,
    Pace,
    Running,
    Start,
    Wait,
)

NOW = 1000.0
IDLE = SchedulerOptions(replicas=1, batch_idle=0.002, max_batch_wait=0.05, stagger=False)


@dataclasses.dataclass
class Call:
    """Waiting work as the policy reads it."""

    name: int
    length: int = 8
    key: object = "greedy"
    exact_length: bool = False
    scoring: bool = False
    arrived: float = NOW - 1.0
    left: int = 4

    def tokens_left(self) -> int:
        return self.left


def calls(count: int, first: int = 100, **fields: object) -> list[Call]:
    return [Call(first + i, **fields) for i in range(count)]  # type: ignore[arg-type]


def started(decision: Start[Call] | Wait) -> list[int]:
    assert isinstance(decision, Start), decision
    return [call.name for call in decision.batch]


def batch(calls: int = 6, left: int = 64, started_at: float = NOW - 0.1, scoring: bool = False) -> Running:
    unfinished = 0 if scoring else calls
    return Running(calls, unfinished, tokens_left=left, started_at=started_at, scoring=scoring)


def test_a_batch_waits_for_the_idle_gap_then_starts_and_a_full_one_starts_at_once() -> None:
    waiting = calls(3, arrived=NOW)
    pace = Pace(last_arrival=NOW)  # they arrived just now
    assert policy.decide(NOW, waiting, [], pace, IDLE) == Wait(NOW + 0.002)
    assert started(policy.decide(NOW + 0.002, waiting, [], pace, IDLE)) == [100, 101, 102]
    full = dataclasses.replace(IDLE, max_batch_size=3)
    assert started(policy.decide(NOW, waiting, [], pace, full)) == [100, 101, 102]
    keeps_coming = Pace(last_arrival=NOW + 0.049)  # arrivals never hold the head past max_batch_wait
    head = calls(1, arrived=NOW)
    assert policy.decide(NOW + 0.04, head, [], keeps_coming, IDLE) == Wait(NOW + 0.05)
    assert policy.decide(NOW, [], [], pace, IDLE) == Wait(None)


def test_compatible_calls_share_in_order_by_options_and_prompt_spread() -> None:
    options = SchedulerOptions(max_batch_size=3, max_prompt_length_spread=4)
    waiting = [Call(1), Call(2, key="sampled"), Call(3, length=20), Call(4, length=11), Call(5), Call(6)]
    assert [c.name for c in policy.compatible(waiting, options)] == [1, 4, 5]  # up to the size, 3 and 6 left
    exact = [Call(1, exact_length=True), Call(2, length=9, exact_length=True), Call(3, exact_length=True)]
    assert [c.name for c in policy.compatible(exact, options)] == [1, 3]  # a history penalty: equal lengths only
    scoring = [Call(1, scoring=True), Call(2, scoring=True)]
    assert [c.name for c in policy.compatible(scoring, options)] == [1]  # a scoring job shares with nothing


def test_a_freed_replica_waits_for_the_callers_its_batch_just_answered() -> None:
    """A call that waited through a whole batch does not start alone the instant the replica frees: the freeing
    counts as an arrival, so the callers that batch just answered (closed loops come back at once) share the next
    batch with it. Bounded as ever by max_batch_wait."""
    waited = Call(101, arrived=NOW - 10.0)  # it waited through a long batch
    assert policy.start_at(waited, Pace(last_arrival=NOW - 10.0), IDLE) < NOW  # nothing freed: it starts at once
    freed = Pace(last_arrival=NOW - 10.0, freed_at=NOW)
    assert policy.start_at(waited, freed, IDLE) == pytest.approx(NOW + 0.002)  # it waits for the callers
    back = dataclasses.replace(freed, last_arrival=NOW + 0.001)  # one comes back: the gap counts from it
    assert policy.start_at(waited, back, IDLE) == pytest.approx(NOW + 0.003)
    coming = dataclasses.replace(freed, last_arrival=NOW + 0.049)  # never past max_batch_wait from the freeing
    assert policy.start_at(waited, coming, IDLE) == pytest.approx(NOW + 0.05)


def test_a_replica_that_frees_first_takes_its_share_not_everyones() -> None:
    """Closed loops: replies that end together come back together. When one replica frees while the other's batch
    is a few tokens from its end, the free one takes its share of everything in flight (waiting, and about to come
    back); when the other's batch is far from its end, the free one takes every waiting call."""
    two = SchedulerOptions(max_batch_size=16, replicas=2)
    ending = [batch(calls=6, left=SOON)]
    assert policy.share(10, 10, ending, two) == 8  # (10 waiting + 6 coming back) / 2 replicas
    assert policy.share(10, 10, [batch(calls=6, left=64)], two) == 10  # nobody waits behind a long batch
    assert policy.share(10, 10, [], two) == 5  # two idle replicas split the waiting calls
    assert policy.share(2, 2, [], two) == 2  # but not into slivers: a replica stays free for the next arrival
    assert policy.share(6, 6, [], two) == MIN_SHARE
    decision = policy.decide(NOW, calls(10), ending, Pace(), two)
    assert started(decision) == list(range(100, 108))  # decide cuts the batch to its share


def test_a_spare_replica_takes_work_only_while_the_load_is_light() -> None:
    spare = SchedulerOptions(max_batch_size=16, replicas=1, spare_replicas=1, stagger=False)
    long = [batch(calls=1, left=50)]
    assert policy.spare_allowed([], 5, spare)  # a replica of its own: always
    assert policy.spare_allowed(long, SPARE_LIGHT, spare)  # light: the spare may take them
    assert not policy.spare_allowed(long, SPARE_LIGHT + 1, spare)  # under load: they wait, in a larger batch
    assert not policy.spare_allowed([batch(calls=1, left=SOON - 1)], 1, spare)  # the replica is about to free
    assert not policy.spare_allowed([*long, *long], 1, spare)  # the replica and the spare both busy
    waiting = calls(SPARE_LIGHT + 1)
    assert policy.decide(NOW, waiting, long, Pace(), spare) == Wait(NOW + SPARE_RECHECK)
    assert started(policy.decide(NOW, waiting[:1], long, Pace(), spare)) == [100]


def test_staggered_batches_start_half_a_batch_after_a_loaded_one() -> None:
    """--stagger-batches: a batch on a free replica starts half a batch (the running estimate) after the last loaded
    batch started, never later than half a batch after its head arrived; beside a batch of one call (light load)
    nothing is held, and neither without the option."""
    options = SchedulerOptions(replicas=2, stagger=True)
    pace = Pace(batch_seconds=1.0, step_seconds=0.01)
    head = Call(300, left=200, arrived=NOW)  # 2 s at the pace: longer than the batch estimate
    loaded = [batch(calls=STAGGER_CALLS, started_at=NOW - 0.1)]
    assert policy.staggered([head], loaded, pace, options) == pytest.approx(NOW + 0.4)  # 0.5 s after it began
    early = Call(300, left=200, arrived=NOW - 0.3)
    assert policy.staggered([early], loaded, pace, options) == pytest.approx(NOW + 0.2)  # half a batch from arrival
    assert policy.staggered([head], [batch(calls=1, started_at=NOW - 0.1)], pace, options) == 0.0
    plain = dataclasses.replace(options, stagger=False)
    assert policy.staggered([head], loaded, pace, plain) == 0.0
    held = policy.decide(NOW + 0.1, [head], loaded, pace, options)
    assert isinstance(held, Wait) and held.until == pytest.approx(NOW + 0.4)
    assert started(policy.decide(NOW + 0.4, [head], loaded, pace, options)) == [300]


def test_a_short_call_is_held_for_the_stagger_at_most_half_its_own_length() -> None:
    """Long replies raise the estimate of a batch's length; a short call that arrives while a replica idles is still
    held at most half its own expected length (its budget at the per-token pace), not half a long batch."""
    options = SchedulerOptions(max_batch_size=16, replicas=2, stagger=True)
    pace = Pace(batch_seconds=1000 * 0.01 * 400, step_seconds=0.01)  # as if long batches had run for ages
    loaded = [batch(calls=STAGGER_CALLS, left=400, started_at=NOW)]
    short = Call(300, left=8, arrived=NOW)
    assert policy.staggered([short], loaded, pace, options) == pytest.approx(NOW + 0.01 * 8 / 2)
    no_pace = Pace(batch_seconds=2.0)  # no batch has run yet: half the batch estimate
    assert policy.staggered([short], loaded, no_pace, options) == pytest.approx(NOW + 1.0)


def test_scoring_starts_at_once_alone_and_one_job_at_a_time() -> None:
    job, gen = Call(1, scoring=True, arrived=NOW), Call(2, arrived=NOW)
    pace = Pace(last_arrival=NOW)
    two = SchedulerOptions(replicas=2, stagger=True)
    assert started(policy.decide(NOW, [job, gen], [], pace, two)) == [1]  # no idle gap for a job
    scoring = [batch(calls=1, scoring=True)]
    assert policy.decide(NOW, [job], scoring, pace, two) == Wait(None)  # one job at a time: it waits for a freeing
    assert started(policy.decide(NOW + 0.01, [job, gen], scoring, pace, two)) == [2]  # generation passes it


def test_the_pace_follows_the_batches_that_ran() -> None:
    pace = Pace().after_batch(2.0, 100)
    assert [pace.batch_seconds, pace.step_seconds] == pytest.approx([1.2, 0.02])
    pace = pace.after_batch(1.0, 0)  # a batch that produced nothing: the per-token pace stays
    assert [pace.batch_seconds, pace.step_seconds] == pytest.approx([1.16, 0.02])
    assert pace.after_batch(1.0, 25).step_seconds == pytest.approx(0.8 * 0.02 + 0.2 * 0.04)
