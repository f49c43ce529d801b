"""jachat-bench abuse: a fresh server under worst-case requests, measured from the outside.

Phase 1 (`duration` seconds): `clients` abusers send, in a loop, the heaviest requests a client may send:
- 4 MB GenerateRequests (256 turns of 5,400 characters), with and without drop_oldest_turns, and 4 MB Tokenize calls;
- 256 turns of 1,800 characters with drop_oldest_turns (each turn under the context: the worst case of the old
  quadratic drop loop);
- the heaviest requests that pass the request budget (61,200 characters in 34 turns), with drop_oldest_turns and as
  Tokenize.
Meanwhile a prober checks health every 50 ms (1 s timeout, like a liveness probe) and one normal client streams
greedy replies. Reported: health latency p50/p99/max, the normal stream's worst gap between two messages, and the
server's event-loop lag (from its own histogram).

Phase HTTP (`duration` seconds, the HTTP port on): idle connections (200) and slow ones (headers and one byte of
a body, 40) are held open (within one peer's share of the connections; beyond it they are closed at accept), one
client uploads gzip bodies that inflate past the limit (to the chat route, and to GET /health, which reads no
body), another opens streams it never reads. The same prober, normal stream and loop
lag are reported, and what each abuse was answered.

Phase scoring (`duration` seconds, and the calls then in flight): the heaviest Score and echo calls the limits
allow, one caller of each in a loop: Score with 16 candidates of nearly a context each (1 to 16 candidates, each
with the prompt within 2048 tokens) over gRPC, and /v1/completions with 16 prompts of nearly a context each, `echo`,
`logprobs: 1` (each place's most likely token too) and no generation over HTTP (a 2 MiB answer). The same prober,
normal stream and loop lag are reported, and the engine process's resident memory, sampled every 20 ms, against its
size before the phase.

Phase 2: the queue is kept full with long generations (the server runs with a small --max-queued-requests, and
refused fillers try again), then the heavy generation requests are sent one at a time, each once the server's own
gauge shows the queue full: each must be refused (RESOURCE_EXHAUSTED); reported is how long the refusal took,
request transfer included.

Phase burst, on the same full queue: BURST GenerateStream calls opened at once on one new connection (the server
lets 128 of them in at a time; the others wait in the client for a place, or are reset with REFUSED_STREAM, which
gRPC reports as UNAVAILABLE). Reported is how long each refusal took, and the same burst against a bare grpc.aio
server that refuses every call (`floor_server`, a child process) while jachat's fillers still load the machine: the
floor is what any Python gRPC server pays on this machine at that moment, so the two are a ratio, not two absolutes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import time
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2

from jachat.bench.launcher import ServerProcess, health_stub, spawn
from jachat.bench.processes import children, rss_bytes
from jachat.bench.reports import write_report
from jachat.v1 import chat_pb2, chat_pb2_grpc

FOUR_MB_TURNS = 256
FOUR_MB_TURN_CHARACTERS = 5_400
# within the request budget (65,536 characters) with every turn under the context (about a token per character
# in Japanese): the heaviest requests that are actually prepared, encoded and served
BUDGET_TURNS, BUDGET_TURN_CHARACTERS = 34, 1_800
QUEUE = 4  # --max-queued-requests for the run: small, so phase 2 fills it quickly
BATCH = 4  # --max-batch-size, likewise
# the targets of the edge issue: (what, key in the report, limit in ms)
TARGETS = (
    ("health check p99", "health_p99_ms", 50.0),
    ("health check max", "health_max_ms", 250.0),
    ("normal stream's worst gap", "stream_worst_gap_ms", 250.0),
    ("HTTP abuse: health check p99", "http_health_p99_ms", 50.0),
    ("HTTP abuse: health check max", "http_health_max_ms", 250.0),
    ("HTTP abuse: stream's worst gap", "http_stream_worst_gap_ms", 250.0),
    ("full server refuses (max)", "refusal_max_ms", 50.0),
    ("Score/echo: health check p99", "scoring_health_p99_ms", 50.0),
    ("Score/echo: engine RSS above idle (MiB)", "scoring_engine_rss_growth_mib", 1024.0),
    ("burst: refusal max / bare grpc.aio's", "burst_refusal_max_ratio", 2.0),
)
BURST = 400  # streams opened at once on one connection
_TEXT = "吾輩は猫である。名前はまだ無い。どこで生れたかとんと見当がつかぬ。"


def _turns(count: int, characters: int) -> list[chat_pb2.Turn]:
    text = (_TEXT * (characters // len(_TEXT) + 1))[:characters]
    speakers = (chat_pb2.SPEAKER_USER, chat_pb2.SPEAKER_SYSTEM)
    turns = [chat_pb2.Turn(speaker=speakers[i % 2], text=text) for i in range(count - 1)]
    return [*turns, chat_pb2.Turn(speaker=chat_pb2.SPEAKER_USER, text=text)]


def heavy_requests() -> dict[str, tuple[str, Any]]:
    """name -> (method, request): the worst cases, as the abusers send them."""
    four_mb = _turns(FOUR_MB_TURNS, FOUR_MB_TURN_CHARACTERS)
    budget = _turns(BUDGET_TURNS, BUDGET_TURN_CHARACTERS)
    short = chat_pb2.SamplingParams(max_new_tokens=8)
    return {
        "generate_4mb": ("Generate", chat_pb2.GenerateRequest(turns=four_mb, sampling=short)),
        "generate_4mb_drop": (
            "Generate",
            chat_pb2.GenerateRequest(turns=four_mb, sampling=short, drop_oldest_turns=True),
        ),
        "tokenize_4mb": ("Tokenize", chat_pb2.TokenizeRequest(turns=four_mb)),
        # every turn under the context: what drove the old quadratic drop_oldest_turns loop (1.4 MB)
        "generate_256_turns_drop": (
            "Generate",
            chat_pb2.GenerateRequest(
                turns=_turns(FOUR_MB_TURNS, BUDGET_TURN_CHARACTERS), sampling=short, drop_oldest_turns=True
            ),
        ),
        "generate_budget_drop": (
            "Generate",
            chat_pb2.GenerateRequest(turns=budget, sampling=short, drop_oldest_turns=True),
        ),
        "tokenize_budget": ("Tokenize", chat_pb2.TokenizeRequest(turns=budget)),
    }


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def _lag_histogram(server: ServerProcess) -> dict[str, float]:
    return {k: v for k, v in server.scrape().items() if k.startswith("jachat_event_loop_lag_seconds")}


def _lag_summary(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """p50/p99 (as bucket bounds) and the share of samples over 50 ms, over the phase (empty for a server that
    does not measure its loop, such as one older than the metric)."""
    if "jachat_event_loop_lag_seconds_count" not in after:
        return {}
    count = after["jachat_event_loop_lag_seconds_count"] - before["jachat_event_loop_lag_seconds_count"]
    buckets = sorted(
        (float(k.split('le="')[1].rstrip('"}')), after[k] - before.get(k, 0.0))
        for k in after
        if "_bucket{" in k and "+Inf" not in k
    )

    def bound(q: float) -> float:
        return next((le for le, n in buckets if n >= q * count), float("inf"))

    over_50ms = count - next(n for le, n in buckets if le == 0.05)
    return {
        "samples": count,
        "p50_ms_at_most": 1000 * bound(0.5),
        "p99_ms_at_most": 1000 * bound(0.99),
        "share_over_50ms": over_50ms / count if count else 0.0,
    }


async def _call(stub: chat_pb2_grpc.ChatServiceAsyncStub, method: str, request: Any, timeout: float) -> str:
    try:
        await getattr(stub, method)(request, timeout=timeout)
        return "OK"
    except grpc.aio.AioRpcError as error:
        return str(error.code().name)


@dataclass
class _Watch:
    """What the health prober and the normal stream saw during one phase, and its figures."""

    health_ms: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    gaps_ms: list[float] = field(default_factory=list)

    def watchers(self, target: str, stop_at: float) -> list[Awaitable[None]]:
        return [
            _probe_health(target, stop_at, self.health_ms, self.failures),
            _stream_normally(target, stop_at, self.gaps_ms),
        ]

    def figures(self, prefix: str = "") -> dict[str, Any]:
        return {
            f"{prefix}health_checks": len(self.health_ms),
            f"{prefix}health_failures": self.failures,
            f"{prefix}health_p50_ms": percentile(self.health_ms, 0.5),
            f"{prefix}health_p99_ms": percentile(self.health_ms, 0.99),
            f"{prefix}health_max_ms": max(self.health_ms, default=float("nan")),
            f"{prefix}stream_gaps": len(self.gaps_ms),
            f"{prefix}stream_worst_gap_ms": max(self.gaps_ms, default=float("nan")),
            f"{prefix}stream_gap_p99_ms": percentile(self.gaps_ms, 0.99),
        }


async def _probe_health(target: str, stop_at: float, health_ms: list[float], failures: list[str]) -> None:
    """Health every 50 ms with a 1 s timeout, as a liveness probe: each check's latency, each failure's code."""
    async with grpc.aio.insecure_channel(target) as channel:
        health = health_stub(channel)
        while time.monotonic() < stop_at:
            started = time.perf_counter()
            try:
                await health.Check(health_pb2.HealthCheckRequest(service="jachat.v1.ChatService"), timeout=1)
            except grpc.aio.AioRpcError as error:
                failures.append(error.code().name)
            health_ms.append(1000 * (time.perf_counter() - started))
            await asyncio.sleep(0.05)


async def _stream_normally(target: str, stop_at: float, gaps_ms: list[float]) -> None:
    """One normal client streaming greedy replies: the gaps between its messages."""
    sampling = chat_pb2.SamplingParams(temperature=0, repetition_penalty=1.0, max_new_tokens=64)
    request = chat_pb2.GenerateStreamRequest(
        turns=[chat_pb2.Turn(speaker=chat_pb2.SPEAKER_USER, text="今日は良い天気ですね。")], sampling=sampling
    )
    async with grpc.aio.insecure_channel(target) as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        while time.monotonic() < stop_at:
            last = None
            try:
                async for _ in stub.GenerateStream(request, timeout=60):
                    now = time.perf_counter()
                    if last is not None:
                        gaps_ms.append(1000 * (now - last))
                    last = now
            except grpc.aio.AioRpcError as error:  # refused while the abusers fill the queue: try again soon
                if error.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                    raise
                await asyncio.sleep(0.05)


async def phase_one(target: str, duration: float, clients: int) -> dict[str, Any]:
    heavy = heavy_requests()
    stop_at = time.monotonic() + duration
    watch = _Watch()
    outcomes: dict[str, dict[str, int]] = {name: {} for name in heavy}

    async def abuser(offset: int) -> None:
        names = list(heavy)
        async with grpc.aio.insecure_channel(target) as channel:
            stub = chat_pb2_grpc.ChatServiceStub(channel)
            i = offset
            while time.monotonic() < stop_at:
                name = names[i % len(names)]
                method, request = heavy[name]
                code = await _call(stub, method, request, timeout=60)
                outcomes[name][code] = outcomes[name].get(code, 0) + 1
                i += 1

    await asyncio.gather(*watch.watchers(target, stop_at), *(abuser(i) for i in range(clients)))
    return {
        **watch.figures(),
        "abuse_outcomes": outcomes,
    }


async def phase_two(server: ServerProcess, attempts: int, bursts: int = 3) -> dict[str, Any]:
    """Phase 2, then the burst phase, on the queue the same fillers keep full."""
    heavy = heavy_requests()
    long = chat_pb2.GenerateRequest(
        turns=[chat_pb2.Turn(speaker=chat_pb2.SPEAKER_USER, text="やあ")],
        sampling=chat_pb2.SamplingParams(max_new_tokens=1900, min_new_tokens=1900),
    )
    refusals: dict[str, list[float]] = {}
    codes: dict[str, dict[str, int]] = {}
    done = asyncio.Event()

    def queue_full() -> bool:
        return server.scrape().get("jachat_queue_size", 0) >= QUEUE

    async def full() -> None:
        deadline = time.monotonic() + 30
        while not queue_full():  # measured only against a full queue
            if time.monotonic() > deadline:
                raise RuntimeError("the queue did not fill")
            await asyncio.sleep(0.02)

    async with grpc.aio.insecure_channel(server.target) as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)

        async def filler() -> None:
            """Keeps the queue full: a refused call tries again, a finished one starts the next."""
            while not done.is_set():
                if await _call(stub, "Generate", long, 120) != "OK":
                    await asyncio.sleep(0.05)  # not a storm of refusals: that would be measured too

        # a few more than two replicas' batches and the queue hold, so a freed place is taken again at once
        fillers = [asyncio.ensure_future(filler()) for _ in range(QUEUE + 2 * BATCH + 4)]
        try:
            for name in ("generate_4mb", "generate_4mb_drop", "generate_256_turns_drop", "generate_budget_drop"):
                method, request = heavy[name]
                for _ in range(attempts):
                    await full()
                    started = time.perf_counter()
                    code = await _call(stub, method, request, timeout=30)
                    refusals.setdefault(name, []).append(1000 * (time.perf_counter() - started))
                    seen = codes.setdefault(name, {})
                    seen[code] = seen.get(code, 0) + 1
            burst: dict[str, list[float]] = {}
            floor: dict[str, list[float]] = {}
            with floor_server() as floor_target:
                for _ in range(bursts):  # jachat's burst and the floor's, in turn, under the same load
                    await full()
                    _merge(burst, await _burst(server.target))
                    _merge(floor, await _burst(floor_target))
        finally:
            done.set()
            for task in fillers:
                task.cancel()
            await asyncio.gather(*fillers, return_exceptions=True)
    everything = [ms for values in refusals.values() for ms in values]
    refused, bare = burst.get("RESOURCE_EXHAUSTED", []), floor.get("RESOURCE_EXHAUSTED", [])
    return {
        "refusal_codes": codes,
        "refusal_p50_ms": percentile(everything, 0.5),
        "refusal_max_ms": max(everything),
        "refusal_ms_by_request": {k: {"p50": percentile(v, 0.5), "max": max(v)} for k, v in refusals.items()},
        "burst_codes": {code: len(v) for code, v in burst.items()},
        "burst_refusal_p50_ms": percentile(refused, 0.5),
        "burst_refusal_max_ms": max(refused, default=float("nan")),
        "burst_floor_codes": {code: len(v) for code, v in floor.items()},
        "burst_floor_p50_ms": percentile(bare, 0.5),
        "burst_floor_max_ms": max(bare, default=float("nan")),
        "burst_refusal_max_ratio": max(refused, default=float("nan")) / max(bare, default=float("nan")),
    }


def _merge(into: dict[str, list[float]], more: dict[str, list[float]]) -> None:
    for code, values in more.items():
        into.setdefault(code, []).extend(values)


async def _burst(target: str, calls: int = BURST) -> dict[str, list[float]]:
    """`calls` one-token GenerateStream calls opened at once on one new (connected) channel: each one's outcome and
    how long it took, in ms."""
    request = chat_pb2.GenerateStreamRequest(
        turns=[chat_pb2.Turn(speaker=chat_pb2.SPEAKER_USER, text="やあ")],
        sampling=chat_pb2.SamplingParams(max_new_tokens=1),
    )
    async with grpc.aio.insecure_channel(target) as channel:
        await channel.channel_ready()
        stub = chat_pb2_grpc.ChatServiceStub(channel)

        async def one() -> tuple[str, float]:
            started = time.perf_counter()
            try:
                async for _ in stub.GenerateStream(request, timeout=60):
                    pass
                code = "OK"
            except grpc.aio.AioRpcError as error:
                code = str(error.code().name)
            return code, 1000 * (time.perf_counter() - started)

        outcomes: dict[str, list[float]] = {}
        for code, ms in await asyncio.gather(*(one() for _ in range(calls))):
            outcomes.setdefault(code, []).append(ms)
        return outcomes


@contextlib.contextmanager
def floor_server() -> Any:
    """A bare grpc.aio server in a child process, with jachat's stream cap, that refuses every GenerateStream
    (RESOURCE_EXHAUSTED) and does nothing else: its target."""
    code = "import asyncio, jachat.bench.abuse as a; asyncio.run(a.serve_floor())"
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        yield f"127.0.0.1:{int(process.stdout.readline())}"
    finally:
        process.kill()
        process.wait()


async def serve_floor() -> None:
    async def refuse(request: Any, context: Any) -> None:
        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "the queue is full")

    handler: grpc.RpcMethodHandler[Any, Any] = grpc.unary_stream_rpc_method_handler(
        refuse, request_deserializer=chat_pb2.GenerateStreamRequest.FromString
    )
    server = grpc.aio.server(options=[("grpc.max_concurrent_streams", 128)])
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("jachat.v1.ChatService", {"GenerateStream": handler}),)
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(port, flush=True)
    await server.wait_for_termination()


def served_model(http_port: int) -> str:
    import http.client

    connection = http.client.HTTPConnection("127.0.0.1", http_port, timeout=30)
    try:
        connection.request("GET", "/v1/models")
        return str(json.loads(connection.getresponse().read())["data"][0]["id"])
    finally:
        connection.close()


async def phase_http(target: str, http_port: int, duration: float, model: str) -> dict[str, Any]:
    import gzip
    import socket

    stop_at = time.monotonic() + duration
    watch = _Watch()
    answers: dict[str, dict[str, int]] = {"gzip_bomb": {}, "gzip_to_health": {}, "unread_stream": {}}
    bomb = gzip.compress(b"\0" * (6 * 1024 * 1024))
    chat = json.dumps(
        {"model": model, "messages": [{"role": "user", "content": "やあ"}], "stream": True, "max_tokens": 64}
    ).encode()

    def tally(kind: str, reply: bytes) -> None:
        status = reply[9:12].decode("ascii", "replace") if reply.startswith(b"HTTP/1.") else "closed"
        answers[kind][status] = answers[kind].get(status, 0) + 1

    async def exchange(head: bytes, body: bytes, read: bool = True) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", http_port)
        try:
            writer.write(head + b"\r\n\r\n" + body)
            with contextlib.suppress(ConnectionError):
                await writer.drain()
            return await asyncio.wait_for(reader.read(256), 30) if read else b""
        except (ConnectionError, asyncio.TimeoutError):
            return b""
        finally:
            writer.close()

    async def compressor() -> None:
        while time.monotonic() < stop_at:
            head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Encoding: gzip\r\n"
            tally("gzip_bomb", await exchange(head + f"Content-Length: {len(bomb)}".encode(), bomb))
            head = b"GET /health HTTP/1.1\r\nHost: x\r\nContent-Encoding: gzip\r\n"
            tally("gzip_to_health", await exchange(head + f"Content-Length: {len(bomb)}".encode(), bomb))

    async def unread() -> None:
        while time.monotonic() < stop_at:
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", http_port))
            reader, writer = await asyncio.open_connection(sock=sock)
            head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            writer.write(head + f"Content-Length: {len(chat)}\r\n\r\n".encode() + chat)
            await writer.drain()
            await asyncio.sleep(3)  # reads nothing
            tally("unread_stream", await reader.read(16))
            writer.close()

    held: list[asyncio.StreamWriter] = []
    for i in range(240):  # 200 idle, 40 slow: within one peer's share (256), so the other abusers still get in
        with contextlib.suppress(OSError):
            _, writer = await asyncio.open_connection("127.0.0.1", http_port)
            if i >= 200:
                writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 999\r\n\r\n{")
            held.append(writer)
    try:
        await asyncio.gather(*watch.watchers(target, stop_at), compressor(), unread())
    finally:
        for writer in held:
            writer.close()
    return {
        **watch.figures("http_"),
        "http_connections_held": len(held),
        "http_answers": answers,
    }


async def _longest(fits: Any, text: str) -> str:
    """The longest prefix of `text` (in 2% steps) that `fits` (an async check) accepts: the context, not the
    character limit, bounds Score's candidates and completions' prompts."""
    length = len(text)
    while length > 16 and not await fits(text[:length]):
        length = int(length * 0.98)
    return text[:length]


def _post(port: int, path: str, body: object) -> tuple[int, bytes]:
    """One JSON POST to the HTTP port (on a worker thread: the benchmark's loop keeps probing)."""
    import http.client

    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    try:
        connection.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


async def phase_scoring(server: ServerProcess, duration: float) -> dict[str, Any]:
    port = server.http_port
    assert port is not None
    model = served_model(port)
    turns = [chat_pb2.Turn(speaker=chat_pb2.SPEAKER_USER, text="こんにちは")]
    [engine] = children(server.process.pid)
    outcomes: dict[str, dict[str, int]] = {"score_16": {}, "echo_16": {}}
    async with grpc.aio.insecure_channel(server.target) as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)

        async def scored(text: str) -> bool:
            request = chat_pb2.ScoreRequest(turns=turns, candidates=[text])
            return await _call(stub, "Score", request, 120) != "INVALID_ARGUMENT"

        async def echoed(text: str) -> bool:
            body = {"model": model, "prompt": text, "max_tokens": 0, "echo": True, "logprobs": 0}
            status, _ = await asyncio.to_thread(_post, port, "/v1/completions", body)
            return status != 400

        text = _TEXT * 100
        candidate, prompt = await _longest(scored, text[:2040]), await _longest(echoed, text[:2040])
        score = chat_pb2.ScoreRequest(turns=turns, candidates=[candidate] * 16)
        echo = {"model": model, "prompt": [prompt] * 16, "max_tokens": 0, "echo": True, "logprobs": 1}
        idle = rss_bytes(engine)
        peak = [idle]
        stop_at = time.monotonic() + duration
        watch = _Watch()

        def tally(kind: str, code: str) -> None:
            outcomes[kind][code] = outcomes[kind].get(code, 0) + 1

        async def scorer() -> None:
            while time.monotonic() < stop_at:
                tally("score_16", await _call(stub, "Score", score, 600))

        async def echoer() -> None:
            while time.monotonic() < stop_at:
                status, _ = await asyncio.to_thread(_post, port, "/v1/completions", echo)
                tally("echo_16", str(status))

        async def sample() -> None:
            while time.monotonic() < stop_at:
                peak[0] = max(peak[0], rss_bytes(engine))
                await asyncio.sleep(0.02)

        # one of each: the engine scores one job at a time, so more callers only wait longer in the queue
        await asyncio.gather(*watch.watchers(server.target, stop_at), sample(), scorer(), echoer())
    return {
        **watch.figures("scoring_"),
        "scoring_outcomes": outcomes,
        "scoring_candidate_characters": len(candidate),
        "scoring_echo_prompt_characters": len(prompt),
        "scoring_engine_rss_idle_mib": idle / 2**20,
        "scoring_engine_rss_peak_mib": peak[0] / 2**20,
        "scoring_engine_rss_growth_mib": (peak[0] - idle) / 2**20,
    }


def run_abuse(
    model: Path, duration: float, clients: int, serve_args: Sequence[str] = (), attempts: int = 10
) -> dict[str, Any]:
    flags = ("--max-queued-requests", str(QUEUE), "--max-batch-size", str(BATCH), "--http-host", "127.0.0.1")
    server = spawn(model, *flags, "--http-port", "0", *serve_args)
    try:
        time.sleep(1.0)
        before = _lag_histogram(server)
        first = asyncio.run(phase_one(server.target, duration, clients))
        first["event_loop_lag"] = _lag_summary(before, _lag_histogram(server))
        assert server.http_port is not None
        before = _lag_histogram(server)
        over_http = asyncio.run(phase_http(server.target, server.http_port, duration, served_model(server.http_port)))
        over_http["http_event_loop_lag"] = _lag_summary(before, _lag_histogram(server))
        first.update(over_http)
        before = _lag_histogram(server)
        scoring = asyncio.run(phase_scoring(server, duration))
        scoring["scoring_event_loop_lag"] = _lag_summary(before, _lag_histogram(server))
        first.update(scoring)
        second = asyncio.run(phase_two(server, attempts))
    finally:
        exit_code = server.stop()
    return {**first, **second, "server_exit_code": exit_code}


def abuse_main(
    model: Path, duration: float, clients: int, serve_args: Sequence[str], output: Path | None, meta: dict[str, Any]
) -> int:
    result = run_abuse(model, duration, clients, ["--device", "cpu", *serve_args])
    lag = result["event_loop_lag"]
    print(
        f"abuse: {clients} clients for {duration:.0f} s; {result['health_checks']} health checks "
        f"({len(result['health_failures'])} failed), {result['stream_gaps']} stream gaps; loop lag p50 <= "
        f"{lag.get('p50_ms_at_most', 'n/a')} ms, p99 <= {lag.get('p99_ms_at_most', 'n/a')} ms, "
        f"{100 * lag.get('share_over_50ms', float('nan')):.1f}% over 50 ms"
    )
    print(f"heavy requests: {json.dumps(result['abuse_outcomes'])}")
    print(f"refusals when full: {json.dumps(result['refusal_codes'])}")
    print(
        f"burst of {BURST} streams on one connection: {json.dumps(result['burst_codes'])}, refused in p50 "
        f"{result['burst_refusal_p50_ms']:.0f} / max {result['burst_refusal_max_ms']:.0f} ms; a bare grpc.aio server "
        f"beside it: {json.dumps(result['burst_floor_codes'])}, p50 {result['burst_floor_p50_ms']:.0f} / max "
        f"{result['burst_floor_max_ms']:.0f} ms"
    )
    print(f"HTTP abuse answers: {json.dumps(result['http_answers'])} ({result['http_connections_held']} held open)")
    print(
        f"Score/echo answers: {json.dumps(result['scoring_outcomes'])}; engine RSS "
        f"{result['scoring_engine_rss_idle_mib']:.0f} MiB idle, {result['scoring_engine_rss_peak_mib']:.0f} MiB at "
        f"most (16 candidates of {result['scoring_candidate_characters']} characters, 16 echoed prompts of "
        f"{result['scoring_echo_prompt_characters']})"
    )
    checks = [(what, result[key], limit, result[key] < limit) for what, key, limit in TARGETS]
    checks.append(("health checks failed", len(result["health_failures"]), 0, not result["health_failures"]))
    failed = len(result["http_health_failures"])
    checks.append(("HTTP abuse: health checks failed", failed, 0, not failed))
    failed = len(result["scoring_health_failures"])
    checks.append(("Score/echo: health checks failed", failed, 0, not failed))
    for what, value, limit, met in checks:
        print(f"{what:<40} {value:10.1f}  target < {limit:<6g} {'met' if met else 'NOT MET'}")
    if output is not None:
        document = {
            "abuse": result,
            "checks": [{"what": w, "value": v, "target": t, "met": m} for w, v, t, m in checks],
        }
        write_report(output, document)
    return 0 if all(m for *_, m in checks) else 1
