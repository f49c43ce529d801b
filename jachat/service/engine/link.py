"""The server's side of the engine process (core.py): start it, run jobs on it, stop rows, watch that it lives.

Three channels cross the boundary, each batched or free of round trips (the messages: wire.py):
- commands (a pipe, server to engine): one message per job (a batch's prompt ids, its rows' slots and budgets and
  options; or a scoring job's sequences), written by a thread of their own: a stalled engine whose pipe is full
  blocks that thread, never a caller (the event loop, a scheduler thread);
- events (a pipe, engine to server): whatever tokens the decode threads recorded since the last message, and the
  jobs that ended, and at least every core.HEARTBEAT an empty message; a receiver thread here reads them and calls
  each row's `on_token` (decode, assemble, stop strings: engine/sequence.py);
- stop flags (a byte per slot in shared memory): a row that must end (its stop string, its caller gone, its
  deadline, the drain) sets its byte, and the decode thread reads it at the row's next token (a scoring job's, at
  its next piece).

A slot belongs to one row from the job's dispatch until the engine reports the job's end, so a late stop can never
reach the next row in the same slot. The receiver survives any one call's fate: a row whose handling fails ends
alone (INTERNAL, logged), and each job's waiter is woken by an event that only this module sets. When the engine
process dies (a segfault, a CUDA error, the OOM killer), its events pipe closes: every job in flight fails at once
with EngineLost, and `on_lost` tells the server; if the receiver itself ever fails, the engine is killed, with the
same outcome. `liveness()` says how long the engine has been silent, and how long it has made no progress while
work is in flight: the server's watch (server.py) turns health NOT_SERVING on a silence and ends the process on a
long one.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import logging
import mmap
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from jachat.service.domain.errors import EngineFailure, EngineLost
from jachat.service.engine import wire
from jachat.service.engine.core import rss_bytes
from jachat.service.engine.gpu import GpuError
from jachat.service.engine.wire import CoreOptions, Loaded, ScoredRow

log = logging.getLogger("jachat.engine")

PIPE_BYTES = 1 << 20  # the events pipe's buffer: the engine's sender never waits for a slow receiver
_F_SETPIPE_SZ = 1031  # fcntl.F_SETPIPE_SZ (Linux; named in the fcntl module from Python 3.10 on some builds only)

_ERRORS: dict[str, type[Exception]] = {"GpuError": GpuError, "ValueError": ValueError, "OSError": OSError}


class Row(Protocol):
    """A sequence as the engine process runs it (engine/sequence.py's Generation)."""

    prompt_ids: list[int]
    max_new_tokens: int
    halt: Callable[[], None]  # set here while the row runs: ends it at its next token

    @property
    def seed(self) -> int | None: ...

    def on_token(self, token_id: int, log_prob: float | None, at: float) -> bool: ...
    def fail(self, error: BaseException) -> None: ...


class Job(Protocol):
    """A scoring job as the engine process runs it (engine/scoring.py's Scoring)."""

    sequences: list[list[int]]
    top: bool
    halt: Callable[[], None]  # set here while it runs: ends it at its next piece


@dataclass(frozen=True)
class Liveness:
    """What the server knows of the engine's life: seconds since it last said anything (a heartbeat comes every
    core.HEARTBEAT), seconds since work in flight last progressed (a token or a job's end; 0 with none in flight),
    and whether the receiver still reads."""

    silent: float
    stuck: float
    receiving: bool


class _Job:
    """A job in flight: its rows' slots, and its end (the error, or a scoring job's rows)."""

    def __init__(self, slots: list[int]) -> None:
        self.slots = slots
        self.ended = threading.Event()
        self.error: Exception | None = None
        self.rows: list[ScoredRow] | None = None

    def end(self, error: Exception | None, rows: list[ScoredRow] | None = None) -> None:
        self.error, self.rows = error, rows
        self.ended.set()


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
    """The engine process, as the scheduler sees it: `run(rows, max_length, options)` and `score(job)` block until the
    job ends (on the scheduler's threads, one per replica)."""

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
        self._commands, self._events = commands_write, events_read
        self._outgoing: queue.SimpleQueue[tuple[int, wire.Command] | None] = queue.SimpleQueue()
        self._lock = threading.Lock()  # slots, rows and jobs
        self._free = list(range(slots))[::-1]
        self._rows: list[Row | None] = [None] * slots  # the row each slot's tokens go to
        self._owners: list[Row | Job | None] = [None] * slots  # whose stop flag each slot is
        self._jobs: dict[int, _Job] = {}
        self._numbers = itertools.count()
        self._closing = False
        self._killed: str | None = None  # why the server killed the engine, if it did
        self.lost: str | None = None
        self.cache_used = 0  # the decode loop's KV-cache positions held, as of the engine's last message
        self.heard = self.progressed = time.monotonic()
        self.loaded = self._load(options)
        self.heard = self.progressed = time.monotonic()
        self._writer = threading.Thread(target=self._write, name="jachat-commands", daemon=True)
        self._writer.start()
        self._receiver = threading.Thread(target=self._receive, name="jachat-receiver", daemon=True)
        self._receiver.start()

    @property
    def pid(self) -> int:
        return self.process.pid

    def rss(self) -> int:
        """The engine process's resident set size in bytes (0 once it is gone)."""
        return rss_bytes(self.process.pid) if self.process.poll() is None else 0

    def _load(self, options: CoreOptions) -> Loaded:
        """The handshake: `Load` out, `Ready` (or `LoadFailed`) back, each side checking the other's protocol."""
        try:
            wire.send(self._commands, wire.Load(wire.PROTOCOL, options))
            reply = wire.receive(self._events)
        except (EOFError, OSError):
            code = self.process.wait()
            self._release()
            raise RuntimeError(f"the engine process {describe_exit(code)} while loading the model") from None
        if isinstance(reply, wire.Ready) and reply.protocol == wire.PROTOCOL:
            for level, message in reply.loaded.notes:
                log.log(level, "%s", message)
            return reply.loaded
        if isinstance(reply, wire.LoadFailed):  # the engine returns once it has said so
            for level, message in reply.notes:
                log.log(level, "%s", message)
            self.process.wait()
            self._release()
            raise _ERRORS.get(reply.error, RuntimeError)(reply.message)
        self.process.kill()
        self.process.wait()
        self._release()
        spoken = reply.protocol if isinstance(reply, wire.Ready) else type(reply).__name__
        raise RuntimeError(f"the engine process speaks wire protocol {spoken}; this server speaks {wire.PROTOCOL}")

    def liveness(self) -> Liveness:
        now = time.monotonic()
        with self._lock:
            working = bool(self._jobs)
        return Liveness(now - self.heard, now - self.progressed if working else 0.0, self._receiver.is_alive())

    def _dispatch(self, rows: Sequence[Row | None], owners: Sequence[Row | Job]) -> tuple[int, _Job, list[int]]:
        """Slots for a job's rows (a scoring job takes one, for its flag, with no row), each owner given its
        `halt`; the job's number."""
        with self._lock:
            if self.lost is not None:
                raise EngineLost(self.lost)
            if not self._jobs:  # the progress clock counts from the first job in flight
                self.progressed = time.monotonic()
            slots = [self._free.pop() for _ in rows]
            for slot, row, owner in zip(slots, rows, owners, strict=True):
                self.flags[slot] = 0
                self._rows[slot], self._owners[slot] = row, owner
                owner.halt = lambda slot=slot, owner=owner: self._halt(slot, owner)  # type: ignore[misc]
            number = next(self._numbers)
            job = self._jobs[number] = _Job(slots)
        return number, job, slots

    def run(self, rows: Sequence[Row], max_length: int, options: dict[str, Any]) -> None:
        """Run rows as one generate_batch call on a free replica; returns when the engine reports its end.
        Raises EngineLost if the engine process is gone, EngineFailure if CTranslate2 failed the batch."""
        number, job, slots = self._dispatch(rows, rows)
        prompts, limits = [row.prompt_ids for row in rows], [row.max_new_tokens for row in rows]
        seeds = [row.seed for row in rows]
        given = any(seed is not None for seed in seeds)
        self._post(number, wire.RunBatch(number, prompts, slots, limits, max_length, options, seeds if given else None))
        self._wait(job)

    def score(self, work: Job) -> list[ScoredRow]:
        """Each sequence's teacher-forced log-probabilities (of its tokens after the first), and with `top` each
        place's most likely token, on a free replica (core.run_scoring); the rows scored before its stop flag was
        set if it was (fewer than its sequences). Raises as `run` does."""
        number, job, [slot] = self._dispatch([None], [work])
        self._post(number, wire.ScoreJob(number, slot, work.sequences, work.top))
        self._wait(job)
        return job.rows or []

    def _wait(self, job: _Job) -> None:
        job.ended.wait()
        if job.error is not None:
            raise job.error

    def _post(self, number: int, command: wire.Command) -> None:
        self._outgoing.put((number, command))

    def _write(self) -> None:
        """The commands thread: every command, in order; once the pipe is closed, each job fails as a lost engine's
        do."""
        broken = False
        while (item := self._outgoing.get()) is not None:
            number, command = item
            if not broken:
                try:
                    wire.send(self._commands, command)
                    continue
                except OSError:
                    broken = True
            self._ended(number, EngineLost(self.lost or "the engine process is gone"))

    def _halt(self, slot: int, owner: object) -> None:
        with self._lock:
            if self._owners[slot] is owner:
                self.flags[slot] = 1

    def _ended(self, number: int, error: Exception | None, rows: list[ScoredRow] | None = None) -> None:
        with self._lock:
            job = self._jobs.pop(number, None)
            if job is None:
                return
            for slot in job.slots:
                owner = self._owners[slot]
                if owner is not None:
                    owner.halt = _nothing
                self._rows[slot] = self._owners[slot] = None
                self._free.append(slot)
        job.end(error, rows)

    def _receive(self) -> None:
        """The receiver thread: every token to its row, every job's end to its waiter; then the engine's death.
        Nothing one call does can end it: a row whose `on_token` fails ends alone."""
        try:
            self._read()
        except BaseException:  # a bug of the receiver's own: no token could reach anyone again
            log.exception("the engine's receiver failed: killing the engine process")
            self.kill("the engine's receiver failed")
        self._lose()

    def _read(self) -> None:
        rows, flags = self._rows, self.flags
        for messages in wire.messages(self._events):
            self.heard = time.monotonic()
            for message in messages:
                assert isinstance(message, wire.Progress), message
                tokens, ended, pieces = message.tokens, message.ended, message.pieces
                self.cache_used = message.cache_used
                if tokens or ended or pieces:
                    self.progressed = time.monotonic()
                for slot, token_id, log_prob, at in tokens:
                    row = rows[slot]
                    if row is None:
                        continue
                    try:
                        stop = row.on_token(token_id, log_prob, at)
                    except Exception:
                        stop = True
                        log.exception("a row failed on its token: its call ends INTERNAL")
                        with contextlib.suppress(Exception):
                            row.fail(EngineFailure("generation failed"))
                    if stop:
                        flags[slot] = 1
                for number, error, result in ended:
                    if error is not None:
                        log.error("the engine failed a job:\n%s", error.rstrip())
                    self._ended(number, None if error is None else EngineFailure("generation failed"), result)

    def kill(self, reason: str) -> None:
        """End the engine process now (the watchdog's last resort, or a receiver that failed): its pipe closes, and
        every job in flight fails with EngineLost, `reason` said."""
        self._killed = reason
        with contextlib.suppress(OSError):
            self.process.kill()

    def _lose(self) -> None:
        """The engine's events pipe closed: tell the server (unless it closed the engine itself), then fail every
        job in flight now."""
        try:
            code = self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:  # it closed its pipe but lives on: it is no engine any more
            self.process.kill()
            code = self.process.wait()
        reason = f"the engine process (pid {self.process.pid}) {describe_exit(code)}"
        if self._killed is not None:
            reason = f"{self._killed}; {reason}"
        with self._lock:
            self.lost = reason
            numbers = list(self._jobs)
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
        self._post(-1, wire.Stop())
        self._outgoing.put(None)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            log.error("the engine process did not stop within %.0f s: killing it", timeout)
            self.process.kill()
            self.process.wait()
        self._receiver.join(timeout)
        self._writer.join(1.0)
        self._release()

    def _release(self) -> None:
        for fd in (self._commands, self._events):
            with contextlib.suppress(OSError):
                os.close(fd)
        self.flags.release()
        self._shared.close()
        os.close(self._flags_fd)
