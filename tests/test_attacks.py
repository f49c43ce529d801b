"""What a caller (or a sick engine) can do to the server, as the edge issue found it, each against a real server on
the float32 demo model: a Score or echo caller that leaves mid-job, scoring's memory, scoring that starved
generation out of sight, HTTP deadlines in the queue, a frozen engine, and the drain with scoring in flight. Each
test failed on the code before its fix."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2

from jachat.bench.processes import children
from jachat.service.edge.grpc.protocol import CHAT_SERVICE
from jachat.v1 import chat_pb2
from tests.helpers import greedy, health_stub, user, wait_until
from tests.servers import InProcessServer, Server, serving
from tests.test_http_api import http_flags, model_id, request

TEXT = "吾輩は猫である。名前はまだ無い。どこで生れたかとんと見当がつかぬ。" * 80
LONG_CANDIDATE = TEXT[:1900]  # about 1,900 tokens: a second or more of scoring on this model, one replica


def score_request(
    *candidates: str, priority: chat_pb2.Priority.ValueType = chat_pb2.PRIORITY_INTERACTIVE
) -> chat_pb2.ScoreRequest:
    return chat_pb2.ScoreRequest(turns=[user("こんにちは")], candidates=list(candidates), priority=priority)


def post(
    server: Server, path: str, body: object, headers: dict[str, str] | None = None, timeout: float = 60
) -> tuple[int, bytes]:
    assert server.http_port is not None
    connection = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=timeout)
    try:
        connection.request("POST", path, json.dumps(body), {"Content-Type": "application/json", **(headers or {})})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def hang_up_after(server: Server, path: str, body: object, seconds: float) -> None:
    """Send a call and hang up after `seconds` without its answer, as a client whose own timeout fired."""
    with contextlib.suppress(socket.timeout, TimeoutError):
        post(server, path, body, timeout=seconds)


def engine_of(server: InProcessServer) -> Any:
    engine = server.service.calls.engine_
    assert engine is not None
    return engine


def generate_ok(server: Server, timeout: float = 30) -> chat_pb2.GenerateResponse:
    with server.channel() as channel:
        reply: chat_pb2.GenerateResponse = server.stub(channel).Generate(
            chat_pb2.GenerateRequest(turns=[user("こんにちは")], sampling=greedy(4)), timeout=timeout
        )
        return reply


def model_health(server: Server, timeout: float = 5) -> int:
    with server.channel() as channel:
        status: int = (
            health_stub(channel).Check(health_pb2.HealthCheckRequest(service=CHAT_SERVICE), timeout=timeout).status
        )
        return status


@pytest.fixture(scope="module")
def one_replica(model_f32: Path) -> Iterator[InProcessServer]:
    """One place (one replica of batches of one; the decode loop's one row): a scoring job or a long reply holds the
    whole engine, so whatever comes next waits for it."""
    flags = ("--replicas", "1", "--max-batch-size", "1", "--engine-stall-seconds", "1")
    with serving(model_f32, *flags, *http_flags()) as running:
        yield running


def test_a_score_call_whose_deadline_passes_mid_job_harms_no_later_call(one_replica: InProcessServer) -> None:
    """Defect 1 (gRPC): the deadline passes while the engine scores; when the job ends, its result has nobody to go
    to. The next Score (which waits for that job on the one replica) and a generation must still be answered."""
    with one_replica.channel() as channel:
        stub = one_replica.stub(channel)
        with pytest.raises(grpc.RpcError) as late:
            stub.Score(score_request(LONG_CANDIDATE, LONG_CANDIDATE), timeout=0.3)
        assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        reply = stub.Score(score_request("東京です。"), timeout=30)
        assert len(reply.candidates) == 1 and reply.candidates[0].logprob < 0
    assert generate_ok(one_replica).usage.completion_tokens > 0
    assert engine_of(one_replica).core.liveness().receiving


def test_an_echo_call_whose_client_hangs_up_mid_job_harms_no_later_call(one_replica: InProcessServer) -> None:
    """Defect 1 (HTTP): a /v1/completions echo of 16 long prompts (a few seconds of scoring on one replica) whose
    client hangs up while they are scored."""
    model = model_id(one_replica)
    echo = {"model": model, "prompt": [LONG_CANDIDATE] * 16, "max_tokens": 0, "echo": True, "logprobs": 0}
    hang_up_after(one_replica, "/v1/completions", echo, 0.3)
    status, body = post(one_replica, "/v1/completions", {**echo, "prompt": "東京です。"}, timeout=30)
    assert status == 200, body
    assert json.loads(body)["choices"][0]["logprobs"]["token_logprobs"][1] < 0
    assert generate_ok(one_replica).usage.completion_tokens > 0


def peak_while(sample: Callable[[], int], work: Callable[[], object]) -> tuple[int, object]:
    """The highest value `sample` gives (every 5 ms) while `work` runs, and what `work` returned."""
    peak, done = [sample()], threading.Event()

    def watch() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], sample())
            done.wait(0.005)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        result = work()
    finally:
        done.set()
        watcher.join()
    return max(peak[0], sample()), result


def test_scoring_the_longest_candidates_of_unequal_lengths_stays_within_a_gib_of_the_engines_memory(
    one_replica: InProcessServer,
) -> None:
    """Defect 2: CTranslate2 holds two float vectors of the vocabulary per position it scores (and pads a batch to
    its longest row): five long candidates in one call took the engine's memory up by gigabytes. Scored a piece
    at a time, the engine stays within 1 GiB of its idle size."""
    core = engine_of(one_replica).core
    idle = core.rss()
    candidates = [TEXT[: 1900 - 60 * i] for i in range(5)]

    def score() -> chat_pb2.ScoreResponse:
        with one_replica.channel() as channel:
            reply: chat_pb2.ScoreResponse = one_replica.stub(channel).Score(score_request(*candidates), timeout=120)
            return reply

    peak, reply = peak_while(core.rss, score)
    assert isinstance(reply, chat_pb2.ScoreResponse) and len(reply.candidates) == 5
    assert peak - idle < 2**30, f"the engine grew by {(peak - idle) / 2**20:.0f} MiB while scoring"


def test_a_big_echo_answer_is_built_off_the_event_loop(
    one_replica: InProcessServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Defect 3: 16 echoed contexts with log-probabilities are a 2 MiB answer; building and serialising it on the
    event loop stalled health checks and every stream for hundreds of milliseconds. Whole and streamed, a big echo's
    log-probabilities are built on a worker thread, never on the loop's."""
    from jachat.service.edge.http.response import logprobs_body as build

    threads: list[str] = []

    def recorded(*args: Any, **kwargs: Any) -> Any:
        threads.append(threading.current_thread().name)
        return build(*args, **kwargs)

    monkeypatch.setattr("jachat.service.edge.http.completions.logprobs_body", recorded)
    model = model_id(one_replica)
    echo = {"model": model, "prompt": [TEXT[:1000]] * 4, "max_tokens": 0, "echo": True, "logprobs": 1}
    status, body = post(one_replica, "/v1/completions", echo)
    assert status == 200, body
    assert len(json.loads(body)["choices"]) == 4 and len(threads) == 4
    status, body = post(one_replica, "/v1/completions", {**echo, "prompt": TEXT[:1000], "stream": True})
    assert status == 200 and body.rstrip().endswith(b"data: [DONE]"), body[-200:]
    assert len(threads) == 5
    loop = one_replica._thread.name
    assert loop not in threads, f"built on the event loop's thread: {threads}"


def test_http_deadlines_are_kept_while_the_call_waits_in_the_queue(one_replica: InProcessServer) -> None:
    """Defect 5: with the one place busy on a long reply, chat calls (whole and streamed) and an echo call with
    x-jachat-timeout: 1 end 504 at their deadline, while that reply still runs, not when it ends. The engine is
    stopped (SIGSTOP) once the long reply runs, so that reply cannot end first however fast the model is."""
    model = model_id(one_replica)
    long = chat_pb2.GenerateRequest(turns=[user("やあ")], sampling=greedy(1900, min_new_tokens=1900))
    chat = {"model": model, "messages": [{"role": "user", "content": "こんにちは"}], "max_tokens": 4}
    echo = {"model": model, "prompt": "東京です。", "max_tokens": 0, "echo": True, "logprobs": 0}
    before = one_replica.scrape()
    pid = engine_of(one_replica).core.pid
    with one_replica.channel() as channel, ThreadPoolExecutor(1) as pool:
        running = pool.submit(one_replica.stub(channel).Generate, long, timeout=120)
        wait_until(lambda: one_replica.scrape()["jachat_running_requests"] == 1 or running.done(), "the long reply")
        os.kill(pid, signal.SIGSTOP)
        try:
            for path, body in (("/v1/chat/completions", chat), ("/v1/chat/completions", {**chat, "stream": True})):
                status, text = post(one_replica, path, body, {"x-jachat-timeout": "1"})
                assert status == 504, text
                assert not running.done(), "answered only once the long reply ended"
            status, text = post(one_replica, "/v1/completions", echo, {"x-jachat-timeout": "1"})
            assert status == 504 and not running.done(), text
        finally:
            os.kill(pid, signal.SIGCONT)
        running.cancel()
    name = 'jachat_requests_total{api="http",code="DEADLINE_EXCEEDED",rpc="/v1/chat/completions"}'
    assert one_replica.scrape()[name] - before.get(name, 0.0) == 2


@pytest.fixture
def two_replicas(model_f32: Path) -> Iterator[InProcessServer]:
    with serving(model_f32, "--replicas", "2", *http_flags()) as running:
        yield running


def test_scoring_waits_in_the_queue_as_model_work_and_never_holds_every_replica(
    two_replicas: InProcessServer,
) -> None:
    """Defect 4: four batch-priority Score calls in flight are seen by the queue and running gauges (so the HPA and
    the gateway see the load), and an interactive Generate is answered while three of them at least still wait or
    run: scoring holds at most one place, and queued batch work goes after interactive calls."""
    with two_replicas.channel() as channel, ThreadPoolExecutor(4) as pool:
        stub = two_replicas.stub(channel)
        request = score_request(LONG_CANDIDATE, priority=chat_pb2.PRIORITY_BATCH)
        scores: list[Future[Any]] = [pool.submit(stub.Score, request, timeout=120) for _ in range(4)]

        def seen() -> bool:
            metrics = two_replicas.scrape()
            return metrics["jachat_running_requests"] >= 4 and metrics["jachat_queue_size"] >= 3

        wait_until(lambda: seen() or any(f.done() for f in scores), "the Score calls counted as running and queued")
        assert not any(f.done() for f in scores), "a Score call ended before the gauges saw them all"
        assert generate_ok(two_replicas).usage.completion_tokens > 0
        # the decode loop scores a piece between two steps (a piece: this job's one long candidate), then steps
        # for as long as it took: the call waits for the piece under way at most, never for the queue behind it
        assert sum(f.done() for f in scores) <= 1, "the interactive call waited for the scoring behind it"
        for future in scores:
            assert len(future.result().candidates) == 1
    metrics = two_replicas.scrape()
    assert metrics["jachat_running_requests"] == 0 and metrics["jachat_scored_tokens_total"] >= 4 * 1900


def test_a_frozen_engine_turns_health_not_serving_and_freezes_nothing_else(one_replica: InProcessServer) -> None:
    """Defect 6: the engine process stopped (SIGSTOP: the shape of a hung device call): the model's health turns
    NOT_SERVING within the stall time, an HTTP call ends at its deadline, a large Score call sent meanwhile does
    not block the event loop (health keeps answering), and all is well again once the engine runs."""
    model = model_id(one_replica)
    pid = engine_of(one_replica).core.pid
    chat = {"model": model, "messages": [{"role": "user", "content": "こんにちは"}], "max_tokens": 4}
    os.kill(pid, signal.SIGSTOP)
    try:
        wait_until(lambda: model_health(one_replica) == health_pb2.HealthCheckResponse.NOT_SERVING, "NOT_SERVING")
        with one_replica.channel() as channel:  # the process itself is alive: its own health stays SERVING
            alive = health_stub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
            assert alive.status == health_pb2.HealthCheckResponse.SERVING
        assert request(one_replica, "GET", "/health")[0] == 503
        assert post(one_replica, "/v1/chat/completions", chat, {"x-jachat-timeout": "1"})[0] == 504
        with one_replica.channel() as channel, ThreadPoolExecutor(1) as pool:
            big = score_request(*[TEXT[:1900]] * 16)
            scoring = pool.submit(one_replica.stub(channel).Score, big, timeout=4)
            for _ in range(8):  # the loop answers while the Score call waits on the frozen engine
                assert model_health(one_replica, timeout=2) == health_pb2.HealthCheckResponse.NOT_SERVING
            with pytest.raises(grpc.RpcError) as late:
                scoring.result()
            assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    finally:
        os.kill(pid, signal.SIGCONT)
    wait_until(lambda: model_health(one_replica) == health_pb2.HealthCheckResponse.SERVING, "SERVING again")
    assert generate_ok(one_replica).usage.completion_tokens > 0


def test_the_watchdog_ends_a_server_whose_engine_stays_frozen(model_f32: Path) -> None:
    """The watchdog: an engine silent past --engine-watchdog-seconds is killed, and the server exits 1 (for
    Kubernetes to restart the pod), leaving no process behind."""
    with serving(model_f32, "--engine-stall-seconds", "0.5", "--engine-watchdog-seconds", "2", process=True) as server:
        [engine] = children(server.process.pid)
        os.kill(engine, signal.SIGSTOP)
        try:
            assert server.process.wait(timeout=60) == 1
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(engine, signal.SIGCONT)
        log = "".join(server.log)
        assert "watchdog: the engine process said nothing for" in log, log[-2000:]
        wait_until(lambda: not Path(f"/proc/{engine}").exists(), "the engine process gone")


def test_the_drain_with_scoring_in_flight_keeps_its_grace(model_f32: Path) -> None:
    """Defect 7: SIGTERM with a dozen long Score calls in flight and queued: the drain ends them after its grace
    (the running job at its next piece), and the server exits 0 within a few seconds of it, without tracebacks."""
    with serving(model_f32, "--grace-seconds", "1", process=True) as server:
        with server.channel() as channel, ThreadPoolExecutor(12) as pool:
            stub = server.stub(channel)
            calls = [
                pool.submit(stub.Score, score_request(LONG_CANDIDATE, TEXT[:1800]), timeout=120) for _ in range(12)
            ]
            wait_until(lambda: server.scrape()["jachat_running_requests"] >= 12, "the Score calls in flight")
            began = time.monotonic()
            server.process.terminate()
            code = server.process.wait(timeout=60)
            took = time.monotonic() - began
            ended = [call.exception() for call in calls]  # a job that finished within the grace is answered
            assert all(isinstance(e, grpc.RpcError) and e.code() == grpc.StatusCode.UNAVAILABLE for e in ended if e)
            assert sum(e is not None for e in ended) >= 8, "the queued Score calls were not ended by the drain"
        assert code == 0
        assert took < 1 + 8, f"the drain took {took:.1f} s with a grace of 1 s"
        log = "".join(server.log)
        assert "Traceback" not in log, log[-3000:]


@pytest.mark.parametrize(
    ("path", "field", "value", "status"),
    [
        ("/v1/chat/completions", "top_p", 1e-50, 400),  # 0 as the engine's float32
        ("/v1/chat/completions", "repetition_penalty", 1e-50, 400),
        ("/v1/chat/completions", "repetition_penalty", 1e-45, 400),  # a float32 denormal: NaN log-probabilities
        ("/v1/chat/completions", "temperature", 1e-45, 200),  # too small to divide by: greedy
        ("/v1/chat/completions", "top_p", 1e-45, 200),  # a denormal above 0: the most likely token alone
        ("/v1/completions", "top_p", 1e-50, 400),
        ("/v1/completions", "repetition_penalty", 5e-324, 400),
    ],
)
def test_tiny_floats_get_the_status_grpc_gives_them_never_a_500(
    one_replica: InProcessServer, path: str, field: str, value: float, status: int
) -> None:
    """Defect 10: over HTTP a float is a double, over gRPC (and in the engine) a float32: 1e-50 passed the HTTP
    range check and reached CTranslate2 as 0. Every bound is now checked on the engine's float32, for both APIs."""
    model = model_id(one_replica)
    body: dict[str, Any] = {"model": model, "max_tokens": 4, field: value, "logprobs": True}
    if path == "/v1/completions":
        body = {**body, "prompt": "こんにちは", "logprobs": 0}
    else:
        body["messages"] = [{"role": "user", "content": "こんにちは"}]
    code, text = post(one_replica, path, body)
    assert code == status, text
    reply = json.loads(text)  # strict JSON: no NaN anywhere
    if status == 400:
        assert reply["error"]["param"] == field
    elif path == "/v1/chat/completions":
        assert all(entry["logprob"] <= 0 for entry in reply["choices"][0]["logprobs"]["content"])


def test_a_lone_surrogate_in_any_text_field_is_a_400_naming_it(one_replica: InProcessServer) -> None:
    """Defect 10: a completions prompt holding a lone surrogate (valid JSON, not text) was a 500."""
    model = model_id(one_replica)
    for path, body, field in (
        ("/v1/completions", f'{{"model": "{model}", "prompt": "a\\ud800b"}}', "prompt"),
        ("/v1/completions", f'{{"model": "{model}", "prompt": ["ok", "\\udfff"]}}', "prompt[1]"),
        ("/v1/chat/completions", f'{{"model": "{model}", "messages": [{{"role": "user", "content": "\\ud800"}}]}}',
         "messages[0].content"),
        ("/v1/chat/completions", f'{{"model": "{model}", "stop": "\\ud800", "messages": []}}', "stop"),
    ):  # fmt: skip
        code, _, text = request(one_replica, "POST", path, body.encode())
        assert code == 400, text
        assert json.loads(text)["error"]["param"] == field
    good = f'{{"model": "{model}", "prompt": "\\ud83d\\ude00", "max_tokens": 1}}'  # a pair is one character
    assert request(one_replica, "POST", "/v1/completions", good.encode())[0] == 200


def slow_body(port: int, source: str) -> socket.socket:
    """A connection from `source` that sends a request's head and one byte of its 1,000-byte body, then nothing."""
    connection = socket.create_connection(("127.0.0.1", port), timeout=30, source_address=(source, 0))
    head = "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000"
    connection.sendall(head.encode() + b"\r\n\r\n{")
    return connection


def test_slow_bodies_from_a_few_addresses_cannot_lock_http_out(model_f32: Path) -> None:
    """Defect 8: connections that send a head and one byte of body, from 8 addresses (each under its peer's
    share), filled the cap, and every other client, the readiness probe's GET /health included, was reset. Now a
    newcomer takes the place of the slowest of them, and is served."""
    flags = ("--max-http-connections", "64", *http_flags())
    with serving(model_f32, *flags) as server:
        assert server.http_port is not None and server.service.http is not None
        admission = server.service.http.admission
        slow = [slow_body(server.http_port, f"127.0.0.{2 + i % 8}") for i in range(64)]
        try:
            wait_until(lambda: len(admission.open) == 64, "the cap filled with slow bodies")
            assert request(server, "GET", "/health")[0] == 200
            chat = {"model": model_id(server), "messages": [{"role": "user", "content": "こんにちは"}], "max_tokens": 4}
            status, body = post(server, "/v1/chat/completions", chat)
            assert status == 200, body
            assert admission.displaced >= 2
        finally:
            for connection in slow:
                connection.close()


def test_when_every_connection_is_answered_health_is_still_answered(model_f32: Path) -> None:
    """Beyond a cap whose every place is being answered (two long streams), a newcomer may still ask for /health
    (the readiness probe must see a busy pod, not a dead one); anything else is a 503 in OpenAI's shape."""
    flags = ("--max-http-connections", "2", "--max-http-connections-per-peer", "2")
    with serving(model_f32, *flags, *http_flags()) as server:
        assert server.http_port is not None and server.service.http is not None
        body = json.dumps(
            {
                "model": model_id(server),
                "messages": [{"role": "user", "content": "長く"}],
                "stream": True,
                "max_tokens": 1500,
                "min_tokens": 1500,
            }
        ).encode()
        head = f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        streams: list[socket.socket] = []
        try:
            for _ in range(2):
                streams.append(socket.create_connection(("127.0.0.1", server.http_port), timeout=30))
                streams[-1].sendall(head + body)
                assert streams[-1].recv(64).startswith(b"HTTP/1.1 200")  # begun: it is being answered
            assert request(server, "GET", "/health")[0] == 200
            code, _, text = request(server, "GET", "/v1/models")
            assert code == 503 and json.loads(text)["error"]["message"].startswith("every HTTP connection"), text
        finally:
            for stream in streams:
                stream.close()
