"""The engine process: CTranslate2 and the least Python a token needs, in a process of its own.

CTranslate2 calls back into Python for every token of every row, on its decode thread, and a callback must take the
GIL. In the server's process that GIL is also the event loop's, so a busy edge (gRPC, HTTP, metrics) made the decode
thread wait, and on a GPU the accelerator idled (measured on a model whose steps take a millisecond, `jachat-bench
gil`, docs/benchmarks/2026-11-30-gil.json: with a trivial callback, one busy Python thread in the same process cut
CTranslate2 from 9,976 to 979 tokens/s; with CTranslate2 in a child process it ran at 10,728 alone and 10,161 beside
the busy thread). So the server spawns this module
(`python -m jachat.service.engine.core`), and here the GIL belongs to the decode threads.

Per token a decode thread only records (row's slot, token id, log-probability, time), counts the row's budget
(max_new_tokens is exact) and reads the row's stop flag, a byte in memory shared with the server: a stop string, a
cancel, a deadline or the drain ends the row at its next token, with no round trip. One sender thread hands the
recorded tokens to the server in batches: every SEND_PERIOD while tokens keep coming, whatever accumulated since
(never one message per token per row). It polls rather than being woken while tokens come: waking it from the
callback costs the decode thread a futex call and a GIL hand-off per wake, measured at 10% of a millisecond step.
Each of its looks costs the decode thread a GIL hand-off too, so it looks every 2 ms, not more often (measured on
1 ms steps of 16 rows: 10,700 tokens/s looking every 0.5 ms, 11,200 every 1 ms, 11,700 every 2 ms, which is
CTranslate2's own speed with a trivial callback); a token so waits at most 2 ms for the hand-off. When steps are
slower (a CPU: tens of milliseconds), it stops looking after IDLE_POLLS empty looks and sleeps until the next token
wakes it (one wake per step, nothing next to such a step). Decoding, reply assembly, stop strings, deadlines,
cancellation, metrics: all of that is the server's (engine/link.py, engine/sequence.py).

That is static batching, CTranslate2's generate_batch (`--decode-loop static`, and the fallback). With the decode
loop (the default where the native decoder is built and passes its self-test), this process holds the native
decoder instead, and its main thread runs the loop (loop.py), which records each token in the same outbox and runs
scoring jobs between steps; its commands are read on a thread of their own.

The process ends when the server says so, or when the server is gone (its command pipe closes); it ignores SIGINT
and SIGTERM, which a terminal or systemd sends to every process of the service while the server drains.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import mmap
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from jachat.service.engine import cache, gpu, wire
from jachat.service.engine.warmup import shapes, warm_up
from jachat.service.engine.wire import CoreOptions, Ended, Loaded, RunBatch, ScoredRow, ScoreJob, Token

log = logging.getLogger("jachat.engine")

SEND_PERIOD = 0.002  # seconds between the sender's looks at the decode threads' tokens while tokens come
IDLE_POLLS = 2  # empty looks in a row after which the sender sleeps until a token wakes it (steps over 4 ms)
# the longest the sender stays silent: an empty message then tells the server the engine lives (link.py reads a
# silence as a stalled engine: a hung device call, a stopped or page-thrashing process)
HEARTBEAT = 0.5
SCORE_PIECE_TOKENS = 2048  # positions scored by one CTranslate2 call (its rows x its longest row; scoring.py)

# What to run when the device cannot run a compute type (first supported entry wins).
_FALLBACKS = {
    "int8_float16": ("int8_bfloat16", "int8_float32", "int8", "float32"),
    "int8_bfloat16": ("int8_float16", "int8_float32", "int8", "float32"),
    "int8_float32": ("int8", "float32"),
    "int8": ("int8_float32", "float32"),
    "float16": ("bfloat16", "float32"),
    "bfloat16": ("float16", "float32"),
    "int16": ("int8", "float32"),
    "float32": (),
}


def resolve_device(device: str) -> str:
    import ctranslate2

    if device == "auto":
        return "cuda" if ctranslate2.get_cuda_device_count() > 0 else "cpu"
    if device not in ("cpu", "cuda"):
        raise ValueError(f"unknown device {device!r}; choose one of: auto, cpu, cuda")
    return device


def cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def resolve_threads(device: str, replicas: int, intra_threads: int) -> tuple[int, int]:
    """(replicas, intra_threads), 0 meaning auto. On CPU the cores are shared out: a single sequence's decoding is
    bound by memory, not compute (one thread decodes as fast as two here), so several one-thread replicas serve
    concurrent batches better than one wide one. On GPU one replica; intra_threads only matters for the CPU."""
    if device != "cpu":
        return replicas or 1, intra_threads
    cores = cpu_cores()
    replicas = replicas or min(4, cores)
    return replicas, intra_threads or max(1, cores // replicas)


def resolve_compute_type(requested: str, quantization: str, device: str) -> str:
    """The compute type to run: the requested one (default: the converted one), or a fallback the device has."""
    import ctranslate2

    wanted = quantization if requested == "default" else requested
    if wanted == "auto":
        return "auto"
    supported = ctranslate2.get_supported_compute_types(device)
    if wanted in supported:
        return wanted
    if wanted not in _FALLBACKS:
        raise ValueError(f"unknown compute type {wanted!r}; choose one of: default, auto, {', '.join(_FALLBACKS)}")
    for fallback in _FALLBACKS[wanted]:
        if fallback in supported:
            log.warning("compute type %s is not supported on %s; falling back to %s", wanted, device, fallback)
            return fallback
    raise ValueError(f"no compute type close to {wanted} runs on {device} (supported: {sorted(supported)})")


def load(options: CoreOptions) -> tuple[Any, Loaded, list[str]]:
    """The model (GPU checked first, its errors as one line each), warm: the native decoder for the decode loop
    when asked for and it passes its self-test, else CTranslate2's generator; its report; the vocabulary."""
    import ctranslate2

    device = resolve_device(options.device)
    if device == "cuda":  # the driver checked and cuBLAS 12 found before CTranslate2 needs them (gpu.py)
        log.info("cuBLAS 12 from %s", gpu.prepare(options.device_index, ctranslate2.get_cuda_device_count()))
    compute_type = resolve_compute_type(options.compute_type, options.quantization, device)
    replicas, intra_threads = resolve_threads(device, options.replicas, options.intra_threads)
    spare = options.spare_replicas  # the spares' threads come on top of the cores' share
    model_dir = Path(options.model_dir)
    weights = (model_dir / "model.bin").stat().st_size
    explained = gpu.explain(options.device_index, weights) if device == "cuda" else contextlib.nullcontext()
    vocabulary: list[str] = json.loads((model_dir / "vocabulary.json").read_text(encoding="utf-8"))
    with explained:
        if options.decode_loop != "static":
            loop = _load_native(options, vocabulary, device, compute_type)
            if loop is not None:
                return loop[0], loop[1], vocabulary
        generator = ctranslate2.Generator(
            str(model_dir),
            device=device,
            device_index=options.device_index,
            compute_type=compute_type,
            inter_threads=replicas + spare,
            intra_threads=intra_threads,
        )
        warm = None
        if options.warm_up:
            plan = shapes(device, options.max_batch_size, options.context_length)
            warm = warm_up(generator, vocabulary, options.eos_id, replicas + spare, plan)
    return (
        generator,
        Loaded(device, generator.compute_type, replicas, intra_threads, warm, spare_replicas=spare),
        vocabulary,
    )


def _on_host(value: Any) -> Any:
    """A StorageView on the CPU (numpy reads it there)."""
    import ctranslate2

    return value if value.device == "cpu" else value.to_device(ctranslate2.Device.cpu)


def _load_native(
    options: CoreOptions, vocabulary: list[str], device: str, compute_type: str
) -> tuple[Any, Loaded] | None:
    """The native decoder and its report, once stock CTranslate2 on the same weights agrees with it (native.py); or
    None, said in one line, where it is not built or disagrees (`decode_loop` native makes that an error). Stock's
    weights are freed before the decoder loads its own: one copy in memory at a time."""
    import ctranslate2

    from jachat.service.engine import native

    threads = options.intra_threads or (cpu_cores() if device == "cpu" else 1)  # one decode thread takes every core
    model_dir = str(options.model_dir)
    try:
        stock = ctranslate2.Generator(
            model_dir,
            device=device,
            device_index=options.device_index,
            compute_type=compute_type,
            intra_threads=threads,
        )
        expected = native.expect(stock, vocabulary, _on_host)
        del stock
        decoder, line = native.start(model_dir, device, options.device_index, compute_type, threads, expected)
    except Exception as exc:  # stock CTranslate2 could not give the expectation: no check, no decoder
        decoder, line = None, f"no self-test ({type(exc).__name__}: {exc})"
    if decoder is not None and decoder.vocab_size != len(vocabulary):
        line = f"{decoder.vocab_size} logits for a vocabulary of {len(vocabulary)}"
        decoder = None
    if decoder is None:
        if options.decode_loop == "native":
            raise RuntimeError(f"the native decoder (--decode-loop native): {line}")
        log.warning("native decoder: %s; serving with static batches", line)
        return None
    log.info("native decoder: %s; calls join one running batch", line)
    per_position = cache.bytes_per_position(decoder)
    free = cache.free_bytes(device, options.device_index)  # the weights are loaded: what is left
    positions = cache.budget(
        options.kv_cache_tokens, options.max_batch_size, options.context_length, free, per_position
    )
    loaded = Loaded(device, decoder.compute_type, options.max_batch_size, threads, None, loop=True)
    return decoder, dataclasses.replace(loaded, kv_cache_tokens=positions, kv_bytes_per_token=per_position)


class Outbox:
    """What the decode threads hand to the server, sent by one thread: everything recorded since its last send.

    The lists are never rebound, only cut from the front, so a decode thread's callback appends to the same list
    object for its whole batch (no attribute lookup per token). Finished batches are taken before tokens: a batch's
    end is recorded after its last token, so whenever the server reads an end, it has read that batch's tokens.
    With no batch running, or no token for IDLE_POLLS looks, the sender sleeps until a batch, its end or a token
    wakes it (`asleep` tells the decode threads to), or for HEARTBEAT at most: a message every HEARTBEAT, empty if
    need be, is the engine's sign of life (two wake-ups a second when idle).

    Each message is a wire.Progress."""

    def __init__(self, events: int) -> None:
        self.events = events  # the events pipe's file descriptor
        self.tokens: list[Token] = []
        self.ended: list[Ended] = []
        self.running = 0  # jobs running (changed under the GIL by the decode threads)
        self.pieces = 0  # scoring pieces done since the last send
        self.cache_used = 0  # the decode loop's KV-cache positions held (loop.Loop sets it; wire.Progress)
        self.wake = threading.Event()  # a batch started or ended, or a token came while the sender slept
        self.asleep = [False]  # a list, so that the callbacks read it without an attribute lookup
        self.closing = False  # set once no batch will start: send what is left, then return

    def run(self) -> None:
        tokens, ended, wake, asleep, events = self.tokens, self.ended, self.wake, self.asleep, self.events
        idle, sent = 0, time.monotonic()
        while True:
            if self.running and idle < IDLE_POLLS:
                time.sleep(SEND_PERIOD)
            else:
                wake.clear()
                asleep[0] = True  # from here on a token wakes us: none can be missed
                if not (tokens or ended or self.closing):  # each is set before the wake that tells of it
                    wake.wait(max(0.0, sent + HEARTBEAT - time.monotonic()))
                asleep[0] = False
            idle = 0 if tokens or ended else idle + 1
            if tokens or ended or self.pieces or time.monotonic() - sent >= HEARTBEAT:
                done = ended[: len(ended)]
                del ended[: len(done)]
                batch = tokens[: len(tokens)]
                del tokens[: len(batch)]
                pieces, self.pieces = self.pieces, 0
                try:
                    wire.send(events, wire.Progress(batch, done, pieces, self.cache_used))
                except OSError:  # the server is gone: the main thread ends the process
                    return
                sent = time.monotonic()
            elif self.closing and not self.running:
                return

    def close(self) -> None:
        """No batch will start: the sender sends the last ends and returns."""
        self.closing = True
        self.wake.set()

    def start(self) -> None:
        self.running += 1
        self.wake.set()

    def woken(self) -> None:
        """A decode thread recorded a token while the sender slept (at most once per sleep)."""
        self.asleep[0] = False
        self.wake.set()

    def end(self, number: int, error: str | None, rows: list[ScoredRow] | None = None) -> None:
        self.ended.append((number, error, rows))
        self.running -= 1
        self.wake.set()


def run_batch(
    generator: Any,
    vocabulary: Sequence[str],
    eos_id: int,
    outbox: Outbox,
    flags: memoryview,
    command: RunBatch,
) -> None:
    """One generate_batch call on a free replica (a thread of the pool), its end reported after its tokens."""
    left: list[int] = list(command.limits)
    row_slots: list[int] = command.slots
    tokens, asleep, woken, now = outbox.tokens, outbox.asleep, outbox.woken, time.monotonic

    def callback(step: Any) -> bool:
        # the whole per-token path on the decode thread: record, count, read the flag
        row = step.batch_id
        slot = row_slots[row]
        tokens.append((slot, step.token_id, step.log_prob, now()))
        if asleep[0]:  # steps slower than the sender's polling: wake it, once per step
            woken()
        left[row] -= 1
        return left[row] <= 0 or bool(flags[slot])

    error = None
    outbox.start()
    try:
        generator.generate_batch(
            [[vocabulary[i] for i in ids] for ids in command.prompts],
            max_length=command.max_length,
            include_prompt_in_result=False,
            end_token=[eos_id],
            callback=callback,
            **command.options,  # return_scores among them: each step's log-probability (a log-softmax), when asked for
        )
    except Exception:  # reported to the server, which ends the batch's calls
        error = traceback.format_exc()
    outbox.end(command.number, error)


def pieces(lengths: Sequence[int], budget: int = SCORE_PIECE_TOKENS) -> list[range]:
    """Consecutive runs of sequences, each scored in one call of at most `budget` padded positions (its rows times
    its longest row); a sequence longer than the budget is a piece of its own."""
    out: list[range] = []
    start, longest = 0, 0
    for i, length in enumerate(lengths):
        if i > start and (i - start + 1) * max(longest, length) > budget:
            out.append(range(start, i))
            start, longest = i, 0
        longest = max(longest, length)
    if lengths:
        out.append(range(start, len(lengths)))
    return out


Scorer = Callable[[list[list[int]], bool], list[ScoredRow]]


def run_scoring(score: Scorer, outbox: Outbox, flags: memoryview, command: ScoreJob) -> None:
    """A scoring job from start to end (static batches: on a replica's thread of its own)."""
    for _ in scoring(score, outbox, flags, command):
        pass


def scoring(score: Scorer, outbox: Outbox, flags: memoryview, command: ScoreJob) -> Iterator[None]:
    """Each sequence's teacher-forced log-probabilities (of its tokens after the first), a piece of at most
    SCORE_PIECE_TOKENS positions at a time, yielding after each piece (the decode loop runs a step between two):
    CTranslate2 materialises two float vectors of the vocabulary per position it scores, so a job's memory is one
    piece's, whatever its size. The job's stop flag is read between pieces: its caller gone, its deadline or the
    drain end it there."""
    slot, sequences, top = command.slot, command.sequences, command.top
    rows: list[ScoredRow] = []
    error = None
    outbox.start()
    try:
        for piece in pieces([len(ids) for ids in sequences]):
            if flags[slot]:
                break
            rows += score([sequences[i] for i in piece], top)
            outbox.pieces += 1  # progress for the server's watch (a count lost to a race with the sender is harmless)
            yield
    except Exception:  # reported to the server, which fails the call
        error = traceback.format_exc()
    outbox.end(command.number, error, None if error is not None else rows)


def stock_scorer(generator: Any, vocabulary: Sequence[str]) -> Scorer:
    """A piece is one score_batch call, or, with `top`, one forward_batch per sequence that also gives the most
    likely token at each place (its distribution is reduced here, so it never crosses the pipe)."""

    def score(batch: list[list[int]], top: bool) -> list[ScoredRow]:
        if top:
            return [_forward(generator, [vocabulary[i] for i in ids], ids) for ids in batch]
        results = generator.score_batch([[vocabulary[i] for i in ids] for ids in batch], max_input_length=0)
        return [(list(result.log_probs), [], []) for result in results]

    return score


def native_scorer(decoder: Any) -> Scorer:
    """Each sequence scored alone by the native decoder, its distributions reduced on the device (native/)."""

    def score(batch: list[list[int]], top: bool) -> list[ScoredRow]:
        rows: list[ScoredRow] = []
        for ids in batch:
            chosen, best, best_scores = decoder.score(ids)
            rows.append((chosen, best, best_scores) if top else (chosen, [], []))
        return rows

    return score


def _forward(generator: Any, tokens: list[str], ids: list[int]) -> ScoredRow:
    import ctranslate2
    import numpy as np

    output = generator.forward_batch([tokens], return_log_probs=True)
    if output.device != "cpu":
        output = output.to_device(ctranslate2.Device.cpu)
    log_probs = np.asarray(output)[0, :-1]  # the distribution of token i + 1 given tokens 0..i
    chosen = log_probs[np.arange(len(ids) - 1), ids[1:]]
    best = log_probs.argmax(axis=1)
    return chosen.tolist(), best.tolist(), log_probs[np.arange(len(best)), best].tolist()


def rss_bytes(pid: int | str = "self") -> int:
    """A process's resident set size (Linux), 0 where it cannot be read."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


class _Notes(logging.Handler):
    """What the engine logs while it loads, handed to the server, which logs it in its own format."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[tuple[int, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append((record.levelno, record.getMessage()))


Loader = Callable[[CoreOptions], tuple[Any, Loaded, list[str]]]


def serve(commands: int, events: int, flags: memoryview, loader: Loader = load) -> None:
    """Load as the first command says (with `loader`: the fast tier's is a fake model), report, then run jobs until
    told to stop or the server is gone. `commands` and `events` are the pipes' file descriptors."""
    first = wire.receive(commands)
    notes = _Notes()
    logging.getLogger("jachat").addHandler(notes)
    try:
        if not isinstance(first, wire.Load) or first.protocol != wire.PROTOCOL:
            spoken = first.protocol if isinstance(first, wire.Load) else type(first).__name__
            raise ProtocolMismatch(f"the server speaks wire protocol {spoken}; this engine speaks {wire.PROTOCOL}")
        options = first.options
        generator, loaded, vocabulary = loader(options)
    except Exception as exc:  # one line for the operator, as the server would have said it
        wire.send(events, wire.LoadFailed(type(exc).__name__, str(exc), tuple(notes.records)))
        return
    finally:
        logging.getLogger("jachat").removeHandler(notes)
    wire.send(events, wire.Ready(wire.PROTOCOL, dataclasses.replace(loaded, notes=tuple(notes.records))))
    outbox = Outbox(events)
    sender = threading.Thread(target=outbox.run, name="jachat-outbox", daemon=True)
    sender.start()
    if loaded.loop:
        _serve_loop(commands, generator, options, len(vocabulary), outbox, flags, loaded)
    else:
        _serve_static(commands, generator, vocabulary, options.eos_id, outbox, flags, loaded.all_replicas)
    outbox.close()
    sender.join()  # the server hears of every batch's end before the pipe closes
    if not loaded.loop:
        generator.unload_model()
    del generator  # the C++ replicas' threads are joined here, while Python is fully alive


def _commands(commands: int) -> Iterator[wire.RunBatch | wire.ScoreJob]:
    """Commands until Stop; the process ends here if the server is gone (nobody wants these rows; no finalization
    mid-batch)."""
    while True:
        try:
            command = wire.receive(commands)
        except (EOFError, OSError):
            os._exit(0)
        if isinstance(command, wire.Stop):
            return
        if isinstance(command, wire.RunBatch | wire.ScoreJob):
            yield command


def _serve_static(
    commands: int, generator: Any, vocabulary: list[str], eos_id: int, outbox: Outbox, flags: memoryview, jobs: int
) -> None:
    """One thread per replica: the server's scheduler gives each job (a batch or a scoring job) a free replica."""
    pool = ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="jachat-decode")
    scorer = stock_scorer(generator, vocabulary)
    for command in _commands(commands):
        if isinstance(command, wire.RunBatch):
            pool.submit(run_batch, generator, vocabulary, eos_id, outbox, flags, command)
        elif isinstance(command, wire.ScoreJob):
            pool.submit(run_scoring, scorer, outbox, flags, command)
    pool.shutdown(wait=True)  # the server stopped every row and job: these end at their next token or piece


def _serve_loop(
    commands: int,
    decoder: Any,
    options: CoreOptions,
    vocab_size: int,
    outbox: Outbox,
    flags: memoryview,
    loaded: Loaded,
) -> None:
    """The decode loop on this (the main) thread, every RunBatch's rows joining its running batch, commands read on
    a thread of their own; scoring jobs through the loop too, a piece between two steps (the decoder computes one
    thing at a time: neither a reply nor a scoring job waits for the other's whole length)."""
    from jachat.service.engine.loop import Loop

    rows, budget = loaded.replicas, loaded.kv_cache_tokens
    loop = Loop(decoder, options.eos_id, outbox, flags, rows, vocab_size, budget, options.prefill_tokens)
    scorer = native_scorer(decoder)

    def read() -> None:
        for command in _commands(commands):
            if isinstance(command, wire.RunBatch):
                loop.submit(command)
            else:
                loop.submit_work(scoring(scorer, outbox, flags, command))
        loop.close()

    reader = threading.Thread(target=read, name="jachat-commands", daemon=True)
    reader.start()
    # The loop runs on the process's main thread: CTranslate2's OpenMP threads served a step of 16 rows of the bench
    # model from it in 24-31 ms, from another thread in 45 ms (2 threads; Intel Xeon 2-core, MKL; 2026-12-07).
    loop.run()
    reader.join()


class ProtocolMismatch(Exception):
    """The server and this engine speak different versions of the wire (wire.PROTOCOL)."""


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m jachat.service.engine.core COMMANDS_FD EVENTS_FD FLAGS_FD SLOTS`, spawned by link.py."""
    args = list(sys.argv[1:] if argv is None else argv)
    commands_fd, events_fd, flags_fd, slots = (int(a) for a in args)
    # Ctrl-C in a terminal signals the whole process group, and systemd's default stop sends SIGTERM to every
    # process of the service: the server drains on either, and needs its engine to do so. The engine ends when the
    # server says so, or when the server is gone.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.getLogger("jachat").setLevel(logging.INFO)
    logging.getLogger("jachat").propagate = False  # the server logs what this process says (_Notes)
    shared = mmap.mmap(flags_fd, slots)
    serve(commands_fd, events_fd, memoryview(shared))  # its generator is destroyed: a plain exit is safe


if __name__ == "__main__":
    from jachat.service.engine import core  # one copy of this module: core's, not a second one as __main__

    core.main()
