"""The engine process (engine/core.py) and the server's side of it (engine/link.py), on the real model: rows stop
within a token of their flag, budgets are exact, a failed batch is one batch's failure, a dead engine fails its
batches at once; and through the server: a killed engine ends every stream UNAVAILABLE and the server exits 1, a
stalled edge gets the reply coalesced, and the metrics add up to what the calls saw."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2

from jachat.bench.processes import children
from jachat.manifest import read_manifest
from jachat.service.domain.errors import EngineFailure, EngineLost
from jachat.service.engine.link import EngineProcess
from jachat.service.engine.wire import CoreOptions
from jachat.v1 import chat_pb2, chat_pb2_grpc
from tests.helpers import greedy, health_stub, user, wait_until
from tests.servers import InProcessServer, serving

LONG = 1900  # tokens: a second or more of work for this model, so the test halts a row long before its end
GREEDY_LONG = {"sampling_topk": 1, "min_length": LONG}  # no </s>: every row runs to its budget or its flag


class Row:
    """A row that records what reached it, and can stop itself at a token or be halted from another thread."""

    def __init__(self, prompt_ids: list[int], max_new_tokens: int, stop_at: int | None = None) -> None:
        self.prompt_ids = prompt_ids
        self.max_new_tokens = max_new_tokens
        self.stop_at = stop_at
        self.halt: Any = lambda: None
        self.times: list[float] = []  # the engine's time of each token
        self.stopped_at: float | None = None  # once its stop flag is set (time.monotonic, the engine's clock too)
        self.failed: BaseException | None = None  # what the receiver ended it with, if its on_token failed

    @property
    def seed(self) -> int | None:
        return None

    def on_token(self, token_id: int, log_prob: float | None, at: float) -> bool:
        self.times.append(at)
        if self.stop_at is not None and len(self.times) == self.stop_at and self.stopped_at is None:
            self.stop()  # as a sequence's finish() does when its reply ends
            return True
        return False

    def fail(self, error: BaseException) -> None:
        self.failed = error

    def stop(self) -> None:
        self.halt()
        self.stopped_at = time.monotonic()

    def after_stop(self) -> int:
        """Tokens the engine generated after the row asked to stop."""
        assert self.stopped_at is not None
        return sum(at > self.stopped_at for at in self.times)


@pytest.fixture
def engine(model_f32: Path) -> Iterator[EngineProcess]:
    manifest = read_manifest(model_f32)
    options = CoreOptions(
        model_f32, manifest.quantization, manifest.shape.context_length, eos_id=3, device="cpu", replicas=1,
        intra_threads=1, warm_up=False,
    )  # fmt: skip
    process = EngineProcess(options, 16)
    yield process
    process.close()


def test_rows_stop_within_a_token_of_their_flag_and_budgets_are_exact(engine: EngineProcess) -> None:
    """A row that asks to stop (a stop string, seen when its token reached the server) and a row halted from another
    thread (a cancel, a deadline) each get at most one token generated after that moment; a row's own max_new_tokens
    is exact in a longer batch; the other rows run on."""
    prompt = list(range(100, 110))
    asks, halted, full, short = Row(prompt, LONG, stop_at=5), Row(prompt, LONG), Row(prompt, LONG), Row(prompt, 7)
    runner = threading.Thread(target=engine.run, args=([asks, halted, full, short], LONG, GREEDY_LONG))
    runner.start()
    wait_until(lambda: len(halted.times) >= 10, "ten tokens of the row to halt")
    halted.stop()
    runner.join(60)
    assert not runner.is_alive()
    assert asks.after_stop() <= 1 and len(asks.times) < LONG
    assert halted.after_stop() <= 1 and len(halted.times) < LONG
    assert (len(full.times), len(short.times)) == (LONG, 7)


def test_a_failed_batch_fails_alone_and_the_engine_runs_on(engine: EngineProcess) -> None:
    with pytest.raises(EngineFailure):
        engine.run([Row([100, 101], 5)], 5, {"sampling_topk": -3})  # CTranslate2 refuses it
    row = Row([100, 101], 5)
    engine.run([row], 5, {"sampling_topk": 1, "min_length": 5})
    assert len(row.times) == 5


def test_a_killed_engine_fails_its_batch_at_once_and_every_later_one(model_f32: Path) -> None:
    manifest = read_manifest(model_f32)
    options = CoreOptions(model_f32, manifest.quantization, manifest.shape.context_length, 3, device="cpu")
    lost: list[str] = []
    process = EngineProcess(options, 16, lost.append)
    row = Row(list(range(100, 110)), LONG)
    failure: list[BaseException] = []

    def run() -> None:
        try:
            process.run([row], LONG, GREEDY_LONG)
        except BaseException as exc:  # the test looks at it
            failure.append(exc)

    runner = threading.Thread(target=run)
    runner.start()
    try:
        wait_until(lambda: len(row.times) >= 5, "the batch generates")
        os.kill(process.pid, signal.SIGKILL)
        runner.join(30)
        assert not runner.is_alive() and len(row.times) < LONG  # it never ran to its end
        assert isinstance(failure[0], EngineLost) and "killed by SIGKILL" in str(failure[0])
        assert lost == [str(failure[0])]
        with pytest.raises(EngineLost):
            process.run([Row([100], 3)], 3, {})
    finally:
        process.close()


def test_a_killed_engine_ends_every_stream_unavailable_and_the_server_exits_1(model_f32: Path) -> None:
    """SIGKILL to the engine process mid-stream: the streams end UNAVAILABLE at once (not at their deadline), health
    turns NOT_SERVING, and the server exits 1 for Kubernetes to restart the pod. The server process itself never
    loaded CTranslate2: the engine process holds it."""
    with serving(model_f32, "--replicas", "1", process=True) as server:
        (engine_pid,) = children(server.process.pid)
        assert "libctranslate2" in Path(f"/proc/{engine_pid}/maps").read_text()
        assert "libctranslate2" not in Path(f"/proc/{server.process.pid}/maps").read_text()

        async def scenario() -> tuple[list[grpc.StatusCode], list[Any], float]:
            async with grpc.aio.insecure_channel(server.target) as channel:
                stub = chat_pb2_grpc.ChatServiceStub(channel)
                watch = health_stub(channel).Watch(health_pb2.HealthCheckRequest(service=""))
                statuses = [(await watch.read()).status]
                sampling = greedy(1900, min_new_tokens=1900)
                calls = [
                    stub.GenerateStream(chat_pb2.GenerateStreamRequest(turns=[user(t)], sampling=sampling), timeout=120)
                    for t in ("こんにちは", "吾輩は猫である", "日本の首都は")
                ]
                await calls[0].read()  # it generates (the others generate beside it, or wait for the replica)
                os.kill(engine_pid, signal.SIGKILL)
                killed = time.monotonic()
                codes = []
                for call in calls:
                    with pytest.raises(grpc.aio.AioRpcError) as ended:
                        while await call.read() is not grpc.aio.EOF:
                            pass
                    codes.append(ended.value.code())
                ended_after = time.monotonic() - killed
                with contextlib.suppress(grpc.aio.AioRpcError):  # unless the server was already gone
                    statuses.append((await watch.read()).status)
                return codes, statuses, ended_after

        codes, statuses, ended_after = asyncio.run(scenario())
        assert codes == [grpc.StatusCode.UNAVAILABLE] * 3
        assert ended_after < 60  # their deadline was 120 s away
        assert statuses[0] == health_pb2.HealthCheckResponse.SERVING
        assert statuses[1:] in ([], [health_pb2.HealthCheckResponse.NOT_SERVING])
        assert server.process.wait(30) == 1
        log = "".join(server.log)
        assert f"the engine process (pid {engine_pid}) killed by SIGKILL" in log
        assert "every call in flight ends UNAVAILABLE" in log


@pytest.fixture(scope="module")
def in_process(model_f32: Path) -> Iterator[InProcessServer]:
    with serving(model_f32, "--replicas", "1", "--max-batch-size", "16") as server:
        yield server


def test_a_stalled_edge_gets_the_rest_of_the_reply_in_one_message_that_adds_up(in_process: InProcessServer) -> None:
    """While the edge keeps up, one message per token; when it falls behind (here its event loop is held until the
    whole reply has been generated), the next message carries everything generated since: text and tokens that add
    up exactly to the unary reply."""
    server = in_process
    request = chat_pb2.GenerateStreamRequest(turns=[user("こんにちは")], sampling=greedy(120, min_new_tokens=120))
    with server.channel() as channel:
        stub = server.stub(channel)
        whole = stub.Generate(chat_pb2.GenerateRequest(turns=request.turns, sampling=request.sampling))
        finished = server.scrape()['jachat_finished_total{reason="length"}']
        stream = stub.GenerateStream(request)
        first = next(stream)

        def hold_the_loop() -> None:  # a busy edge: nothing runs on the loop until the reply is generated
            wait_until(
                lambda: server.scrape()['jachat_finished_total{reason="length"}'] > finished, "the reply is generated"
            )

        server.loop.call_soon_threadsafe(hold_the_loop)
        messages = [first, *stream]
    tokens = [t.id for m in messages for t in m.tokens]
    assert "".join(m.text for m in messages) == whole.text
    assert tokens == [t.id for t in whole.tokens]
    assert len(messages) < len(tokens) and max(len(m.tokens) for m in messages) > 10


def test_metrics_after_a_mixed_workload_equal_what_the_calls_saw(in_process: InProcessServer) -> None:
    """Streams and unary calls, greedy and sampled, with and without log-probabilities, ended by length, by a stop
    string and by </s>, all at once: the counters move by exactly what the callers were told."""
    server = in_process
    before = server.scrape()

    async def scenario() -> list[tuple[str, chat_pb2.Usage, int]]:
        async with grpc.aio.insecure_channel(server.target) as channel:
            stub = chat_pb2_grpc.ChatServiceStub(channel)

            async def stream(text: str, sampling: chat_pb2.SamplingParams, logprobs: bool) -> tuple[Any, ...]:
                options = chat_pb2.ResponseOptions(token_logprobs=logprobs)
                request = chat_pb2.GenerateStreamRequest(turns=[user(text)], sampling=sampling, response=options)
                messages = [message async for message in stub.GenerateStream(request)]
                last = messages[-1]
                return chat_pb2.FinishReason.Name(last.finish_reason), last.usage, 1

            async def unary(text: str, sampling: chat_pb2.SamplingParams) -> tuple[Any, ...]:
                reply = await stub.Generate(chat_pb2.GenerateRequest(turns=[user(text)], sampling=sampling))
                return chat_pb2.FinishReason.Name(reply.finish_reason), reply.usage, 0

            sampled = chat_pb2.SamplingParams(temperature=0.7, top_k=50, max_new_tokens=30)
            calls = [
                stream("こんにちは", greedy(25, min_new_tokens=25), False),
                stream("吾輩は猫である", greedy(25, min_new_tokens=25), True),
                stream("日本の首都は", sampled, False),
                unary("おすすめの本", greedy(12)),
                unary("こんにちは", greedy(40, stop=["の"])),
                stream("明日は雨", greedy(60), True),
            ]
            return list(await asyncio.gather(*calls))

    seen = asyncio.run(scenario())
    after = server.scrape()

    def moved(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    completion = sum(u.completion_tokens for _, u, _ in seen)
    assert moved("jachat_generated_tokens_total") == completion
    assert moved("jachat_prompt_tokens_total") == sum(u.prompt_tokens for _, u, _ in seen)
    assert moved("jachat_time_to_first_token_seconds_count") == len(seen)
    assert moved("jachat_inter_token_latency_seconds_count") == completion - len(seen)
    reasons = {"FINISH_REASON_LENGTH": "length", "FINISH_REASON_STOP": "stop", "FINISH_REASON_END_OF_TURN": "eos"}
    for reason, label in reasons.items():
        assert moved(f'jachat_finished_total{{reason="{label}"}}') == sum(r == reason for r, _, _ in seen), reason
    streams = sum(s for _, _, s in seen)
    assert moved('jachat_requests_total{api="grpc",code="OK",rpc="GenerateStream"}') == streams
    assert moved('jachat_requests_total{api="grpc",code="OK",rpc="Generate"}') == len(seen) - streams
    assert after["jachat_running_requests"] == 0 and after["jachat_queue_size"] == 0
    assert after["jachat_engine_resident_memory_bytes"] > 0  # the engine process, read at the scrape


def test_the_engine_process_exits_when_the_server_is_killed(model_f32: Path) -> None:
    with serving(model_f32, "--replicas", "1", process=True) as server:
        (engine_pid,) = children(server.process.pid)
        server.process.kill()
        server.process.wait()
        wait_until(lambda: not Path(f"/proc/{engine_pid}").exists() or _state(engine_pid) == "Z", "the engine exits")


def _state(pid: int) -> str:
    """A process's state letter (Z: a zombie, gone but not yet reaped by its parent)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"
