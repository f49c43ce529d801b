"""One scoring job: sequences whose tokens the model scores teacher-forced (a Score call's candidates, or an echoed
completions prompt), queued and run as model work like a generation (work.py).

The engine process scores a job a piece at a time (core.run_scoring): CTranslate2 materialises the vocabulary's
logits and log-probabilities for every position it scores (two float vectors of the vocabulary per token: 250 KiB
at 32,000 tokens), so a piece holds at most core.SCORE_PIECE_TOKENS positions, and a job's memory is one piece's
whatever its size. The scheduler runs at most one job at a time (policy.SCORING_AT_ONCE), so the engine's memory
for scoring is one piece's in all, and a stop (the caller gone, its deadline, the drain) takes effect at the next
piece. A request's own rules bound its positions: 16 sequences of at most a context each (Score's candidates,
completions' prompts).
"""

from __future__ import annotations

import asyncio

from jachat.service.domain.errors import DeadlineExceeded
from jachat.service.domain.results import FinishReason, Priority
from jachat.service.engine.wire import ScoredRow
from jachat.service.engine.work import Work


class Scoring(Work):
    """A scoring job: its sequences, whether each place's most likely token is wanted too, and its result."""

    def __init__(
        self,
        sequences: list[list[int]],
        top: bool,
        deadline: float | None,
        loop: asyncio.AbstractEventLoop,
        priority: Priority = Priority.INTERACTIVE,
        tenant: str = "default",
    ) -> None:
        super().__init__(sum(map(len, sequences)), deadline, loop, priority, tenant)
        self.sequences = sequences
        self.top = top

    def tokens_left(self) -> int:
        return 0 if self.finish_reason is not None else self.cost

    @property
    def scoring(self) -> bool:
        return True

    def resolve(self, rows: list[ScoredRow]) -> None:
        """The engine scored every sequence: the caller gets the rows (unless the job ended first)."""
        if self.claim(FinishReason.LENGTH):  # its whole length scored
            if self.on_finish is not None:
                self.on_finish(self)
            self.send(rows)
            self.send(None)

    async def result(self) -> list[ScoredRow]:
        """The rows, once scored; raises the error that ended the job, or DeadlineExceeded."""
        rows: list[ScoredRow] | None = None
        while True:
            for item in await self.take():
                if isinstance(item, BaseException):
                    raise item
                if item is None:
                    if rows is not None:
                        return rows
                    if self.finish_reason is FinishReason.DEADLINE:
                        raise DeadlineExceeded("the deadline passed before the scores were computed")
                    raise asyncio.CancelledError  # withdrawn: its caller is gone
                rows = item
