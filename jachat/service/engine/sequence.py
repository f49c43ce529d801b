"""One generation's state machine: the caller's side of a sequence in a batch.

The engine process records each token of this sequence, and the server's receiver thread (link.py) calls
`on_token` with it, off the decode thread and off the event loop. The sequence decodes the id to text (byte-exact,
never half a character), assembles the reply (`<NL>` to newlines, the caller's stop strings and the model starting
the user's turn end it, held-back text never taken back), counts its tokens against max_new_tokens, notices
cancellation and the deadline, and hands text deltas to its caller's event loop. `finish` ends it exactly once,
whoever calls it first (the receiver, the scheduler, the drain), and `halt`s the row in the engine: its stop flag,
read by the decode thread at the row's next token. The scheduler only decides which sequences share a batch;
everything about one reply is here.

Deltas reach the loop through its `Mailbox`: one wake-up of the loop carries whatever all sequences posted since
the last one, and the caller takes every delta waiting at once (`take`), so a caller that falls behind gets the
text and tokens generated since in one piece (`Delta.join`), never a backlog of one message per token.
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from typing import Protocol

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


Item = Delta | BaseException | None  # what a caller receives: text, the error that ended it, or its end


def _nothing() -> None:
    pass


class Mailbox:
    """Hand-offs from other threads to one event loop, batched: the first item posted since the loop last looked
    schedules one delivery, which takes every item posted until it runs (one self-pipe write per wake-up, not per
    token). One per loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._items: list[tuple[Generation, Item]] = []
        self._lock = threading.Lock()

    @classmethod
    def of(cls, loop: asyncio.AbstractEventLoop) -> Mailbox:
        with _MAILBOXES_LOCK:
            box = _MAILBOXES.get(loop)
            if box is None:
                box = _MAILBOXES[loop] = cls(loop)
            return box

    def post(self, gen: Generation, item: Item) -> None:
        with self._lock:
            self._items.append((gen, item))
            first = len(self._items) == 1
        if first:
            self.loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        with self._lock:
            items, self._items = self._items, []
        for gen, item in items:
            gen.inbox.append(item)
            gen.ready.set()


_MAILBOXES: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Mailbox] = weakref.WeakKeyDictionary()
_MAILBOXES_LOCK = threading.Lock()


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
        logprobs: bool = False,
        streaming: bool = True,
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
        # log-probabilities cost CTranslate2 a log-softmax per step (16% of a millisecond step, measured): only
        # the calls that asked for them compute them, so they batch apart
        self.logprobs = logprobs
        # a caller that wants the whole reply gets it in one delta at the end: its loop is not woken per token
        self.held: list[str] | None = None if streaming else []
        self.key = (options.batch_key(), logprobs)
        self.exact_length = options.history_penalty
        self.arrived = time.monotonic()
        self.eos_id = eos_id
        self.decoder = decoder
        self.reply = reply
        self.loop = loop
        self.mailbox = Mailbox.of(loop)
        self.inbox: deque[Item] = deque()  # filled on the loop by the mailbox, emptied by `take`
        self.ready = asyncio.Event()
        self.halt: Callable[[], None] = _nothing  # while the row runs: its stop flag in the engine (link.py)
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

    def send(self, item: Item) -> None:
        self.mailbox.post(self, item)

    async def take(self) -> list[Item]:
        """Every item delivered since the last take (waits for one)."""
        while not self.inbox:
            self.ready.clear()
            await self.ready.wait()
        items = list(self.inbox)
        self.inbox.clear()
        return items

    def cancel(self) -> None:
        """The caller is gone (or the drain is over): the row stops at its next token, which ends the sequence."""
        self.cancelled.set()
        self.halt()

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now >= self.deadline

    def stop_reason(self) -> FinishReason:
        """Why a sequence that must stop now stops: its deadline, or its caller going away."""
        now = time.monotonic()
        if self.expired(now) or (self.cancelled.is_set() and self.expired(now + DEADLINE_SLACK)):
            return FinishReason.DEADLINE
        return FinishReason.CANCELLED

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
        self.pending_tokens.append(GeneratedToken(token_id, float(log_prob or 0.0)))
        if token_id == self.eos_id:
            self.finish(FinishReason.END_OF_TURN)
            return True
        self.token_ids.append(token_id)
        text = self.reply.push(self.decoder.feed(token_id))
        if text:
            self._deliver(text)
        if self.reply.stopped:
            self.finish(FinishReason.END_OF_TURN if self.reply.ended_turn else FinishReason.STOP)
        elif self.steps >= self.max_new_tokens:
            self.finish(FinishReason.LENGTH)
        return self.finish_reason is not None

    def _deliver(self, text: str) -> None:
        """Hand the caller's loop the text that became final and the tokens generated since the last delta (or,
        for a caller that wants the whole reply, keep them for the end)."""
        if self.held is not None:
            self.held.append(text)
            return
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
        self.halt()
        self.finished_at = time.monotonic()
        if reason in (FinishReason.END_OF_TURN, FinishReason.LENGTH):
            text = self.reply.push(self.decoder.flush()) + self.reply.finish()
            if self.reply.stopped:
                self.finish_reason = FinishReason.END_OF_TURN if self.reply.ended_turn else FinishReason.STOP
            if text or self.pending_tokens:
                self._deliver(text)
        elif self.pending_tokens:
            self._deliver("")  # the tokens generated before a cancellation or deadline, for the record
        if self.held:
            self.send(Delta("".join(self.held), tuple(self.pending_tokens)))
            self.held, self.pending_tokens = [], []
        if self.on_finish is not None:  # before the caller hears of the end, so metrics are never behind
            self.on_finish(self)
        if error is not None:
            self.send(error)
        self.send(None)
