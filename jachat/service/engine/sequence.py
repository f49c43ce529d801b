"""One generation's state machine: the caller's side of a sequence in a batch.

CTranslate2 calls `on_step` on a generation thread for every token of this sequence. The sequence decodes the id to
text (byte-exact, never half a character), assembles the reply (`<NL>` to newlines, the caller's stop strings and
the model starting the user's turn end it, held-back text never taken back), counts its tokens against
max_new_tokens, notices cancellation and the deadline, and hands text deltas to its caller's event loop. `finish`
ends it exactly once, whoever calls it first (the callback, the scheduler, the drain). The scheduler only decides
which sequences share a batch; everything about one reply is here.
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from jachat.service.domain.results import (
    DEADLINE_SLACK,
    Delta,
    FinishedGeneration,
    FinishReason,
    GeneratedToken,
    Priority,
)
from jachat.service.domain.sampling import SamplingOptions
from jachat.service.text.reply import ReplyAssembler
from jachat.service.text.tokenizer import StreamDecoder


class TokenObserver(Protocol):
    """What a sequence reports per token (the metrics implement it). Called from generation threads."""

    def first_token(self, seconds: float) -> None: ...
    def token_interval(self, seconds: float) -> None: ...


class Generation:
    """One request: its inputs, and its state shared between a generation thread and its caller's event loop."""

    def __init__(
        self,
        prompt_ids: list[int],
        options: SamplingOptions,
        max_new_tokens: int,
        deadline: float | None,
        eos_id: int,
        decoder: StreamDecoder,
        reply: ReplyAssembler,
        loop: asyncio.AbstractEventLoop,
        priority: Priority = Priority.INTERACTIVE,
        tenant: str = "default",
    ) -> None:
        self.priority = priority
        self.tenant = tenant
        # the caller's context (its request id among it): what a generation thread logs for this call runs in it
        self.context = contextvars.copy_context()
        self.cost = len(prompt_ids) + max_new_tokens  # what it takes of its tenant's fair share
        self.prompt_ids = prompt_ids
        self.options = options
        self.max_new_tokens = max_new_tokens
        self.deadline = deadline  # time.monotonic() value, or None
        self.key = options.batch_key()
        self.exact_length = options.history_penalty
        self.arrived = time.monotonic()
        self.eos_id = eos_id
        self.decoder = decoder
        self.reply = reply
        self.loop = loop
        self.queue: asyncio.Queue[Delta | BaseException | None] = asyncio.Queue()
        self.pending_tokens: list[GeneratedToken] = []  # generated since the last delta
        self.started_at: float | None = None  # the batch's start (set by the scheduler)
        self.batch_size = 0  # sequences in that batch (set by the scheduler)
        self.first_token_at: float | None = None
        self.finished_at: float | None = None
        self.cancelled = threading.Event()
        self.token_ids: list[int] = []
        self.steps = 0
        self.steps_after_cancel = 0
        self.finish_reason: FinishReason | None = None
        self.on_finish: Callable[[Generation], None] | None = None
        self.observer: TokenObserver | None = None
        self.last_token_at = 0.0
        self._lock = threading.Lock()

    def send(self, item: Delta | BaseException | None) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now >= self.deadline

    def stop_reason(self) -> FinishReason:
        """Why a sequence that must stop now stops: its deadline, or its caller going away."""
        now = time.monotonic()
        if self.expired(now) or (self.cancelled.is_set() and self.expired(now + DEADLINE_SLACK)):
            return FinishReason.DEADLINE
        return FinishReason.CANCELLED

    def on_step(self, step: Any) -> bool:
        """CTranslate2's per-token callback (generation thread). True stops this sequence."""
        if self.finish_reason is not None:
            return True
        if self.cancelled.is_set() or self.expired(time.monotonic()):
            self.steps_after_cancel += self.cancelled.is_set()
            self.finish(self.stop_reason())
            return True
        self.steps += 1
        now = time.monotonic()
        if self.steps == 1:
            self.first_token_at = now
        if self.observer is not None:
            if self.steps == 1:
                self.observer.first_token(now - self.arrived)
            else:
                self.observer.token_interval(now - self.last_token_at)
        self.last_token_at = now
        self.pending_tokens.append(GeneratedToken(step.token_id, float(step.log_prob or 0.0)))
        if step.token_id == self.eos_id:
            self.finish(FinishReason.END_OF_TURN)
            return True
        self.token_ids.append(step.token_id)
        text = self.reply.push(self.decoder.feed(step.token_id))
        if text:
            self._deliver(text)
        if self.reply.stopped:
            self.finish(FinishReason.END_OF_TURN if self.reply.ended_turn else FinishReason.STOP)
        elif self.steps >= self.max_new_tokens or step.is_last:
            self.finish(FinishReason.LENGTH)
        return self.finish_reason is not None

    def _deliver(self, text: str) -> None:
        """Hand the caller's loop the text that became final and the tokens generated since the last delta."""
        tokens, self.pending_tokens = tuple(self.pending_tokens), []
        self.send(Delta(text, tokens))

    def record(self) -> FinishedGeneration:
        """The frozen record of how this generation ended (for metrics)."""
        assert self.finish_reason is not None
        return FinishedGeneration(
            self.finish_reason, len(self.prompt_ids), self.steps, self.steps_after_cancel, self.tenant
        )

    def finish(self, reason: FinishReason, error: BaseException | None = None) -> None:
        """End the sequence once: release held-back text (a normal end) and tell the caller. Text released at the
        end can still complete a stop string: then the reply ended there, and the reason says so."""
        with self._lock:
            if self.finish_reason is not None:
                return
            self.finish_reason = reason
        self.finished_at = time.monotonic()
        if reason in (FinishReason.END_OF_TURN, FinishReason.LENGTH):
            text = self.reply.push(self.decoder.flush()) + self.reply.finish()
            if self.reply.stopped:
                self.finish_reason = FinishReason.END_OF_TURN if self.reply.ended_turn else FinishReason.STOP
            if text or self.pending_tokens:
                self._deliver(text)
        elif self.pending_tokens:
            self._deliver("")  # the tokens generated before a cancellation or deadline, for the record
        if self.on_finish is not None:  # before the caller hears of the end, so metrics are never behind
            self.on_finish(self)
        if error is not None:
            self.send(error)
        self.send(None)
