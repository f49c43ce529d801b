"""The engine's watch (watch.py), on made-up signs of life: when health turns NOT_SERVING and back, and when the
watchdog ends the engine."""

from __future__ import annotations

import asyncio

from jachat.service.engine.link import Liveness
from jachat.service.watch import EngineWatch, State, judge


def test_a_silence_past_the_stall_is_a_stall_and_past_the_watchdog_a_death() -> None:
    assert judge(Liveness(0.4, 0.0, True), stall=3, watchdog=60).state is State.SERVING
    assert judge(Liveness(3.0, 0.0, True), stall=3, watchdog=60).state is State.STALLED
    assert judge(Liveness(60.0, 0.0, True), stall=3, watchdog=60).state is State.DEAD
    assert judge(Liveness(600.0, 0.0, True), stall=3, watchdog=0).state is State.STALLED  # 0: no watchdog


def test_work_that_makes_no_progress_is_a_death_even_while_the_engine_speaks() -> None:
    """A hung decode thread: the engine's sender still beats, but no token comes for the batch in flight."""
    verdict = judge(Liveness(0.2, 61.0, True), stall=3, watchdog=60)
    assert verdict.state is State.DEAD and "no progress" in verdict.reason
    assert judge(Liveness(0.2, 59.0, True), stall=3, watchdog=60).state is State.SERVING


def test_a_receiver_that_stopped_reading_is_a_death() -> None:
    verdict = judge(Liveness(0.0, 0.0, False), stall=3, watchdog=60)
    assert verdict.state is State.DEAD and "receiver" in verdict.reason


def test_health_follows_the_engine_and_the_watchdog_speaks_once() -> None:
    lives = [Liveness(0.1, 0, True), Liveness(4, 0, True), Liveness(5, 0, True), Liveness(0.1, 0, True)]
    lives += [Liveness(70, 0, True), Liveness(80, 0, True)]
    said: list[object] = []

    async def serving(up: bool) -> None:
        said.append(up)

    watch = EngineWatch(lambda: lives.pop(0), 3, 60, serving, lambda reason: said.append(reason))

    async def scenario() -> list[State]:
        return [await watch.look() for _ in range(5)]

    states = asyncio.run(scenario())
    assert states == [State.SERVING, State.STALLED, State.STALLED, State.SERVING, State.DEAD]
    assert said[:2] == [False, True] and len(said) == 3 and "said nothing for 70 s" in str(said[2])
