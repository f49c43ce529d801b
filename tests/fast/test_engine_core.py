"""The engine process's loop (engine/core.py's `serve`) driven over real pipes with the wire's messages, with a fake
model in place of CTranslate2: the handshake and its protocol check, a batch's tokens and its end, exact budgets,
the stop flag, a scoring job, and the stop."""

from __future__ import annotations

import mmap
import os
import select
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from jachat.service.engine import core, wire

SLOTS = 8
OPTIONS = wire.CoreOptions(Path("/nowhere"), "float32", 64, 3, device="cpu", warm_up=False)


@dataclass
class Step:
    batch_id: int
    token_id: int
    log_prob: float | None


@dataclass
class Scored:
    log_probs: list[float]


class FakeGenerator:
    """generate_batch's contract as core.py uses it: each step, each running row's token through the callback (a
    row whose callback says True ends), up to max_length steps; a row's tokens are its prompt's length plus the step;
    `fail` among the options fails the batch. score_batch gives each token after the first a log-probability of -1
    per position."""

    def __init__(self) -> None:
        self.unloaded = False

    def generate_batch(self, prompts: list[list[str]], max_length: int, callback: Any, **options: Any) -> None:
        if options.get("fail"):
            raise RuntimeError("the device failed the batch")
        running = set(range(len(prompts)))
        for step in range(max_length):
            for row in sorted(running):
                log_prob = -0.5 if options.get("return_scores") else None
                if callback(Step(row, len(prompts[row]) + step, log_prob)):
                    running.discard(row)
            if not running:
                return

    def score_batch(self, tokens: list[list[str]], max_input_length: int) -> list[Scored]:
        return [Scored([-1.0 * (i + 1) for i in range(len(row) - 1)]) for row in tokens]

    def unload_model(self) -> None:
        self.unloaded = True


class Engine:
    """core.serve on a thread, its commands and events pipes, and its stop flags."""

    def __init__(self) -> None:
        self.generator = FakeGenerator()
        commands_read, self.commands = os.pipe()
        self.events, events_write = os.pipe()
        self.shared = mmap.mmap(-1, SLOTS)
        self.flags = memoryview(self.shared)

        def loader(options: wire.CoreOptions) -> tuple[Any, wire.Loaded, list[str]]:
            return self.generator, wire.Loaded("cpu", "float32", 1, 1, None), [f"p{i}" for i in range(100)]

        self.thread = threading.Thread(target=core.serve, args=(commands_read, events_write, self.flags, loader))
        self.thread.start()
        self._fds = (commands_read, events_write)

    def send(self, command: wire.Command) -> None:
        wire.send(self.commands, command)

    def events_until(self, done: Any, timeout: float = 10.0) -> list[wire.Event]:
        """Events read until `done(events so far)` holds; fails after `timeout` seconds without a message."""
        seen: list[wire.Event] = []
        stream = self._stream(timeout)
        while not done(seen):
            seen.append(next(stream))
        return seen

    def _stream(self, timeout: float) -> Iterator[wire.Event]:
        while True:
            ready, _, _ = select.select([self.events], [], [], timeout)
            assert ready, f"no message from the engine within {timeout} s"
            message = wire.receive(self.events)
            assert isinstance(message, wire.Ready | wire.LoadFailed | wire.Progress)
            yield message

    def close(self) -> None:
        if self.thread.is_alive():
            self.send(wire.Stop())
            self.thread.join(10)
        for fd in (self.commands, self.events, *self._fds):
            os.close(fd)
        self.flags.release()
        self.shared.close()


@pytest.fixture
def engine() -> Iterator[Engine]:
    running = Engine()
    try:
        yield running
    finally:
        running.close()


def ready(engine: Engine) -> wire.Ready:
    engine.send(wire.Load(wire.PROTOCOL, OPTIONS))
    [reply] = engine.events_until(lambda seen: len(seen) == 1)
    assert isinstance(reply, wire.Ready)
    return reply


def ended(number: int) -> Any:
    return lambda seen: any(e[0] == number for m in seen if isinstance(m, wire.Progress) for e in m.ended)


def tokens_by_slot(events: list[wire.Event]) -> dict[int, list[tuple[int, float | None]]]:
    out: dict[int, list[tuple[int, float | None]]] = {}
    for message in events:
        assert isinstance(message, wire.Progress)
        for slot, token, log_prob, _at in message.tokens:
            out.setdefault(slot, []).append((token, log_prob))
    return out


def test_the_handshake_reports_the_model_and_the_engines_protocol(engine: Engine) -> None:
    reply = ready(engine)
    assert reply.protocol == wire.PROTOCOL and reply.loaded.replicas == 1 and reply.loaded.device == "cpu"


def test_a_server_of_another_protocol_is_refused_in_one_line() -> None:
    engine = Engine()
    try:
        engine.send(wire.Load(wire.PROTOCOL + 1, OPTIONS))
        [reply] = engine.events_until(lambda seen: len(seen) == 1)
        assert isinstance(reply, wire.LoadFailed) and reply.error == "ProtocolMismatch"
        assert f"protocol {wire.PROTOCOL + 1}" in reply.message and f"speaks {wire.PROTOCOL}" in reply.message
        engine.thread.join(10)
        assert not engine.thread.is_alive()  # it returns: nothing was loaded
    finally:
        engine.close()


def test_a_batch_gives_each_row_exactly_its_budget_in_its_slot_then_its_end(engine: Engine) -> None:
    ready(engine)
    engine.send(wire.RunBatch(7, [[1, 2], [4, 5, 6]], [3, 5], [2, 4], 10, {"return_scores": True}))
    events = engine.events_until(ended(7))
    by_slot = tokens_by_slot(events)
    assert by_slot == {3: [(2, -0.5), (3, -0.5)], 5: [(3, -0.5), (4, -0.5), (5, -0.5), (6, -0.5)]}
    ends = [e for m in events if isinstance(m, wire.Progress) for e in m.ended]
    assert ends == [(7, None, None)]


def test_a_row_whose_stop_flag_is_set_ends_at_its_next_token(engine: Engine) -> None:
    ready(engine)
    engine.flags[2] = 1  # set by the server before the token comes (a stop string, a cancel, a deadline)
    engine.send(wire.RunBatch(1, [[1], [1]], [2, 6], [5, 5], 10, {}))
    by_slot = tokens_by_slot(engine.events_until(ended(1)))
    assert len(by_slot[2]) == 1 and len(by_slot[6]) == 5
    assert by_slot[6][0] == (1, None)  # no log-probability unless asked for


def test_a_failing_batch_reports_its_traceback_and_the_engine_goes_on(engine: Engine) -> None:
    ready(engine)
    engine.send(wire.RunBatch(1, [[1]], [0], [2], 10, {"fail": True}))
    events = engine.events_until(ended(1))
    [(number, error, rows)] = [e for m in events if isinstance(m, wire.Progress) for e in m.ended]
    assert number == 1 and error is not None and "the device failed the batch" in error and rows is None
    engine.send(wire.RunBatch(2, [[1]], [0], [1], 10, {}))
    assert tokens_by_slot(engine.events_until(ended(2))) == {0: [(1, None)]}


def test_a_scoring_job_returns_its_rows_with_its_end(engine: Engine) -> None:
    ready(engine)
    engine.send(wire.ScoreJob(4, 1, [[1, 2, 3], [5, 6]], False))
    events = engine.events_until(ended(4))
    [(number, error, rows)] = [e for m in events if isinstance(m, wire.Progress) for e in m.ended]
    assert (number, error) == (4, None)
    assert rows == [([-1.0, -2.0], [], []), ([-1.0], [], [])]


def test_stop_finishes_and_unloads(engine: Engine) -> None:
    ready(engine)
    engine.send(wire.Stop())
    engine.thread.join(10)
    assert not engine.thread.is_alive() and engine.generator.unloaded


def test_messages_split_across_reads_are_reassembled_whole() -> None:
    """The reader takes whatever a read holds: frames cut anywhere come out whole and in order."""
    read, write = os.pipe()
    sent = [wire.Progress([(i, i, None, 0.0)] * i, [], i) for i in range(20)]
    data = b"".join(wire.frame(m) for m in sent)
    received: list[wire.Command | wire.Event] = []

    def reader() -> None:
        for messages in wire.messages(read):
            received.extend(messages)

    thread = threading.Thread(target=reader)
    thread.start()
    for cut in range(0, len(data), 7):  # 7 bytes at a time: every frame arrives in pieces
        os.write(write, data[cut : cut + 7])
    os.close(write)
    thread.join(10)
    os.close(read)
    assert received == sent
