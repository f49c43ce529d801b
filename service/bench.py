"""jachat-bench: load and compare. One workload, three ways of running it, measured in one run on one machine.

- `grpc`: N concurrent closed-loop GenerateStream clients (or a fixed arrival rate) against a running service.
- `ct2`: CTranslate2 driven directly on the same model: one sequence at a time, and one batch of N.
- `hf`: the model card's Transformers code path on the Hugging Face checkpoint (float32, CPU), one at a time.
- `all`: starts jachat-serve on the model and runs the three, then prints the ratios side by side.

The workload: a mix of prompts rendered as the service renders them, a fixed output length (min_new_tokens =
max_new_tokens, so every request writes exactly that many tokens), and one set of sampling options.
Figures: time to first token (TTFT), inter-token latency (ITL: per request, (last token - first token) /
(tokens - 1)), end-to-end latency, each p50/p90/p99 over requests; aggregate output tokens/s; errors by code.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc

from converter.manifest import TOKENIZER_FILE
from jachat.v1 import chat_pb2, chat_pb2_grpc
from service.prompt import Speaker, Turn, render_prompt
from service.sampling import SamplingOptions
from service.servicer import sampling_to_pb

PROMPTS = (
    "コンタクトレンズを慣れるにはどうすればよいですか?",
    "日本の首都はどこですか?大阪や京都との違いも教えてください。",
    "おすすめの本を教えてください。最近は小説よりもエッセイをよく読みます。",
    "プログラミングを勉強したいのですが、何から始めればよいでしょうか?",
    "明日は雨が降るそうです。傘以外に持っていくと良いものはありますか?",
    "朝ごはんにパンとコーヒーを食べました。昼ごはんは何がいいと思いますか?",
    "富士山に登りたいです。初心者が気をつけることを教えてください。",
    "吾輩は猫である。名前はまだ無い。この続きを書いてください。",
)


@dataclass(frozen=True)
class Workload:
    prompts: tuple[str, ...] = PROMPTS
    tokens: int = 64  # every request generates exactly this many tokens
    temperature: float = 0.7
    top_k: int = 50
    top_p: float = 1.0
    repetition_penalty: float = 1.0

    def prompt(self, i: int) -> str:
        return render_prompt([Turn(Speaker.USER, self.prompts[i % len(self.prompts)])])

    def sampling_pb(self) -> chat_pb2.SamplingParams:
        return sampling_to_pb(self.options())

    def options(self) -> SamplingOptions:
        return SamplingOptions(
            max_new_tokens=self.tokens,
            min_new_tokens=self.tokens,
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            repetition_penalty=self.repetition_penalty,
        )


@dataclass
class Record:
    ttft: float
    e2e: float
    tokens: int
    code: str = "OK"

    @property
    def itl(self) -> float | None:
        return (self.e2e - self.ttft) / (self.tokens - 1) if self.tokens > 1 else None


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = q / 100 * (len(ordered) - 1)
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass
class Report:
    name: str
    concurrency: int
    requests: int
    seconds: float
    output_tokens: int
    tokens_per_second: float
    ttft: dict[str, float] = field(default_factory=dict)
    itl: dict[str, float] = field(default_factory=dict)
    e2e: dict[str, float] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)

    cancelled: int = 0  # calls the client cancelled on purpose (--cancel-fraction): not errors

    @classmethod
    def of(cls, name: str, concurrency: int, records: list[Record], seconds: float) -> Report:
        ok = [r for r in records if r.code == "OK"]
        on_purpose = sum(r.code == "CANCELLED_BY_CLIENT" for r in records)
        output = sum(r.tokens for r in ok)

        def pcts(values: list[float]) -> dict[str, float]:
            return {f"p{q}": percentile(values, q) for q in (50, 90, 99)}

        return cls(
            name=name,
            concurrency=concurrency,
            requests=len(records),
            seconds=seconds,
            output_tokens=output,
            tokens_per_second=output / seconds if seconds > 0 else math.nan,
            ttft=pcts([r.ttft for r in ok]),
            itl=pcts([r.itl for r in ok if r.itl is not None]),
            e2e=pcts([r.e2e for r in ok]),
            errors=dict(Counter(r.code for r in records if r.code not in ("OK", "CANCELLED_BY_CLIENT"))),
            cancelled=on_purpose,
        )


class Progress:
    """A one-line progress bar on stderr."""

    def __init__(self, label: str, total: int | None, seconds: float | None) -> None:
        self.label, self.total, self.seconds = label, total, seconds
        self.done = 0
        self.started = time.monotonic()
        self._shown = 0.0

    def advance(self) -> None:
        self.done += 1
        now = time.monotonic()
        if now - self._shown > 0.2:
            self._shown = now
            self.show(now)

    def show(self, now: float) -> None:
        elapsed = now - self.started
        fraction = (self.done / self.total) if self.total else min(1.0, elapsed / (self.seconds or 1))
        bar = "#" * int(30 * fraction)
        sys.stderr.write(f"\r{self.label:<24} [{bar:<30}] {self.done} requests {elapsed:6.1f} s")
        sys.stderr.flush()

    def close(self) -> None:
        self.show(time.monotonic())
        sys.stderr.write("\n")


# ---------------------------------------------------------------------------------------------------- gRPC ----
async def _grpc_request(
    stub: chat_pb2_grpc.ChatServiceStub, workload: Workload, i: int, timeout: float, cancel_after: int | None = None
) -> Record:
    """One GenerateStream call; with cancel_after, the client cancels it after that many messages."""
    turns = [chat_pb2.Turn(speaker=chat_pb2.SPEAKER_USER, text=workload.prompts[i % len(workload.prompts)])]
    request = chat_pb2.GenerateStreamRequest(turns=turns, sampling=workload.sampling_pb())
    started = time.perf_counter()
    first: float | None = None
    tokens = 0
    call = stub.GenerateStream(request, timeout=timeout)
    try:
        received = 0
        async for message in call:
            received += 1
            if first is None and message.text:
                first = time.perf_counter() - started
            if message.HasField("usage"):
                tokens = message.usage.completion_tokens
            if cancel_after is not None and received >= cancel_after:
                call.cancel()
                return Record(math.nan, time.perf_counter() - started, 0, "CANCELLED_BY_CLIENT")
    except grpc.aio.AioRpcError as exc:
        return Record(math.nan, time.perf_counter() - started, 0, exc.code().name)
    e2e = time.perf_counter() - started
    return Record(first if first is not None else e2e, e2e, tokens)


async def run_grpc(
    target: str,
    workload: Workload,
    concurrency: int,
    requests: int | None = None,
    duration: float | None = None,
    rate: float | None = None,
    timeout: float = 600.0,
    label: str | None = None,
    cancel_fraction: float = 0.0,
) -> Report:
    """Closed loop: `concurrency` clients, each sending its next request when the last one ends. With `rate`,
    an open loop: Poisson arrivals at `rate` requests/s (at most `concurrency` in flight). With cancel_fraction,
    that share of calls is cancelled by the client after a random number of messages."""
    if requests is None and duration is None:
        requests = 4 * concurrency
    name = label or (f"service, {concurrency} streams" if rate is None else f"service, {rate}/s")
    progress = Progress(name, requests, duration)
    records: list[Record] = []
    counter = iter(range(10**9))
    stop_at = None if duration is None else time.monotonic() + duration

    def more() -> bool:
        return (requests is None or len(records) + in_flight[0] < requests) and (
            stop_at is None or time.monotonic() < stop_at
        )

    in_flight = [0]
    async with grpc.aio.insecure_channel(target) as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        await _grpc_request(stub, workload, 0, timeout)  # warm-up, not counted
        started = time.perf_counter()

        chance = random.Random(1)

        async def one() -> None:
            in_flight[0] += 1
            cancel_after = chance.randint(1, max(1, workload.tokens - 1)) if chance.random() < cancel_fraction else None
            record = await _grpc_request(stub, workload, next(counter), timeout, cancel_after)
            in_flight[0] -= 1
            records.append(record)
            progress.advance()

        if rate is None:

            async def client() -> None:
                while more():
                    await one()

            await asyncio.gather(*(client() for _ in range(concurrency)))
        else:
            rng = random.Random(0)
            tasks: set[asyncio.Task[None]] = set()
            limit = asyncio.Semaphore(concurrency)
            while more():
                await asyncio.sleep(rng.expovariate(rate))
                async with limit:
                    pass
                task = asyncio.ensure_future(one())
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            await asyncio.gather(*tasks)
        seconds = time.perf_counter() - started
    progress.close()
    return Report.of(name, concurrency, records, seconds)


# ------------------------------------------------------------------------------------------------ CTranslate2 --
def _ct2(model: Path) -> tuple[Any, Any]:
    import ctranslate2

    from converter.manifest import read_manifest
    from service.engine import resolve_compute_type
    from service.tokenizer import Tokenizer

    compute_type = resolve_compute_type("default", read_manifest(model).quantization, "cpu")
    return ctranslate2.Generator(str(model), device="cpu", compute_type=compute_type), Tokenizer(model / TOKENIZER_FILE)


def _ct2_batch(generator: Any, tokenizer: Any, workload: Workload, indices: list[int]) -> list[Record]:
    prompts = [[tokenizer.pieces[i] for i in tokenizer.encode(workload.prompt(j))] for j in indices]
    firsts: dict[int, float] = {}
    started = time.perf_counter()

    def callback(step: Any) -> bool:
        firsts.setdefault(step.batch_id, time.perf_counter() - started)
        return False

    results = generator.generate_batch(
        prompts,
        max_length=workload.tokens,
        include_prompt_in_result=False,
        end_token=[tokenizer.eos_id],
        callback=callback,
        **workload.options().ctranslate2_kwargs(),
    )
    e2e = time.perf_counter() - started
    return [Record(firsts.get(b, e2e), e2e, len(r.sequences_ids[0])) for b, r in enumerate(results)]


def run_ct2(model: Path, workload: Workload, batch_size: int, rounds: int) -> Report:
    """`rounds` calls of generate_batch with `batch_size` prompts each (1: one sequence at a time)."""
    generator, tokenizer = _ct2(model)
    name = "ctranslate2, 1 sequence" if batch_size == 1 else f"ctranslate2, batch of {batch_size}"
    _ct2_batch(generator, tokenizer, workload, list(range(batch_size)))  # warm-up
    progress = Progress(name, rounds * batch_size, None)
    records: list[Record] = []
    started = time.perf_counter()
    for r in range(rounds):
        for record in _ct2_batch(generator, tokenizer, workload, [r * batch_size + b for b in range(batch_size)]):
            records.append(record)
            progress.advance()
    seconds = time.perf_counter() - started
    progress.close()
    del generator
    return Report.of(name, batch_size, records, seconds)


# ----------------------------------------------------------------------------------------------- Transformers --
def run_hf(checkpoint: Path, workload: Workload, requests: int) -> Report:
    """The model card's code path: AutoModelForCausalLM (float32, CPU) and generate(do_sample=...)."""
    import torch
    import transformers

    from service.tokenizer import Tokenizer

    tokenizer = Tokenizer(checkpoint / TOKENIZER_FILE)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(checkpoint), dtype=torch.float32)
    model.eval()  # type: ignore[no-untyped-call]

    class FirstToken(transformers.generation.streamers.BaseStreamer):
        def __init__(self) -> None:
            self.calls = 0
            self.first: float | None = None

        def put(self, value: Any) -> None:
            self.calls += 1
            if self.calls == 2:  # the first call carries the prompt
                self.first = time.perf_counter()

        def end(self) -> None:
            pass

    def one(i: int) -> Record:
        ids = torch.tensor([tokenizer.encode(workload.prompt(i))])
        streamer = FirstToken()
        started = time.perf_counter()
        with torch.no_grad():
            out: Any = model.generate(
                ids,
                do_sample=workload.temperature > 0,
                max_new_tokens=workload.tokens,
                min_new_tokens=workload.tokens,
                temperature=workload.temperature or None,
                top_k=workload.top_k,
                top_p=workload.top_p,
                repetition_penalty=workload.repetition_penalty,
                pad_token_id=0,
                bos_token_id=2,
                eos_token_id=3,
                streamer=streamer,
            )
        e2e = time.perf_counter() - started
        first = (streamer.first - started) if streamer.first else e2e
        return Record(first, e2e, out.shape[1] - ids.shape[1])

    one(0)  # warm-up
    progress = Progress("transformers (card), 1", requests, None)
    records = []
    started = time.perf_counter()
    for i in range(requests):
        records.append(one(i))
        progress.advance()
    seconds = time.perf_counter() - started
    progress.close()
    return Report.of("transformers (card), 1 sequence", 1, records, seconds)


# ------------------------------------------------------------------------------------------------------- soak --
def rss_bytes(pid: int) -> int:
    """Resident memory of a process (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


async def run_soak(
    model: Path,
    workload: Workload,
    concurrency: int,
    duration: float,
    warmup: float,
    cancel_fraction: float,
    serve_args: Sequence[str] = (),
) -> dict[str, Any]:
    """Load a fresh jachat-serve for `duration` seconds with cancellations, watching its memory and health."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from service.launcher import spawn

    server = spawn(model, *serve_args)
    samples: list[tuple[float, int]] = []
    health_failures: list[str] = []
    try:
        started = time.monotonic()

        async def watch() -> None:
            async with grpc.aio.insecure_channel(server.target) as channel:
                health = health_pb2_grpc.HealthStub(channel)
                while True:
                    samples.append((time.monotonic() - started, rss_bytes(server.process.pid)))
                    try:
                        reply = await health.Check(
                            health_pb2.HealthCheckRequest(service="jachat.v1.ChatService"), timeout=1
                        )
                        if reply.status != health_pb2.HealthCheckResponse.SERVING:
                            health_failures.append(f"{time.monotonic() - started:.0f}s: {reply.status}")
                    except grpc.aio.AioRpcError as exc:
                        health_failures.append(f"{time.monotonic() - started:.0f}s: {exc.code().name}")
                    await asyncio.sleep(1.0)

        watcher = asyncio.ensure_future(watch())
        report = await run_grpc(
            server.target, workload, concurrency, duration=duration, label="soak", cancel_fraction=cancel_fraction
        )
        watcher.cancel()
    finally:
        exit_code = server.stop()
    after_warmup = [rss for t, rss in samples if t >= warmup] or [rss for _, rss in samples]
    fifth = max(1, len(after_warmup) // 5)  # compare means of the first and last fifths: single samples are noisy
    baseline = sum(after_warmup[:fifth]) / fifth
    end = sum(after_warmup[-fifth:]) / fifth
    peak_after = max(after_warmup)
    return {
        "report": asdict(report),
        "rss_at_warmup_bytes": baseline,  # mean over the first fifth after warm-up
        "rss_end_bytes": end,  # mean over the last fifth
        "rss_peak_after_warmup_bytes": peak_after,
        "rss_growth": (end - baseline) / baseline,
        "health_failures": health_failures,
        "server_exit_code": exit_code,
        "rss_samples": samples[:: max(1, len(samples) // 200)],
    }


# ----------------------------------------------------------------------------------------------------- output --
def table(reports: list[Report]) -> str:
    header = (
        f"{'run':<34} {'conc':>4} {'reqs':>5} {'tok/s':>8} {'TTFT p50/p90/p99 (ms)':>24} "
        f"{'ITL p50/p90/p99 (ms)':>22} {'e2e p50/p99 (s)':>16}  errors"
    )
    lines = [header, "-" * len(header)]

    def ms(d: dict[str, float]) -> str:
        return "/".join(f"{d[k] * 1000:.0f}" if not math.isnan(d[k]) else "-" for k in ("p50", "p90", "p99"))

    for r in reports:
        e2e = f"{r.e2e['p50']:.2f}/{r.e2e['p99']:.2f}"
        errors = ", ".join(f"{k}:{v}" for k, v in r.errors.items()) or "0"
        lines.append(
            f"{r.name:<34} {r.concurrency:>4} {r.requests:>5} {r.tokens_per_second:>8.1f} "
            f"{ms(r.ttft):>24} {ms(r.itl):>22} {e2e:>16}  {errors}"
        )
    return "\n".join(lines)


def ratios(reports: dict[str, Report], concurrency: int) -> list[tuple[str, float, float, bool]]:
    """(what, measured, target, met) for the targets in the README."""
    rows: list[tuple[str, float, float, bool]] = []

    def add(what: str, value: float, target: float, higher: bool = True) -> None:
        rows.append((what, value, target, value >= target if higher else value <= target))

    one, many = reports.get("service_1"), reports.get("service_n")
    ct2_1, ct2_n, hf = reports.get("ct2_1"), reports.get("ct2_n"), reports.get("hf")
    if one and ct2_1:
        add("service 1 stream / ctranslate2 1 sequence", one.tokens_per_second / ct2_1.tokens_per_second, 0.95)
    if many and ct2_n:
        add(
            f"service {concurrency} streams / ctranslate2 batch of {concurrency}",
            many.tokens_per_second / ct2_n.tokens_per_second,
            0.85,
        )
    if many and one:
        add(f"service {concurrency} streams / service 1 stream", many.tokens_per_second / one.tokens_per_second, 2.5)
    if one and hf:
        add("service 1 stream / transformers 1 sequence", one.tokens_per_second / hf.tokens_per_second, 5.0)
    if many and one:
        add(
            f"TTFT p99 at {concurrency} streams / one generation alone (e2e p50)",
            many.ttft["p99"] / one.e2e["p50"],
            2.0,
            higher=False,
        )
    if many:
        add(f"errors at {concurrency} streams", float(sum(many.errors.values())), 0.0, higher=False)
    return rows


def print_results(reports: dict[str, Report], concurrency: int, output: Path | None, meta: dict[str, Any]) -> int:
    print(table(list(reports.values())))
    rows = ratios(reports, concurrency)
    if rows:
        print()
        for what, value, target, met in rows:
            print(
                f"{what:<66} {value:8.2f}  target {'>=' if 'errors' not in what and 'TTFT' not in what else '<='}"
                f" {target:<5} {'met' if met else 'NOT MET'}"
            )
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        document = {
            "meta": meta,
            "reports": {k: asdict(v) for k, v in reports.items()},
            "targets": [{"what": w, "value": v, "target": t, "met": m} for w, v, t, m in rows],
        }
        output.write_text(json.dumps(document, indent=2, ensure_ascii=False) + "\n")
        print(f"\nwritten to {output}")
    return 0 if all(m for *_, m in rows) else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jachat-bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=("grpc", "ct2", "hf", "all", "soak", "abuse"))
    parser.add_argument("--target", default="localhost:50051", help="grpc: HOST:PORT of a running service")
    parser.add_argument("--model", type=Path, help="ct2/all: converted model folder")
    parser.add_argument("--checkpoint", type=Path, help="hf/all: the Hugging Face checkpoint it came from")
    parser.add_argument("--concurrency", "-c", type=int, default=16, help="streams (grpc) / batch size (ct2)")
    parser.add_argument("--requests", "-n", type=int, help="requests per run (default: 4 x concurrency)")
    parser.add_argument("--duration", type=float, help="grpc: run for this many seconds instead")
    parser.add_argument("--rate", type=float, help="grpc: open loop, Poisson arrivals per second")
    parser.add_argument("--tokens", type=int, default=Workload.tokens, help="output tokens per request (fixed)")
    parser.add_argument("--temperature", type=float, default=Workload.temperature)
    parser.add_argument("--top-k", type=int, default=Workload.top_k)
    parser.add_argument("--repetition-penalty", type=float, default=Workload.repetition_penalty)
    parser.add_argument("--hf-requests", type=int, default=4, help="all: requests for the transformers run")
    parser.add_argument("--serve-arg", action="append", default=[], help="all: extra jachat-serve argument")
    parser.add_argument(
        "--cancel-fraction", type=float, default=0.0, help="grpc/soak: cancel this fraction of calls at a random point"
    )
    parser.add_argument("--warmup", type=float, default=60.0, help="soak: seconds before memory growth is counted")
    parser.add_argument("--clients", type=int, default=4, help="abuse: clients sending worst-case requests")
    parser.add_argument("--output", "-o", type=Path, help="write the JSON report here")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    workload = Workload(
        tokens=args.tokens, temperature=args.temperature, top_k=args.top_k, repetition_penalty=args.repetition_penalty
    )
    n = args.concurrency
    requests = args.requests or 4 * n
    reports: dict[str, Report] = {}
    meta = {"argv": sys.argv, "workload": asdict(workload), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    need = {
        "ct2": ["model"],
        "hf": ["checkpoint"],
        "all": ["model", "checkpoint"],
        "soak": ["model", "duration"],
        "abuse": ["model"],
    }
    for name in need.get(args.mode, []):
        if getattr(args, name) is None:
            build_parser().error(f"{args.mode} needs --{name}")
    if args.mode == "soak":
        return soak_main(args, workload, meta)
    if args.mode == "abuse":
        from service.abuse import abuse_main

        return abuse_main(args.model, args.duration or 20.0, args.clients, args.serve_arg, args.output, meta)
    runners: list[tuple[str, Callable[[], Report]]] = []
    if args.mode == "grpc":
        runners.append(
            (
                "service_n",
                lambda: asyncio.run(run_grpc(args.target, workload, n, args.requests, args.duration, args.rate)),
            )
        )
    if args.mode in ("ct2", "all"):
        runners += [
            ("ct2_1", lambda: run_ct2(args.model, workload, 1, max(4, requests // n))),
            ("ct2_n", lambda: run_ct2(args.model, workload, n, max(2, requests // n))),
        ]
    if args.mode in ("hf", "all"):
        runners.append(("hf", lambda: run_hf(args.checkpoint, workload, args.hf_requests)))
    server = None
    if args.mode == "all":
        from service.launcher import spawn

        server = spawn(args.model, "--device", "cpu", "--max-batch-size", str(max(n, 16)), *args.serve_arg)
        target = server.target
        runners[0:0] = [
            ("service_1", lambda: asyncio.run(run_grpc(target, workload, 1, max(4, requests // n)))),
            ("service_n", lambda: asyncio.run(run_grpc(target, workload, n, requests))),
        ]
        meta["server"] = [str(a) for a in server.process.args]  # type: ignore[union-attr]
    try:
        for key, runner in runners:
            reports[key] = runner()
            if key == "service_n" and server is not None:
                server.stop()
                server = None  # the other runs get the machine to themselves
    finally:
        if server is not None:
            server.stop()
    return print_results(reports, n, args.output, meta)


def soak_main(args: argparse.Namespace, workload: Workload, meta: dict[str, Any]) -> int:
    """Soak: zero unexpected errors, memory growth under 5% after warm-up, health SERVING throughout."""
    result = asyncio.run(
        run_soak(
            args.model,
            workload,
            args.concurrency,
            args.duration,
            args.warmup,
            args.cancel_fraction,
            ["--device", "cpu", *args.serve_arg],
        )
    )
    report = result["report"]
    checks = [
        ("unexpected errors", sum(report["errors"].values()), 0, sum(report["errors"].values()) == 0),
        ("memory growth after warm-up (%)", 100 * result["rss_growth"], 5.0, result["rss_growth"] < 0.05),
        ("health checks not SERVING", len(result["health_failures"]), 0, not result["health_failures"]),
        ("server exit code", result["server_exit_code"], 0, result["server_exit_code"] == 0),
    ]
    print(
        f"soak: {report['requests']} calls in {report['seconds']:.0f} s, {report['cancelled']} cancelled on purpose,"
        f" {report['tokens_per_second']:.1f} tokens/s; RSS {result['rss_at_warmup_bytes'] / 2**20:.1f} MiB after"
        f" warm-up, {result['rss_end_bytes'] / 2**20:.1f} MiB at the end"
    )
    for what, value, target, met in checks:
        print(
            f"{what:<40} {value:10.2f}  target {'<' if 'growth' in what else '=='} {target:<5} "
            f"{'met' if met else 'NOT MET'}"
        )
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        document = {
            "meta": meta,
            "soak": result,
            "checks": [{"what": w, "value": v, "target": t, "met": m} for w, v, t, m in checks],
        }
        args.output.write_text(json.dumps(document, indent=2, ensure_ascii=False) + "\n")
    return 0 if all(m for *_, m in checks) else 1
