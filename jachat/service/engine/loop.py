"""The decode loop: one thread, one running batch on the native decoder (native.py), rows joining and leaving at
any step, each with its own options.

Between two steps the loop admits waiting rows: each is prefilled alone, its prompt but the last token, and joined
to the running batch; its last prompt token is its input at the next step, so its first token comes from the step
every row shares. It admits as many as the row limit and the KV-cache budget allow (cache.py: a row joins only
while every running row and it could reach their longest within the budget, so the cache never outgrows it) and
the prefill budget (prompt tokens per step) lets through, so a burst of arrivals does not stall the running rows
for all its prefills at once (one row is always admitted when there is room). A prompt longer than CHUNK_TOKENS is
prefilled a chunk per gap into a cache of its own (decoder.extend), so the running rows wait for a chunk per step,
not for the whole prompt; it joins at the gap where what is left fits in a chunk. Rows
wait in arrival order (the server's fairness order and priorities chose it); a waiting row that is stopped ends at
once, with no token. Then one step computes every row's next logits, and
each row picks its token with its own options (token.py). Its token goes to the outbox as a static batch's would
(core.Outbox: the server cannot tell the two apart). Rows that end leave the batch: `</s>`, their budget, or their
stop flag (a stop string, a cancel, a deadline, the drain), which is read before each step, so a stopped row costs
no more compute. A job (core's RunBatch: one call's rows, or several) ends when its last row does.

The decoder releases the GIL while it computes, so the sender thread runs during steps; this thread holds it for
the per-row choices only (numpy over one row's logits each).

Other work on the decoder (a scoring job: core.scoring) comes as an iterator that does a piece per `next`, oldest
job first. While rows run, they and that work share the decoder's time equally: after a piece, steps run until they
have had as long as it took (a long piece is followed by many steps), so neither the running rows nor the job waits
for the other's whole length. With no row running, pieces run back to back.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
import time
import traceback
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from jachat.service.engine import cache
from jachat.service.engine.token import Chooser, Decoding

# A prompt longer than this is prefilled in chunks of it, one a gap between two steps, outside the running batch
# (decoder.extend): the running rows wait for a chunk per step, not for the whole prompt.
CHUNK_TOKENS = 256

if TYPE_CHECKING:
    from jachat.service.engine.core import Outbox
    from jachat.service.engine.wire import RunBatch


@dataclasses.dataclass
class _Row:
    id: int
    job: int  # its RunBatch's number
    slot: int
    prompt: list[int]
    left: int  # new tokens it may still take
    chooser: Chooser
    longest: int  # the cache positions it may come to hold: its prompt and every token it may take
    next: int = -1  # the token it feeds the next step
    prefilled: int = 0  # prompt tokens in its own cache so far (a long prompt, a chunk a gap: decoder.extend)


class Loop:
    """The running batch and its decode thread (run); submit and close come from the engine's command thread."""

    def __init__(
        self,
        decoder: Any,
        eos_id: int,
        outbox: Outbox,
        flags: memoryview,
        max_rows: int,
        vocab_size: int,
        cache_budget: int,
        prefill_budget: int,
    ) -> None:
        self.decoder, self.eos_id, self.outbox, self.flags = decoder, eos_id, outbox, flags
        self.max_rows, self.vocab_size, self.cache_budget = max_rows, vocab_size, cache_budget
        # Prompt tokens prefilled between two steps, beyond the first row (--prefill-tokens-per-step, 64 by default).
        # Joins all prefilled in one gap keep a burst of arrivals in phase: in a closed loop of 16 streams they end
        # together and come back together for ever, each waiting for all 16 prefills. A few per gap spread them
        # over steps: TTFT p99 past the opening burst 0.58 s with 512, 0.23-0.25 s with 0 or 64, throughput within
        # the noise (Intel Xeon 2-core, MKL, the bench model, 64 tokens, the card's sampling; 2026-12-07).
        self.prefill_budget = prefill_budget
        self.chunk_tokens = max(prefill_budget, CHUNK_TOKENS)
        self._waiting: collections.deque[_Row] = collections.deque()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closing = False
        self._running: list[_Row] = []
        self._work: collections.deque[Iterator[None]] = collections.deque()  # other work, oldest first
        self._owed = 0.0  # decoder time (s) the running rows are owed for the last piece of other work
        self._jobs: dict[int, int] = {}  # a job's number: its rows still running or waiting
        self._ids = 0

    def submit(self, command: RunBatch) -> None:
        """Queue a job's rows; they join the running batch from the next step on."""
        self.outbox.start()
        try:
            decodings = Decoding.from_options(command.options, len(command.prompts), command.seeds)
            rows = []
            for prompt, slot, limit, decoding in zip(
                command.prompts, command.slots, command.limits, decodings, strict=True
            ):
                self._ids += 1
                chooser = Chooser(decoding, prompt, self.eos_id, self.vocab_size)
                rows.append(_Row(self._ids, command.number, slot, prompt, limit, chooser, len(prompt) + limit))
        except Exception:  # reported to the server, which fails the job's calls; the loop runs on
            self.outbox.end(command.number, traceback.format_exc())
            return
        with self._lock:
            self._jobs[command.number] = len(rows)
            self._waiting.extend(rows)
        self._wake.set()

    def submit_work(self, work: Iterator[None]) -> None:
        """Queue other work on the decoder, a piece per `next` (it reports its own end and errors)."""
        with self._lock:
            self._work.append(work)
        self._wake.set()

    def close(self) -> None:
        """No job will come: run thread returns once the rows it has have ended."""
        self._closing = True
        self._wake.set()

    def run(self) -> None:
        running = self._running
        while True:
            with self._lock:
                idle = not running and not self._waiting and not self._work
            if idle:
                if self._closing:
                    return
                self._wake.wait()
                self._wake.clear()
                continue
            try:
                self._drop([row for row in running if self.flags[row.slot]], running)
                self._admit(running)
                if running:
                    self._step(running)
                self._piece()
            except Exception:  # the decoder failed: every job it holds fails, as a static batch's would
                self._fail(running, traceback.format_exc())

    def _admit(self, running: list[_Row]) -> None:
        self._end_stopped()
        spent = 0
        while len(running) < self.max_rows:
            with self._lock:
                if not self._waiting:
                    return
                row = self._waiting[0]
                rest = len(row.prompt) - 1 - row.prefilled  # what its join still prefills
                if spent and spent + rest > self.prefill_budget:
                    return
                if not cache.fits((r.longest for r in running), row.longest, self.cache_budget):
                    if running:
                        return  # it waits for rows to leave (the rows already running can only leave)
                    self._waiting.popleft()  # the server gives no call more than the budget: never seen
                    self._ended(row, f"a row of {row.longest} positions exceeds the KV-cache budget")
                    continue
                if rest <= self.chunk_tokens:
                    self._waiting.popleft()
            if rest > self.chunk_tokens:  # a long prompt: one chunk now, outside the batch; the rest at later gaps
                self._extend(row)
                return
            spent += rest
            try:
                self.decoder.join(row.id, row.prompt)  # its first token comes from the next step, with every row's
            except Exception:  # this row's own failure (its prompt, the device's memory): it fails alone
                self._ended(row, traceback.format_exc())
                continue
            row.next = row.prompt[-1]
            running.append(row)
            self._held(running)

    def _extend(self, row: _Row) -> None:
        """The next chunk of a long prompt, into the row's own cache; it stays first in line meanwhile."""
        try:
            self.decoder.extend(row.id, row.prompt[row.prefilled : row.prefilled + self.chunk_tokens])
        except Exception:  # its own failure: it fails alone, and the decoder keeps nothing of it
            with self._lock:
                self._waiting.remove(row)
            self._ended(row, traceback.format_exc())
            return
        row.prefilled += self.chunk_tokens

    def _piece(self) -> None:
        """One piece of the oldest other work, once the running rows have had their share of the decoder."""
        if self._owed > 0 and self._running:
            return
        with self._lock:
            if not self._work:
                return
            work = self._work.popleft()
        started = time.monotonic()
        try:
            next(work)
        except StopIteration:
            return
        finally:
            self._owed = time.monotonic() - started
        with self._lock:
            self._work.appendleft(work)

    def _held(self, running: list[_Row]) -> None:
        """What the running rows hold of the KV-cache budget, for the server (its gauge, the gateway's)."""
        self.outbox.cache_used = len(running) * max((row.longest for row in running), default=0)

    def _end_stopped(self) -> None:
        """Waiting rows stopped (cancelled, past their deadline, drained) end now, with no token; a long prompt
        stopped midway leaves nothing in the decoder."""
        with self._lock:
            if not any(self.flags[row.slot] for row in self._waiting):
                return
            stopped = [row for row in self._waiting if self.flags[row.slot]]
            self._waiting = collections.deque(row for row in self._waiting if not self.flags[row.slot])
        begun = [row.id for row in stopped if row.prefilled]
        if begun:
            self.decoder.drop(begun)
        for row in stopped:
            self._ended(row)

    def _step(self, running: list[_Row]) -> None:
        started = time.monotonic()
        logits = self.decoder.step_array([row.next for row in running])
        self._owed -= time.monotonic() - started
        done = [row for row, values in zip(running, logits, strict=True) if self._record(row, values)]
        self._drop(done, running)

    def _record(self, row: _Row, logits: Any) -> bool:
        """The row's token from its logits, handed to the outbox; whether the row ends with it."""
        token, log_prob = row.chooser.choose(logits)
        outbox = self.outbox
        outbox.tokens.append((row.slot, token, log_prob, time.monotonic()))
        if outbox.asleep[0]:
            outbox.woken()
        row.next = token
        row.left -= 1
        return token == self.eos_id or row.left <= 0 or bool(self.flags[row.slot])

    def _drop(self, rows: list[_Row], running: list[_Row]) -> None:
        if not rows:
            return
        self.decoder.drop([row.id for row in rows])
        gone = {row.id for row in rows}
        order = {row_id: i for i, row_id in enumerate(self.decoder.rows)}  # a drop may reorder the rows left
        running[:] = sorted((row for row in running if row.id not in gone), key=lambda row: order[row.id])
        self._held(running)  # before the ends: whoever reads an end reads what the cache holds without the rows
        for row in rows:
            self._ended(row)

    def _ended(self, row: _Row, error: str | None = None) -> None:
        self._jobs[row.job] -= 1
        if self._jobs[row.job] == 0:
            del self._jobs[row.job]
            self.outbox.end(row.job, error)

    def _fail(self, running: list[_Row], error: str) -> None:
        """End every job with a row here or waiting, with the decoder's traceback; the decoder starts empty."""
        with self._lock:
            rows = running + list(self._waiting)
            self._waiting.clear()
        running.clear()
        self._held(running)
        self.decoder.reset()  # no row left in it, whatever state the failure left it in
        for number in {row.job for row in rows}:
            del self._jobs[number]
            self.outbox.end(number, error)
