"""One generation's state machine: the caller's side of a sequence in a batch.

The engine process records each token of this sequence, and the server's receiver thread (link.py) calls
`on_token` with it, off the decode thread and off the event loop. The sequence decodes the id to text (byte-exact,
never half a character), assembles the reply (`<NL>` to newlines, the caller's stop strings and the model starting
the user's turn end it, held-back text never taken back), counts its tokens against max_new_tokens, notices
cancellation and the deadline, and hands text deltas to its caller's event loop. `finish` ends it exactly once,
whoever calls it first (the receiver, the scheduler, the drain), and `halt`s the row in the engine: its stop flag,
read by the decode thread at the row's next token. The scheduler only decides which sequences share a batch;
everything about one reply is here.

Text and tokens wait for the caller in the sequence's `Unsent` (unsent.py), the one place they are merged; the
loop hears of new text through its `Mailbox` (work.py), one wake-up (MORE) per take at most, and one wake-up of the
loop carries whatever all sequences posted since the last one.
"""

from __future__ import annotations

import asyncio
import time
from typing import Protocol

from jachat.service.domain.results import (
    FinishedGeneration,
    FinishReason,
    GeneratedToken,
    Priority,
)
from jachat.service.domain.sampling import SamplingOptions
from jachat.service.engine.unsent import Unsent
from jachat.service.engine.work import Work
from jachat.service.text.reply import ReplyAssembler
from jachat.service.text.tokenizer import StreamDecoder


class TokenObserver(Protocol):
    """What a sequence reports per token (the metrics implement it). Called from generation threads."""

    def first_token(self, seconds: float) -> None: ...
    def token_interval(self, seconds: float) -> None: ...


class More:
    """Posted to the caller's loop when its Unsent has text for it, once per take at most."""


MORE = More()  # besides it a caller receives the error that ended its generation, or None (its end)


class Generation(Work):
    """One request: its inputs, and its state shared between the receiver thread and its caller's event loop."""

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
        logprobs: bool = False,
        streaming: bool = True,
    ) -> None:
        super().__init__(len(prompt_ids) + max_new_tokens, deadline, loop, priority, tenant)
        self.prompt_ids = prompt_ids
        self.options = options
        self.max_new_tokens = max_new_tokens
        # log-probabilities cost CTranslate2 a log-softmax per step (16% of a millisecond step, measured): only
        # the calls that asked for them compute them, so they batch apart
        self.logprobs = logprobs
        # what the caller has not taken yet (a caller that wants the whole reply is not woken per token)
        self.unsent = Unsent(streaming)
        self._key = (options.batch_key(), logprobs)
        self.eos_id = eos_id
        self.decoder = decoder
        self.reply = reply
        self.first_token_at: float | None = None
        self.token_ids: list[int] = []
        self.steps = 0
        self.steps_after_cancel = 0
        self.observer: TokenObserver | None = None
        self.last_token_at = 0.0

    @property
    def key(self) -> object:
        return self._key

    @property
    def seed(self) -> int | None:
        return self.options.seed

    @property
    def length(self) -> int:
        return len(self.prompt_ids)

    @property
    def exact_length(self) -> bool:
        return self.options.history_penalty

    def tokens_left(self) -> int:
        return 0 if self.finish_reason is not None else self.max_new_tokens - self.steps

    def on_token(self, token_id: int, log_prob: float | None, at: float) -> bool:
        """A token the engine generated for this row at `at` (its time.monotonic()); called in order, by one
        thread at a time (the receiver). True: the row must stop."""
        if self.finish_reason is not None:
            return True
        if self.cancelled.is_set() or self.expired(time.monotonic()):
            self.steps_after_cancel += self.cancelled.is_set()
            self.finish(self.stop_reason())
            return True
        self.steps += 1
        if self.steps == 1:
            self.first_token_at = first = time.monotonic()  # when the server has it: the TTFT callers see
        if self.observer is not None:
            if self.steps == 1:
                self.observer.first_token(first - self.arrived)
            else:
                self.observer.token_interval(at - self.last_token_at)  # the engine's own pace, by its clock
        self.last_token_at = at
        self.unsent.token(GeneratedToken(token_id, float(log_prob or 0.0)))
        if token_id == self.eos_id:
            self.finish(FinishReason.END_OF_TURN)
            return True
        self.token_ids.append(token_id)
        self._deliver(self.reply.push(self.decoder.feed(token_id)))
        if self.reply.stopped:
            self.finish(FinishReason.END_OF_TURN if self.reply.ended_turn else FinishReason.STOP)
        elif self.steps >= self.max_new_tokens:
            self.finish(FinishReason.LENGTH)
        return self.finish_reason is not None

    def _deliver(self, text: str) -> None:
        """Text that became final (maybe none): it waits in `unsent`, and a streaming caller is woken for it."""
        if self.unsent.text(text):
            self.send(MORE)

    def record(self) -> FinishedGeneration:
        """The frozen record of how this generation ended (for metrics)."""
        assert self.finish_reason is not None
        return FinishedGeneration(
            self.finish_reason, len(self.prompt_ids), self.steps, self.steps_after_cancel, self.tenant
        )

    def release(self) -> None:
        """At the end: release held-back text (a normal end). Text released at the end can still complete a stop
        string: then the reply ended there, and the reason says so."""
        if self.finish_reason in (FinishReason.END_OF_TURN, FinishReason.LENGTH):
            text = self.reply.push(self.decoder.flush()) + self.reply.finish()
            if self.reply.stopped:
                self.finish_reason = FinishReason.END_OF_TURN if self.reply.ended_turn else FinishReason.STOP
            self._deliver(text)  # (the end itself, posted next, wakes a caller that wants the whole reply)
