"""The engine's watch: the server reads the engine process's signs of life, and health and the process follow.

The engine speaks at least every core.HEARTBEAT (tokens, jobs' ends, scoring pieces, or an empty message), and the
server's receiver notes each read (link.py's `liveness`). A silence longer than --engine-stall-seconds is a
stalled engine (a hung device call, a stopped or page-thrashing process): the model's health (jachat.v1.ChatService
over gRPC, /health over HTTP) turns NOT_SERVING, so the readiness probe and the gateway send calls elsewhere, and
SERVING again when it speaks. The process's own health ("", the liveness probe's) stays SERVING: a stall may pass.
One that does not is the watchdog's: a silence, or work in flight with no progress, longer than
--engine-watchdog-seconds, or a receiver that no longer reads, kills the engine, and the server exits 1 (as when the
engine dies), for Kubernetes to start a new pod.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from jachat.service.engine.link import Liveness

log = logging.getLogger("jachat.server")

PERIOD = 0.25  # seconds between two looks


class State(enum.Enum):
    SERVING = "serving"
    STALLED = "stalled"
    DEAD = "dead"


@dataclass(frozen=True)
class Verdict:
    state: State
    reason: str = ""


def judge(life: Liveness, stall: float, watchdog: float) -> Verdict:
    """What the engine's signs of life say: serving, stalled (health NOT_SERVING), or dead (the server ends it)."""
    if not life.receiving:
        return Verdict(State.DEAD, "the engine's receiver stopped reading")
    if watchdog > 0 and life.silent >= watchdog:
        return Verdict(State.DEAD, f"the engine process said nothing for {life.silent:.0f} s")
    if watchdog > 0 and life.stuck >= watchdog:
        return Verdict(State.DEAD, f"the engine made no progress for {life.stuck:.0f} s with work in flight")
    if stall > 0 and life.silent >= stall:
        return Verdict(State.STALLED, f"the engine process has said nothing for {life.silent:.1f} s")
    return Verdict(State.SERVING)


class EngineWatch:
    """Looks at the engine every PERIOD: tells `serving(bool)` when its health changes, and `dead(reason)` once."""

    def __init__(
        self,
        liveness: Callable[[], Liveness],
        stall: float,
        watchdog: float,
        serving: Callable[[bool], Awaitable[None]],
        dead: Callable[[str], None],
    ) -> None:
        self.liveness, self.stall, self.watchdog = liveness, stall, watchdog
        self.serving, self.dead = serving, dead
        self.state = State.SERVING

    async def look(self) -> State:
        verdict = judge(self.liveness(), self.stall, self.watchdog)
        if verdict.state is not self.state:
            if verdict.state is State.DEAD:
                log.error("watchdog: %s; killing it, the server exits 1", verdict.reason)
                self.dead(verdict.reason)
            elif verdict.state is State.STALLED:
                log.warning("%s: health NOT_SERVING until it speaks again", verdict.reason)
                await self.serving(False)
            else:
                log.warning("the engine process speaks again: health SERVING")
                await self.serving(True)
            self.state = verdict.state
        return self.state

    async def run(self) -> None:
        while await self.look() is not State.DEAD:
            await asyncio.sleep(PERIOD)
