"""The decode loop: one thread, one running batch on the native decoder (native.py), rows joining and leaving at
any step, each with its own options.

Between two steps the loop admits waiting rows: each is prefilled alone, its prompt but the last token, and joined
to the running batch; its last prompt token is its input at the next step, so its first token comes from the step
every row shares. It admits as many as the row limit allows and the prefill budget (prompt tokens per step) lets
through, so a burst of long prompts does not stall the running rows for all its prefills at once (one row is
always admitted when there is room, however long its prompt). Then one step computes every row's next logits, and
each row picks its token with its own options (token.py). Its token goes to the outbox as a static batch's would
(core.Outbox: the server cannot tell the two apart). Rows that end leave the batch: `</s>`, their budget, or their
stop flag (a stop string, a cancel, a deadline, the drain), which is read before each step, so a stopped row costs
no more compute. A job (core's RunBatch: one call's rows, or several) ends when its last row does.

The decoder releases the GIL while it computes, so the sender thread runs during steps; this thread holds it for
the per-row choices only (numpy over one row's logits each).
"""

from __future__ import annotations

import collections
import dataclasses
import threading
import time
import traceback
from typing import TYPE_CHECKING, Any

from jachat.service.engine.token import Chooser, Decoding

if TYPE_CHECKING:
    from jachat.service.engine.core import Outbox
    from jachat.service.engine.wire import RunBatch

PREFILL_BUDGET = 512  # prompt tokens prefilled between two steps, beyond the first waiting row


@dataclasses.dataclass
class _Row:
    id: int
    job: int  # its RunBatch's number
    slot: int
    prompt: list[int]
    left: int  # new tokens it may still take
    chooser: Chooser
    next: int = -1  # the token it feeds the next step


class Loop:
    """The running batch and its decode thread (run); submit and close come from the engine's command thread."""

    def __init__(
        self, decoder: Any, eos_id: int, outbox: Outbox, flags: memoryview, max_rows: int, vocab_size: int
    ) -> None:
        self.decoder, self.eos_id, self.outbox, self.flags = decoder, eos_id, outbox, flags
        self.max_rows, self.vocab_size = max_rows, vocab_size
        self.prefill_budget = PREFILL_BUDGET
        self._waiting: collections.deque[_Row] = collections.deque()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closing = False
        self._running: list[_Row] = []
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
                rows.append(_Row(self._ids, command.number, slot, prompt, limit, chooser))
        except Exception:  # reported to the server, which fails the job's calls; the loop runs on
            self.outbox.end(command.number, traceback.format_exc())
            return
        with self._lock:
            self._jobs[command.number] = len(rows)
            self._waiting.extend(rows)
        self._wake.set()

    def close(self) -> None:
        """No job will come: run thread returns once the rows it has have ended."""
        self._closing = True
        self._wake.set()

    def run(self) -> None:
        running = self._running
        while True:
            with self._lock:
                idle = not running and not self._waiting
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
            except Exception:  # the decoder failed: every job it holds fails, as a static batch's would
                self._fail(running, traceback.format_exc())

    def _admit(self, running: list[_Row]) -> None:
        spent = 0
        while len(running) < self.max_rows:
            with self._lock:
                if not self._waiting or (spent and spent + len(self._waiting[0].prompt) > self.prefill_budget):
                    return
                row = self._waiting.popleft()
            if self.flags[row.slot]:  # stopped while it waited: it ends with no token
                self._ended(row)
                continue
            spent += len(row.prompt)
            try:
                self.decoder.join(row.id, row.prompt)  # its first token comes from the next step, with every row's
            except Exception:  # this row's own failure (its prompt, the device's memory): it fails alone
                self._ended(row, traceback.format_exc())
                continue
            row.next = row.prompt[-1]
            running.append(row)

    def _step(self, running: list[_Row]) -> None:
        logits = self.decoder.step_array([row.next for row in running])
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
        running[:] = [row for row in running if row.id not in gone]
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
        self.decoder.reset()  # no row left in it, whatever state the failure left it in
        for number in {row.job for row in rows}:
            del self._jobs[number]
            self.outbox.end(number, error)
