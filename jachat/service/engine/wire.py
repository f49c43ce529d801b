"""The engine process's wire: every message between the server (link.py) and the engine process (core.py), typed,
and how each crosses a pipe.

Two pipes cross the boundary. Commands go from the server to the engine: `Load` first, then `RunBatch` and
`ScoreJob` in any number, then `Stop`. Events come back: `Ready` or `LoadFailed` once, then `Progress` messages
(everything the decode threads recorded since the last one; at least one every core.HEARTBEAT, empty if need be).
A message is one frame: its length (4 bytes, big-endian), then the message pickled. Both ends are this package at
one version, so pickle is safe here and costs least; the handshake still checks `PROTOCOL`, so a server and an
engine of different versions (a half-upgraded install, a stale process) refuse each other in one clear line rather
than misread a message. Change `PROTOCOL` whenever a message changes.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from jachat.service.engine.warmup import WarmUp

PROTOCOL = 3
_HEADER = struct.Struct("!I")  # a frame's length
READ_BYTES = 1 << 20  # the most one read takes: every frame it holds is decoded at once

# a scored sequence: its tokens' log-probabilities after the first, and (when asked) the most likely token at each of
# those places and its log-probability (else empty)
ScoredRow = tuple[list[float], list[int], list[float]]
# a generated token: (slot, token id, its log-probability or None, time.monotonic() on the decode thread)
Token = tuple[int, int, float | None, float]
# a job that ended: (its number, the engine's traceback or None, a scoring job's rows or None)
Ended = tuple[int, str | None, list[ScoredRow] | None]


@dataclasses.dataclass(frozen=True)
class CoreOptions:
    """What the engine process needs to load the model."""

    model_dir: Path
    quantization: str  # the converted weight type (the manifest's)
    context_length: int
    eos_id: int
    device: str = "auto"
    compute_type: str = "default"
    device_index: int = 0
    replicas: int = 0  # 0: auto
    intra_threads: int = 0  # 0: auto
    max_batch_size: int = 16
    warm_up: bool = True
    spare_replicas: int = 0  # replicas beyond `replicas`, which the scheduler uses only while the load is light
    # static: CTranslate2's generate_batch, one fixed batch per call of the replicas; native: the decode loop
    # (loop.py) on the native decoder; auto: native where it is built and passes its self-test, else static
    decode_loop: str = "auto"
    kv_cache_tokens: int = 0  # the decode loop's KV-cache budget in positions; 0: from the free memory (cache.py)
    prefill_tokens: int = 64  # the decode loop's prompt tokens prefilled between two steps, beyond the first row


@dataclasses.dataclass(frozen=True)
class Loaded:
    """What the engine process reports once the model is loaded (and warm)."""

    device: str
    compute_type: str
    replicas: int  # the replicas the threads were shared out for
    intra_threads: int
    warm: WarmUp | None
    notes: tuple[tuple[int, str], ...] = ()  # (level, message) logged while loading, for the server to log
    spare_replicas: int = 0
    # with the decode loop, `replicas` is its row limit: the most calls (jobs) it runs at once
    loop: bool = False
    kv_cache_tokens: int = 0  # the decode loop's KV-cache budget in positions (cache.py)
    kv_bytes_per_token: int = 0  # what one position of the cache costs, every layer's keys and values

    @property
    def all_replicas(self) -> int:
        return self.replicas + self.spare_replicas


# Commands: server to engine.


@dataclasses.dataclass(frozen=True)
class Load:
    """The first command: load the model as `options` say, if `protocol` is the engine's own."""

    protocol: int
    options: CoreOptions


@dataclasses.dataclass(frozen=True)
class RunBatch:
    """One generate_batch call on a free replica (with the decode loop: rows that join the running batch): each
    row's prompt ids, the slot its tokens and stop flag go by, and its budget of new tokens; CTranslate2's
    max_length and decoding options for the whole batch; each row's seed (the loop only)."""

    number: int
    prompts: list[list[int]]
    slots: list[int]
    limits: list[int]
    max_length: int
    options: dict[str, Any]
    seeds: list[int | None] | None = None


@dataclasses.dataclass(frozen=True)
class ScoreJob:
    """Teacher-forced log-probabilities of each sequence (with `top`, each place's most likely token too), on a
    free replica; `slot` is the job's stop flag."""

    number: int
    slot: int
    sequences: list[list[int]]
    top: bool


@dataclasses.dataclass(frozen=True)
class Stop:
    """No more work: finish what runs (every stop flag is set), report it, unload, exit."""


Command = Load | RunBatch | ScoreJob | Stop


# Events: engine to server.


@dataclasses.dataclass(frozen=True)
class Ready:
    """The model is loaded; `protocol` is the engine's."""

    protocol: int
    loaded: Loaded


@dataclasses.dataclass(frozen=True)
class LoadFailed:
    """The model could not be loaded (or the protocols differ): the exception's type name and message, for one line
    to the operator, and what the engine logged meanwhile."""

    error: str
    message: str
    notes: tuple[tuple[int, str], ...] = ()


@dataclasses.dataclass(frozen=True)
class Progress:
    """Everything recorded since the last message: tokens, then the jobs that ended (a job's end is recorded after
    its last token, so whoever reads an end has read that job's tokens), and the scoring pieces done (progress,
    where a job has no tokens). Empty, it is the engine's sign of life."""

    tokens: list[Token]
    ended: list[Ended]
    pieces: int
    # the decode loop: the KV-cache positions its running rows hold by the fit rule (rows x the longest a row may
    # reach, cache.fits), as of this message; 0 with static batches
    cache_used: int = 0


Event = Ready | LoadFailed | Progress


def frame(message: Command | Event) -> bytes:
    """A message as it crosses the pipe."""
    payload = pickle.dumps(message, pickle.HIGHEST_PROTOCOL)
    return _HEADER.pack(len(payload)) + payload


def send(fd: int, message: Command | Event) -> None:
    """Write one message whole (a pipe may take a big frame in parts). Raises OSError once the reader is gone."""
    view = memoryview(frame(message))
    while view:
        view = view[os.write(fd, view) :]


def receive(fd: int) -> Command | Event:
    """Read one message (blocking). Raises EOFError when the writer is gone."""
    (size,) = _HEADER.unpack(_read_exactly(fd, _HEADER.size))
    message: Command | Event = pickle.loads(_read_exactly(fd, size))
    return message


def _read_exactly(fd: int, size: int) -> bytes:
    chunks, left = [], size
    while left:
        chunk = os.read(fd, min(left, READ_BYTES))
        if not chunk:
            raise EOFError("the pipe closed")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def messages(fd: int) -> Iterator[list[Command | Event]]:
    """The messages on a pipe, as many per read as it holds (each read, a system call, lets another thread take
    the GIL, and a busy event loop keeps it up to its switch interval: one read per message would fall behind a
    sender of one message per millisecond), until the writer is gone."""
    buffer = bytearray()
    while True:
        try:
            chunk = os.read(fd, READ_BYTES)
        except OSError:
            return
        if not chunk:
            return
        buffer += chunk
        start, out = 0, []
        while len(buffer) - start >= _HEADER.size:
            (size,) = _HEADER.unpack_from(buffer, start)
            begin = start + _HEADER.size
            if len(buffer) - begin < size:
                break
            out.append(pickle.loads(memoryview(buffer)[begin : begin + size]))
            start = begin + size
        del buffer[:start]
        yield out
