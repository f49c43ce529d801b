"""The decode loop (engine/loop.py) on a fake decoder: rows join the running batch between steps, each ends at its
budget, `</s>` or its stop flag, a job ends after its last row's tokens, the row limit, the KV-cache budget and the
prefill budget hold, and a decoder failure fails the jobs it held without stopping the loop."""

from __future__ import annotations

import itertools
import mmap
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from jachat.service.engine.loop import Loop
from jachat.service.engine.wire import RunBatch
from tests.helpers import wait_until

VOCAB = 32
EOS = 3
GREEDY = {"sampling_topk": 1}


class FakeDecoder:
    """The native decoder's contract as the loop uses it: each row's next token is its last token + 1, and 4 after
    the vocabulary's last (so only a row at 0, 1 or 2 reaches EOS). It records what it was asked, in order; `fail`
    makes its next step raise. It keeps each row's cache length as the native decoder does (a join holds the prompt
    but its last token, a step adds one), and the most positions its dense cache held (rows x the longest)."""

    def __init__(self) -> None:
        self.rows: list[int] = []
        self.lengths: dict[int, int] = {}
        self.pending: dict[int, int] = {}  # rows prefilled in chunks, outside the batch
        self.chunks = threading.Semaphore(10**6)  # a test that takes them all holds extend
        self.peak = 0
        self.calls: list[tuple[str, Any]] = []
        self.fail = False

    def _held(self) -> None:
        if self.rows:
            self.peak = max(self.peak, len(self.rows) * max(self.lengths[r] for r in self.rows))

    def _logits(self, last: int) -> np.ndarray:
        values = np.zeros(VOCAB, dtype=np.float32)
        values[last + 1 if last + 1 < VOCAB else 4] = 1.0
        return values

    def join(self, row: int, prompt: list[int]) -> None:
        if prompt[0] == 0:
            raise ValueError("this prompt cannot join")
        assert row not in self.rows
        self.rows.append(row)
        self.lengths[row] = len(prompt) - 1
        self.pending.pop(row, None)
        self._held()
        self.calls.append(("join", len(prompt)))

    def extend(self, row: int, ids: list[int]) -> None:
        self.chunks.acquire()
        assert row not in self.rows
        self.pending[row] = self.pending.get(row, 0) + len(ids)
        self.calls.append(("extend", len(ids)))

    def step_array(self, tokens: list[int]) -> np.ndarray:
        assert len(tokens) == len(self.rows)
        self.calls.append(("step", len(tokens)))
        if self.fail:
            self.fail = False
            raise RuntimeError("the device failed the step")
        for row in self.rows:
            self.lengths[row] += 1
        self._held()
        return np.stack([self._logits(t) for t in tokens])

    def reset(self) -> None:
        self.rows = []
        self.calls.append(("reset", 0))

    def drop(self, rows: list[int]) -> None:
        self.rows = [r for r in self.rows if r not in rows]
        for row in rows:
            self.pending.pop(row, None)
        self.calls.append(("drop", len(rows)))


class FakeOutbox:
    def __init__(self) -> None:
        self.tokens: list[tuple[int, int, float | None, float]] = []
        self.ended: dict[int, str | None] = {}
        self.tokens_at_end: dict[int, int] = {}
        self.asleep = [False]
        self.running = 0
        self.cache_used = 0

    def woken(self) -> None:
        pass

    def start(self) -> None:
        self.running += 1

    def end(self, number: int, error: str | None) -> None:
        self.tokens_at_end[number] = len(self.tokens)
        self.ended[number] = error
        self.running -= 1

    def of(self, slot: int) -> list[int]:
        return [token for s, token, _, _ in self.tokens if s == slot]


class Running:
    def __init__(self, max_rows: int = 16, cache_budget: int = 10**9, prefill_budget: int = 512) -> None:
        self.decoder, self.outbox = FakeDecoder(), FakeOutbox()
        self.shared = mmap.mmap(-1, 64)
        self.flags = memoryview(self.shared)
        self.loop = Loop(
            self.decoder,
            EOS,
            self.outbox,  # type: ignore[arg-type]
            self.flags,
            max_rows,
            VOCAB,
            cache_budget,
            prefill_budget,
        )
        self.thread = threading.Thread(target=self.loop.run)
        self.thread.start()
        self.number = 0

    def submit(self, prompts: list[list[int]], slots: list[int], limits: list[int]) -> int:
        self.number += 1
        self.loop.submit(RunBatch(self.number, prompts, slots, limits, max(limits), GREEDY))
        return self.number

    def stop(self) -> None:
        """No more jobs: the loop's thread returns once its rows have ended."""
        self.loop.close()
        self.thread.join(timeout=10)

    def wait_ended(self, *numbers: int) -> None:
        wait_until(lambda: all(n in self.outbox.ended for n in numbers), f"jobs {numbers} ended")


@pytest.fixture
def running() -> Iterator[Running]:
    r = Running()
    yield r
    r.stop()
    assert not r.thread.is_alive()


def test_rows_get_exact_budgets_and_a_job_ends_after_its_last_rows_tokens(running: Running) -> None:
    job = running.submit([[10], [20, 21]], [0, 1], [4, 2])
    running.wait_ended(job)
    assert running.outbox.of(0) == [11, 12, 13, 14] and running.outbox.of(1) == [22, 23]
    assert running.outbox.ended[job] is None and running.outbox.tokens_at_end[job] == 6
    assert running.decoder.rows == [] and running.outbox.running == 0


def test_a_row_ends_at_eos_with_eos_recorded_and_its_batch_mates_go_on(running: Running) -> None:
    job = running.submit([[2, 0], [10]], [0, 1], [8, 5])
    running.wait_ended(job)
    assert running.outbox.of(0) == [1, 2, 3]  # EOS ends the row; the server strips it
    assert running.outbox.of(1) == [11, 12, 13, 14, 15]


def test_a_job_that_arrives_mid_reply_joins_the_running_batch_at_the_next_step(running: Running) -> None:
    first = running.submit([[4]], [0], [100_000])
    wait_until(lambda: len(running.outbox.of(0)) >= 3, "the first reply under way")
    second = running.submit([[10]], [1], [3])
    running.wait_ended(second)
    assert first not in running.outbox.ended  # it joined a reply that runs on
    running.flags[0] = 1
    running.wait_ended(first)
    calls = running.decoder.calls
    joined = calls.index(("join", 1), 1)
    assert calls[joined + 1] == ("step", 2)  # both rows stepped together from the next step
    assert running.outbox.of(1) == [11, 12, 13]
    reply = running.outbox.of(0)
    assert reply[:4] == [5, 6, 7, 8] and all(b == (a + 1 if a + 1 < VOCAB else 4) for a, b in itertools.pairwise(reply))


def test_a_stop_flag_ends_a_running_row_before_its_next_step_and_a_waiting_one_with_no_token() -> None:
    r = Running(max_rows=1)
    try:
        first = r.submit([[4]], [0], [10_000])
        second = r.submit([[10]], [1], [5])
        wait_until(lambda: len(r.outbox.of(0)) >= 2, "the first reply under way")
        r.flags[1] = 1  # the waiting call is cancelled
        r.flags[0] = 1
        r.wait_ended(first, second)
        assert r.outbox.of(1) == [] and len(r.outbox.of(0)) < 10_000
    finally:
        r.stop()


def test_the_row_limit_holds_and_a_freed_place_admits_the_next_waiting_row() -> None:
    r = Running(max_rows=2)
    try:
        job = r.submit([[10 * i + 4] for i in range(3)], [0, 1, 2], [3, 4, 5])  # queued at once: no race
        r.wait_ended(job)
        assert max(n for op, n in r.decoder.calls if op == "step") == 2
        assert [op for op, _ in r.decoder.calls].count("join") == 3
    finally:
        r.stop()


def test_the_kv_cache_budget_holds_and_rows_that_do_not_fit_wait_their_turn() -> None:
    r = Running(cache_budget=100)  # a row of 40 + 20 positions: one fits, two (2 x 60) do not
    try:
        jobs = [r.submit([[4] * 40], [i], [20]) for i in range(3)]
        short = r.submit([[5] * 10, [6] * 10], [3, 4], [10, 10])  # 3 x 60 > 100: they wait for the long rows
        r.wait_ended(*jobs, short)
        assert all(r.outbox.ended[job] is None for job in (*jobs, short))
        assert [len(r.outbox.of(i)) for i in range(5)] == [20, 20, 20, 10, 10]
        assert 0 < r.decoder.peak <= 100
        assert max(n for op, n in r.decoder.calls if op == "step") == 2  # the two short rows: 2 x 20 fit
        assert r.outbox.cache_used == 0  # what the loop reports held: nothing, once every row has left
    finally:
        r.stop()


def test_a_row_waiting_for_the_cache_ends_at_once_when_it_is_stopped() -> None:
    r = Running(cache_budget=100_000)
    try:
        first = r.submit([[4] * 40], [0], [100_000 - 40])  # its longest is the whole budget: nothing fits beside it
        wait_until(lambda: len(r.outbox.of(0)) >= 2, "the first reply under way")
        assert r.outbox.cache_used == 100_000  # one row that may reach the whole budget
        waiting = r.submit([[10] * 10], [1], [5])
        r.flags[1] = 1
        r.wait_ended(waiting)
        assert first not in r.outbox.ended and r.outbox.of(1) == []
        r.flags[0] = 1
        r.wait_ended(first)
    finally:
        r.stop()


def test_a_row_over_the_whole_budget_fails_alone_instead_of_waiting_forever() -> None:
    r = Running(cache_budget=50)
    try:
        big = r.submit([[4] * 40], [0], [20])
        r.wait_ended(big)
        assert "exceeds the KV-cache budget" in (r.outbox.ended[big] or "")
        small = r.submit([[4] * 20], [1], [5])
        r.wait_ended(small)
        assert r.outbox.ended[small] is None and len(r.outbox.of(1)) == 5
    finally:
        r.stop()


def test_the_prefill_budget_spreads_long_prompts_over_steps(running: Running) -> None:
    first = running.submit([[4]], [0], [100_000])
    wait_until(lambda: len(running.outbox.of(0)) >= 2, "the first reply under way")
    long_prompt = [5] * 400
    both = running.submit([long_prompt, long_prompt], [1, 2], [2, 2])  # waiting together
    running.wait_ended(both)
    running.flags[0] = 1
    running.wait_ended(first)
    calls = running.decoder.calls
    adds = [i for i, call in enumerate(calls) if call == ("join", 400)]
    assert len(adds) == 2 and any(op == "step" for op, _ in calls[adds[0] : adds[1]])  # 800 > 512: a step between


@pytest.fixture
def chunked() -> Iterator[Running]:
    r = Running(prefill_budget=64)  # chunks of CHUNK_TOKENS (256)
    yield r
    r.decoder.chunks.release(10**6)
    r.stop()
    assert not r.thread.is_alive()


def test_a_long_prompt_is_prefilled_a_chunk_per_step_while_the_running_rows_go_on(chunked: Running) -> None:
    running = chunked
    first = running.submit([[4]], [0], [100_000])
    wait_until(lambda: len(running.outbox.of(0)) >= 2, "the first reply under way")
    long = running.submit([[5] * 1000], [1], [2])  # 999 to prefill: 256, 256, 256, then a join of the last 231
    running.wait_ended(long)
    assert running.outbox.ended[long] is None and running.outbox.of(1) == [6, 7]
    running.flags[0] = 1
    running.wait_ended(first)
    calls = [call for call in running.decoder.calls if call[0] != "drop"]
    start = calls.index(("extend", 256))
    assert calls[start : start + 8] == [
        ("extend", 256), ("step", 1), ("extend", 256), ("step", 1), ("extend", 256), ("step", 1), ("join", 1000),
        ("step", 2),
    ]  # fmt: skip


def test_a_long_prompt_stopped_midway_ends_with_no_token_and_leaves_nothing_in_the_decoder(chunked: Running) -> None:
    running = chunked
    first = running.submit([[4]], [0], [100_000])
    wait_until(lambda: len(running.outbox.of(0)) >= 2, "the first reply under way")
    for _ in range(10**6 - 2):  # two chunks, then extend waits
        running.decoder.chunks.acquire()
    long = running.submit([[5] * 5000], [1], [2])
    wait_until(lambda: running.decoder.pending.get(2, 0) == 512, "two chunks of the long prompt")
    running.flags[1] = 1
    running.decoder.chunks.release(10**6)
    running.wait_ended(long)
    assert running.outbox.of(1) == [] and 2 not in running.decoder.pending and 2 not in running.decoder.rows
    running.flags[0] = 1
    running.wait_ended(first)


def test_a_decoder_failure_fails_the_jobs_it_held_and_the_loop_serves_on(running: Running) -> None:
    first = running.submit([[4], [8]], [0, 1], [100_000, 100_000])
    wait_until(lambda: len(running.outbox.of(0)) >= 2, "the reply under way")
    running.decoder.fail = True
    running.wait_ended(first)
    assert "the device failed the step" in (running.outbox.ended[first] or "")
    assert running.decoder.rows == []
    again = running.submit([[10]], [2], [2])
    running.wait_ended(again)
    assert running.outbox.ended[again] is None and running.outbox.of(2) == [11, 12]


def test_options_it_cannot_take_fail_their_job_and_nothing_else(running: Running) -> None:
    running.number += 1
    bad = RunBatch(running.number, [[4]], [0], [2], 2, {"sampling_topk": "many"})
    running.loop.submit(bad)
    assert "many" in (running.outbox.ended[bad.number] or "")
    good = running.submit([[10]], [1], [1])
    running.wait_ended(good)
    assert running.outbox.of(1) == [11]


def test_a_row_that_cannot_join_fails_its_job_alone_and_the_batch_runs_on(running: Running) -> None:
    first = running.submit([[4]], [0], [100_000])
    wait_until(lambda: len(running.outbox.of(0)) >= 2, "the first reply under way")
    bad = running.submit([[0, 5]], [1], [3])
    running.wait_ended(bad)
    assert "this prompt cannot join" in (running.outbox.ended[bad] or "") and running.outbox.of(1) == []
    assert first not in running.outbox.ended
    running.flags[0] = 1
    running.wait_ended(first)
    assert running.outbox.ended[first] is None and running.outbox.running == 0


def test_other_work_shares_the_decoder_with_the_running_rows_a_piece_at_a_time(running: Running) -> None:
    """A scoring job's pieces go between steps, each followed by steps for as long as it took: the job is not held
    until the rows end, and the rows are not held for the whole job."""
    first = running.submit([[4]], [0], [100_000])
    wait_until(lambda: len(running.outbox.of(0)) >= 2, "the first reply under way")
    done = threading.Event()

    def work() -> Iterator[None]:
        for i in range(3):
            running.decoder.calls.append(("piece", i))
            time.sleep(0.005)  # the piece's compute: the rows are owed as long
            yield
        done.set()

    running.loop.submit_work(work())
    assert done.wait(10), "the work waited for the running row"
    assert first not in running.outbox.ended
    calls = running.decoder.calls
    pieces = [i for i, call in enumerate(calls) if call[0] == "piece"]
    assert len(pieces) == 3 and all(any(op == "step" for op, _ in calls[a:b]) for a, b in itertools.pairwise(pieces))
    running.flags[0] = 1
    running.wait_ended(first)


def test_other_work_runs_back_to_back_when_no_row_runs(running: Running) -> None:
    order: list[int] = []
    done = threading.Event()

    def work() -> Iterator[None]:
        for i in range(3):
            order.append(i)
            yield
        done.set()

    running.loop.submit_work(work())
    assert done.wait(10) and order == [0, 1, 2]
    assert not any(op == "step" for op, _ in running.decoder.calls)
