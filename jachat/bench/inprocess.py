"""The decode loop alone (jachat-bench loop): engine.loop.Loop on the native decoder in this process, with no server,
no pipe and no client beside it, as raw CTranslate2 runs in `run_ct2`. N closed-loop clients each submit a call and
submit the next when it ends; a call's times are its first token's and its end's, from its submission. Beside the
service's figures it says what the loop itself does and what the server and the client cost on the same cores."""

from __future__ import annotations

import mmap
import threading
import time
from pathlib import Path
from typing import Any

from jachat.bench.workload import Progress, Record, Report, Workload
from jachat.manifest import TOKENIZER_FILE, read_manifest
from jachat.service.engine.wire import RunBatch
from jachat.service.text.tokenizer import Tokenizer


class _Outbox:
    """The outbox as the loop uses it (core.Outbox's attributes), keeping each slot's first token time and each
    job's end."""

    def __init__(self) -> None:
        self.tokens: list[tuple[int, int, float | None, float]] = []
        self.asleep = [False]
        self.running = 0
        self.pieces = 0
        self.ended: dict[int, threading.Event] = {}
        self.errors: dict[int, str] = {}

    def start(self) -> None:
        self.running += 1

    def woken(self) -> None:
        pass

    def end(self, number: int, error: str | None, result: Any = None) -> None:
        if error is not None:
            self.errors[number] = error
        self.running -= 1
        self.ended[number].set()


def run_loop_alone(model: Path, workload: Workload, n: int, requests: int, threads: int) -> Report:
    """`requests` calls by `n` clients through the loop on this thread (the engine process runs it on its main
    thread too: CTranslate2's OpenMP threads are faster from there)."""
    from jachat.service.engine import native
    from jachat.service.engine.loop import Loop

    decoder = native.module().Decoder(str(model), "cpu", read_manifest(model).quantization, 0, threads)
    tokenizer = Tokenizer(model / TOKENIZER_FILE)
    warm = tokenizer.encode(workload.prompt(0))
    decoder.join(0, warm)  # the first call's allocations, not counted (run_load's warm-up call)
    decoder.step_array([warm[-1]])
    decoder.reset()
    outbox = _Outbox()
    flags = memoryview(mmap.mmap(-1, n))
    loop = Loop(decoder, tokenizer.eos_id, outbox, flags, n, decoder.vocab_size, 10**9, 64)  # type: ignore[arg-type]
    records: list[Record] = []
    numbers = iter(range(1, 10**9))
    lock = threading.Lock()
    label = f"loop alone, {n} rows (no server)"
    progress = Progress(label, requests, None)

    def client(slot: int, calls: int) -> None:
        for i in range(calls):
            with lock:
                number = next(numbers)
                outbox.ended[number] = done = threading.Event()
            ids = tokenizer.encode(workload.prompt(slot + i * n))
            options = workload.options(slot + i * n)
            kwargs = options.ctranslate2_kwargs()
            command = RunBatch(number, [ids], [slot], [workload.tokens], len(ids) + workload.tokens, kwargs)
            with lock:  # one thread submits in the engine (its command reader): the loop's row ids assume it
                sent = time.monotonic()  # the loop stamps tokens with time.monotonic
                seen = len(outbox.tokens)
                loop.submit(command)
            done.wait()
            if number in outbox.errors:
                raise RuntimeError(outbox.errors[number])
            ended = time.monotonic()
            mine = [t for s, _, _, t in outbox.tokens[seen:] if s == slot]
            with lock:
                records.append(Record(mine[0] - sent, ended - sent, len(mine)))
                progress.advance()

    clients = [threading.Thread(target=client, args=(slot, requests // n)) for slot in range(n)]
    started = time.perf_counter()
    for thread in clients:
        thread.start()

    def close() -> None:
        for thread in clients:
            thread.join()
        loop.close()

    closer = threading.Thread(target=close)
    closer.start()
    loop.run()
    seconds = time.perf_counter() - started
    closer.join()
    progress.close()
    return Report.of(label, n, records, seconds)
