"""The server's side of the engine process (core.py): start it, run batches on it, stop rows, hear of its death.

Three channels cross the boundary, each batched or free of round trips:
- commands (a pipe, server to engine): one message per batch (prompt ids, the rows' slots and budgets, options);
- events (a pipe, engine to server): whatever tokens the decode threads recorded since the last message, and the
  batches that ended; a receiver thread here reads them and calls each row's `on_token` (decode, assemble, stop
  strings: engine/sequence.py);
- stop flags (a byte per slot in shared memory): a row that must end (its stop string, its caller gone, its
  deadline, the drain) sets its byte, and the decode thread reads it at the row's next token.

A slot belongs to one row from the batch's dispatch until the engine reports the batch's end, so a late stop can
never reach the next row in the same slot. When the engine process dies (a segfault, a CUDA error, the OOM killer),
its events pipe closes: every batch in flight fails at once with EngineLost, and `on_lost` tells the server.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import logging
import mmap
import os
import pickle
import signal
import struct
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from multiprocessing.connection import Connection
from typing import Any, Protocol

from jachat.service.domain.errors import EngineFailure, EngineLost
from jachat.service.engine.core import CoreOptions, Loaded, ScoredRow, rss_bytes
from jachat.service.engine.gpu import GpuError

log = logging.getLogger("jachat.engine")

PIPE_BYTES = 1 << 20  # the events pipe's buffer: the engine's sender never waits for a slow receiver
_F_SETPIPE_SZ = 1031  # fcntl.F_SETPIPE_SZ (Linux; named in the fcntl module from Python 3.10 on some builds only)
_HEADER = struct.Struct("!i")  # multiprocessing.connection's frame header: the payload's length

_ERRORS: dict[str, type[Exception]] = {"GpuError": GpuError, "ValueError": ValueError, "OSError": OSError}


class Row(Protocol):
    """A sequence as the engine process runs it (engine/sequence.py's Generation)."""

    prompt_ids: list[int]
    max_new_tokens: int
    halt: Callable[[], None]  # set here while the row runs: ends it at its next token

    def on_token(self, token_id: int, log_prob: float, at: float) -> bool: ...


class _Batch:
    """A batch in flight: its rows by slot, and its end (with the engine's traceback if it failed)."""

    def __init__(self, slots: list[int]) -> None:
        self.slots = slots
        self.ended = threading.Event()
        self.error: Exception | None = None

    def end(self, error: Exception | None, log_probs: list[ScoredRow] | None = None) -> None:
        self.error = error
        self.ended.set()


class _Scoring(_Batch):
    """A scoring job in flight: no rows, its log-probabilities as a future."""

    def __init__(self) -> None:
        super().__init__([])
        self.future: Future[list[ScoredRow]] = Future()

    def end(self, error: Exception | None, log_probs: list[ScoredRow] | None = None) -> None:
        if error is not None:
            self.future.set_exception(error)
        else:
            self.future.set_result(log_probs or [])
        super().end(error)


def _nothing() -> None:
    pass


def describe_exit(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with status {code}"


class EngineProcess:
    """The engine process, as the scheduler sees it: `run(rows, max_length, options)` blocks until the batch ends."""

    def __init__(self, options: CoreOptions, slots: int, on_lost: Callable[[str], None] | None = None) -> None:
        self.on_lost = on_lost
        self._flags_fd = os.memfd_create("jachat-stop-flags")
        os.ftruncate(self._flags_fd, slots)
        self._shared = mmap.mmap(self._flags_fd, slots)
        self.flags = memoryview(self._shared)
        commands_read, commands_write = os.pipe()
        events_read, events_write = os.pipe()
        fds = (commands_read, events_write, self._flags_fd)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "jachat.service.engine.core", *map(str, fds), str(slots)],
            pass_fds=fds,
            stdin=subprocess.DEVNULL,
        )
        os.close(commands_read)
        os.close(events_write)  # the engine holds the only writer: its death closes the pipe
        with contextlib.suppress(OSError):  # above /proc/sys/fs/pipe-max-size: the default buffer does
            fcntl.fcntl(events_read, _F_SETPIPE_SZ, PIPE_BYTES)
        self._commands = Connection(commands_write, readable=False)
        self._events = Connection(events_read, writable=False)
        self._send_lock = threading.Lock()
        self._lock = threading.Lock()  # slots, rows and batches
        self._free = list(range(slots))[::-1]
        self._rows: list[Row | None] = [None] * slots
        self._batches: dict[int, _Batch] = {}
        self._numbers = itertools.count()
        self._closing = False
        self.lost: str | None = None
        self._commands.send(options)
        self.loaded = self._await_loaded()
        self._receiver = threading.Thread(target=self._receive, name="jachat-receiver", daemon=True)
        self._receiver.start()

    @property
    def pid(self) -> int:
        return self.process.pid

    def rss(self) -> int:
        """The engine process's resident set size in bytes (0 once it is gone)."""
        return rss_bytes(self.process.pid) if self.process.poll() is None else 0

    def _await_loaded(self) -> Loaded:
        try:
            reply = self._events.recv()
        except (EOFError, OSError):
            code = self.process.wait()
            self._release()
            raise RuntimeError(f"the engine process {describe_exit(code)} while loading the model") from None
        notes = reply[-1].notes if reply[0] == "ready" else reply[3]
        for level, message in notes:
            log.log(level, "%s", message)
        if reply[0] == "failed":
            self.process.wait()
            self._release()
            raise _ERRORS.get(reply[1], RuntimeError)(reply[2])
        loaded: Loaded = reply[1]
        return loaded

    def run(self, rows: Sequence[Row], max_length: int, options: dict[str, Any]) -> None:
        """Run rows as one generate_batch call on a free replica; returns when the engine reports its end.
        Raises EngineLost if the engine process is gone, EngineFailure if CTranslate2 failed the batch."""
        with self._lock:
            if self.lost is not None:
                raise EngineLost(self.lost)
            slots = [self._free.pop() for _ in rows]
            for slot, row in zip(slots, rows, strict=True):
                self.flags[slot] = 0
                self._rows[slot] = row
                row.halt = lambda slot=slot, row=row: self._halt(slot, row)  # type: ignore[misc]
            number = next(self._numbers)
            batch = self._batches[number] = _Batch(slots)
        prompts, limits = [row.prompt_ids for row in rows], [row.max_new_tokens for row in rows]
        self._post(number, ("run", number, prompts, slots, limits, max_length, options))
        batch.ended.wait()
        if batch.error is not None:
            raise batch.error

    def score(self, sequences: list[list[int]], top: bool = False) -> Future[list[ScoredRow]]:
        """Each sequence's teacher-forced log-probabilities (of its tokens after the first), and with `top` each
        place's most likely token, on the next free replica (core.run_scoring). The future fails with EngineLost or
        EngineFailure as `run` does."""
        with self._lock:
            if self.lost is not None:
                raise EngineLost(self.lost)
            number = next(self._numbers)
            job = _Scoring()
            self._batches[number] = job
        self._post(number, ("score", number, sequences, top))
        return job.future

    def _post(self, number: int, command: tuple[Any, ...]) -> None:
        """Send a job's command; if the engine's pipe is already closed, the job fails as a lost engine's do."""
        try:
            with self._send_lock:
                self._commands.send(command)
        except OSError:
            self._ended(number, EngineLost(self.lost or "the engine process is gone"))

    def _halt(self, slot: int, row: Row) -> None:
        with self._lock:
            if self._rows[slot] is row:
                self.flags[slot] = 1

    def _ended(self, number: int, error: Exception | None, log_probs: list[ScoredRow] | None = None) -> None:
        with self._lock:
            batch = self._batches.pop(number, None)
            if batch is None:
                return
            for slot in batch.slots:
                row = self._rows[slot]
                if row is not None:
                    row.halt = _nothing
                self._rows[slot] = None
                self._free.append(slot)
        batch.end(error, log_probs)

    def _messages(self) -> Iterator[list[Any]]:
        """The engine's messages, as many per read as the pipe holds: each read (a system call) lets another
        thread take the GIL, and a busy event loop keeps it up to the switch interval (5 ms), so reading one
        message per read would fall behind an engine that sends one per millisecond."""
        fd, buffer = self._events.fileno(), bytearray()
        while True:
            try:
                chunk = os.read(fd, PIPE_BYTES)
            except OSError:
                return
            if not chunk:
                return
            buffer += chunk
            start, messages = 0, []
            while len(buffer) - start >= _HEADER.size:
                (size,) = _HEADER.unpack_from(buffer, start)
                if len(buffer) - start - _HEADER.size < size:
                    break
                begin = start + _HEADER.size
                messages.append(pickle.loads(memoryview(buffer)[begin : begin + size]))
                start = begin + size
            del buffer[:start]
            yield messages

    def _receive(self) -> None:
        """The receiver thread: every token to its row, every batch's end to its waiter; then the engine's death."""
        rows, flags = self._rows, self.flags
        for messages in self._messages():
            for tokens, ended in messages:
                for slot, token_id, log_prob, at in tokens:
                    row = rows[slot]
                    if row is not None and row.on_token(token_id, log_prob, at):
                        flags[slot] = 1
                for number, error, log_probs in ended:
                    if error is not None:
                        log.error("the engine failed a batch:\n%s", error.rstrip())
                    self._ended(number, None if error is None else EngineFailure("generation failed"), log_probs)
        self._lose()

    def _lose(self) -> None:
        """The engine's events pipe closed: tell the server (unless it closed the engine itself), then fail every
        batch in flight now."""
        try:
            code = self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:  # it closed its pipe but lives on: it is no engine any more
            self.process.kill()
            code = self.process.wait()
        reason = f"the engine process (pid {self.process.pid}) {describe_exit(code)}"
        with self._lock:
            self.lost = reason
            numbers = list(self._batches)
        if not self._closing:
            log.error("%s: every call in flight ends UNAVAILABLE", reason)
            if self.on_lost is not None:
                self.on_lost(reason)
        for number in numbers:
            self._ended(number, EngineLost(reason))

    def close(self, timeout: float = 30.0) -> None:
        """Stop every row, let the engine finish and exit (killed after `timeout` seconds)."""
        self._closing = True
        self.flags[:] = b"\x01" * len(self.flags)
        try:
            with self._send_lock:
                self._commands.send(("stop",))
        except OSError:
            pass
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            log.error("the engine process did not stop within %.0f s: killing it", timeout)
            self.process.kill()
            self.process.wait()
        self._receiver.join(timeout)
        self._release()

    def _release(self) -> None:
        self._commands.close()
        self._events.close()
        self.flags.release()
        self._shared.close()
        os.close(self._flags_fd)
