"""The edge under hostile and busy traffic: streams released exactly once, deadlines recorded as deadlines,
bounded streams and connections, statuses that stay right however bad the request (real servers on loopback)."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2

from jachat.service.edge.identity import request_id_from
from jachat.v1 import chat_pb2, chat_pb2_grpc
from tests.helpers import details, greedy, health_stub, status_of, user, wait_until
from tests.servers import ServerProcess, serving, start

GET_MODEL_INFO = 'jachat_requests_total{api="grpc",code="OK",rpc="GetModelInfo"}'
LONG = chat_pb2.SamplingParams(temperature=0, repetition_penalty=1.0, max_new_tokens=1500, min_new_tokens=1500)


@pytest.fixture(scope="module")
def edge_server(model_f32: Path) -> Iterator[ServerProcess]:
    """A child process: its threads are counted, and its stderr searched for tracebacks."""
    with serving(model_f32, "--max-health-watchers", "3", "--grace-seconds", "20", process=True) as server:
        yield server


def problems_in_log(server: ServerProcess) -> list[str]:
    return [line for line in server.log if "Traceback" in line or "never retrieved" in line or "ERROR" in line]


def test_twenty_streams_cancelled_between_messages_are_released_and_sigterm_exits_at_once(model_f32: Path) -> None:
    server = start(model_f32, "--grace-seconds", "60", process=True)  # SIGTERM: a real process
    try:
        with server.channel() as channel:
            stub = server.stub(channel)
            for i in range(20):
                call = stub.GenerateStream(chat_pb2.GenerateStreamRequest(turns=[user(f"やあ{i}")], sampling=LONG))
                next(call), next(call)  # two messages read, then the client goes away between messages
                call.cancel()
        wait_until(
            lambda: server.scrape().get("jachat_running_requests", 1) <= 0,
            "the twenty cancelled streams released (jachat_running_requests 0)",
            timeout=10,
        )
        started = time.monotonic()
        assert server.stop(timeout=30) == 0
        took = time.monotonic() - started
        # idle, it exits at once (about 1 s with the model's release); a stream never released makes it wait the 60 s
        assert took < 30, f"SIGTERM took {took:.1f} s: a stream was never released, so the drain waited its grace"
    finally:
        server.stop()
    assert not problems_in_log(server), problems_in_log(server)


def test_a_storm_of_cancellations_and_deadlines_is_recorded_as_each_caller_saw_it(edge_server: ServerProcess) -> None:
    before = edge_server.scrape()

    async def storm() -> dict[grpc.StatusCode, int]:
        seen: dict[grpc.StatusCode, int] = {}
        async with grpc.aio.insecure_channel(edge_server.target) as channel:
            stub = chat_pb2_grpc.ChatServiceStub(channel)

            async def one(i: int) -> None:
                request = chat_pb2.GenerateStreamRequest(turns=[user(f"嵐{i}")], sampling=LONG)
                call = stub.GenerateStream(request, timeout=0.3 if i % 3 else None)
                try:
                    async for _ in call:
                        if i % 3 == 0:  # a third cancel after their first message
                            call.cancel()
                    code = grpc.StatusCode.OK
                except grpc.aio.AioRpcError as error:
                    code = error.code()
                except asyncio.CancelledError:
                    code = grpc.StatusCode.CANCELLED
                seen[code] = seen.get(code, 0) + 1

            await asyncio.gather(*(one(i) for i in range(30)))
        return seen

    seen = asyncio.run(storm())
    assert seen.get(grpc.StatusCode.DEADLINE_EXCEEDED, 0) > 0 and seen.get(grpc.StatusCode.CANCELLED, 0) == 10

    def moved(name: str) -> float:
        return edge_server.scrape().get(name, 0.0) - before.get(name, 0.0)

    wait_until(
        lambda: moved("jachat_running_requests") == 0, "the storm's streams released (jachat_running_requests back)", 10
    )
    expected = {
        f'jachat_requests_total{{api="grpc",code="{code.name}",rpc="GenerateStream"}}': n for code, n in seen.items()
    }
    expected['jachat_finished_total{reason="deadline"}'] = seen[grpc.StatusCode.DEADLINE_EXCEEDED]
    expected['jachat_finished_total{reason="cancelled"}'] = seen[grpc.StatusCode.CANCELLED]

    def counted() -> dict[str, float]:
        return {name: moved(name) for name in expected}

    # a call is counted once its handler has returned, which may be after its stream released its place
    wait_until(lambda: counted() == expected, "every call counted as its caller saw it", 10, shown=counted)
    assert not problems_in_log(edge_server), problems_in_log(edge_server)


def test_calls_whose_deadline_passed_before_the_server_read_them_are_counted_as_deadlines(model_f32: Path) -> None:
    """A call whose caller's deadline passes before the server's event loop gets to it (a loaded server) is still
    one call that ended DEADLINE_EXCEEDED. gRPC's own unary handlers read the request before the application sees
    the call and drop a call gone meanwhile, uncounted (7 of 20 deadlines in a loaded run's storm, all 30 here)."""
    with serving(model_f32) as server:
        before = server.scrape()
        held, release = threading.Event(), threading.Event()

        def hold() -> None:  # the server's event loop busy until every caller has given up
            held.set()
            release.wait(60)

        async def callers() -> list[grpc.StatusCode]:
            async with grpc.aio.insecure_channel(server.target) as channel:
                stub = chat_pb2_grpc.ChatServiceStub(channel)
                await stub.GetModelInfo(chat_pb2.GetModelInfoRequest())  # connected before the loop is held

                async def one(i: int) -> grpc.StatusCode:
                    turns = [user(f"遅{i}")]
                    try:
                        if i % 2:
                            await stub.Generate(chat_pb2.GenerateRequest(turns=turns, sampling=LONG), timeout=0.3)
                        else:
                            async for _ in stub.GenerateStream(
                                chat_pb2.GenerateStreamRequest(turns=turns, sampling=LONG), timeout=0.3
                            ):
                                pass
                    except grpc.aio.AioRpcError as error:
                        return error.code()
                    return grpc.StatusCode.OK

                server.loop.call_soon_threadsafe(hold)
                await asyncio.to_thread(held.wait, 60)
                try:
                    return await asyncio.gather(*(one(i) for i in range(30)))
                finally:
                    release.set()

        assert asyncio.run(callers()) == [grpc.StatusCode.DEADLINE_EXCEEDED] * 30

        def counted() -> dict[str, float]:
            after = server.scrape()
            return {
                name: after[name] - before.get(name, 0) for name in after if name.startswith("jachat_requests_total")
            }

        expected = {
            f'jachat_requests_total{{api="grpc",code="DEADLINE_EXCEEDED",rpc="{rpc}"}}': 15.0
            for rpc in ("Generate", "GenerateStream")
        }
        wait_until(
            lambda: {k: v for k, v in counted().items() if v} == {**expected, GET_MODEL_INFO: 1.0},
            "all 30 counted as deadlines",
            10,
            shown=counted,
        )
        wait_until(lambda: server.scrape()["jachat_running_requests"] == 0, "none left running", 10)


def test_a_stream_whose_client_reads_nothing_is_ended_and_stops_counting_as_running(model_f32: Path) -> None:
    server = start(model_f32, "--stream-write-timeout-seconds", "1")
    try:
        # a small flow-control window that never grows: the server's writes block once it is full
        options = [("grpc.http2.lookahead_bytes", 1024), ("grpc.http2.bdp_probe", 0)]
        with grpc.insecure_channel(server.target, options=options) as channel:
            call = server.stub(channel).GenerateStream(
                chat_pb2.GenerateStreamRequest(turns=[user("やあ")], sampling=LONG)
            )
            ended = 'jachat_requests_total{api="grpc",code="DEADLINE_EXCEEDED",rpc="GenerateStream"}'
            wait_until(lambda: server.scrape().get(ended, 0) >= 1, "the unread stream ended DEADLINE_EXCEEDED", 30)
            assert server.scrape()["jachat_running_requests"] == 0
            with pytest.raises(grpc.RpcError) as info:
                for _ in call:
                    pass
            assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and "read nothing" in details(info.value)
    finally:
        server.stop()


def test_health_watchers_are_capped_and_check_still_answers(edge_server: ServerProcess) -> None:
    with edge_server.channel() as channel:
        health = health_stub(channel)
        watches = [health.Watch(health_pb2.HealthCheckRequest(service="")) for _ in range(3)]
        for watch in watches:
            assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as info:
            next(health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=5))
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == health_pb2.HealthCheckResponse.SERVING
        watches[0].cancel()

        def a_new_watch_is_admitted() -> bool:
            try:
                first = next(health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=5))
            except grpc.RpcError:
                return False
            assert first.status == health_pb2.HealthCheckResponse.SERVING, first
            return True

        wait_until(a_new_watch_is_admitted, "the freed health watcher place reused", timeout=10)
        for watch in watches:
            watch.cancel()
        with pytest.raises(grpc.RpcError) as info:
            next(health.Watch(health_pb2.HealthCheckRequest(service="x" * 300), timeout=5))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def _closed_by_peer(connection: socket.socket) -> bool:
    """Whether the server has closed this connection (it reads as end of file, without waiting)."""
    try:
        return connection.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:  # reset by the server: closed too
        return True


def _threads(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    raise AssertionError("no thread count")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="counts threads through /proc")
def test_idle_metrics_connections_cost_no_threads_and_scrapes_still_work(edge_server: ServerProcess) -> None:
    """200 idle connections to /metrics: no thread each, at most 32 held (each newcomer displaces the one idle
    longest), and a scrape made while they all stay open is answered (32 of them used to fail every scrape)."""
    pid = edge_server.process.pid
    before = _threads(pid)
    idle = [socket.create_connection(("127.0.0.1", edge_server.metrics_port)) for _ in range(200)]
    try:
        # the server has taken every connection once it holds no more than its 32 places
        wait_until(lambda: sum(_closed_by_peer(s) for s in idle) >= 200 - 32, "all but 32 displaced")
        assert _threads(pid) <= before + 2, "a thread per connection"
        for _ in range(3):  # with all 200 still open on our side
            assert "jachat_event_loop_lag_seconds_count" in "".join(edge_server.scrape())
    finally:
        for s in idle:
            s.close()


def test_the_event_loop_lag_is_measured(edge_server: ServerProcess) -> None:
    wait_until(lambda: edge_server.scrape().get("jachat_event_loop_lag_seconds_count", 0) > 0, "a lag sample")
    samples = edge_server.scrape()
    assert samples["jachat_event_loop_lag_seconds_count"] > 0
    assert samples['jachat_event_loop_lag_seconds_bucket{le="+Inf"}'] == samples["jachat_event_loop_lag_seconds_count"]


def test_hundreds_of_violations_are_still_invalid_argument_with_a_capped_list(edge_server: ServerProcess) -> None:
    turns = [chat_pb2.Turn(speaker=chat_pb2.Speaker.ValueType(7), text="a") for _ in range(256)]
    with edge_server.channel() as channel, pytest.raises(grpc.RpcError) as info:
        edge_server.stub(channel).Generate(chat_pb2.GenerateRequest(turns=turns), timeout=10)
    error = info.value
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "and 253 more violations" in details(error)
    status = status_of(error)
    assert status is not None
    bad_request = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(bad_request)
    fields = [v.field for v in bad_request.field_violations]
    assert fields[:9] == [f"turns[{i}].speaker" for i in range(9)] and len(fields) == 10
    assert bad_request.field_violations[-1].description == "247 more violations are not listed"


def test_min_new_tokens_beyond_the_room_left_is_invalid_argument(edge_server: ServerProcess) -> None:
    """max_new_tokens unset shrinks to the room after a long prompt; a min_new_tokens (within the default 128) that
    no longer fits must be the caller's error, not an engine failure."""
    with edge_server.channel() as channel:
        stub = edge_server.stub(channel)

        def tokens(n: int) -> int:
            return stub.Tokenize(chat_pb2.TokenizeRequest(turns=[user("吾輩は猫である。" * n)]), timeout=10).token_count

        per = (tokens(200) - tokens(100)) / 100
        n = 100 + int((2048 - 60 - tokens(100)) / per)
        room = 2048 - tokens(n)
        assert 1 <= room < 100, room
        long = chat_pb2.GenerateRequest(
            turns=[user("吾輩は猫である。" * n)], sampling=chat_pb2.SamplingParams(min_new_tokens=100)
        )
        with pytest.raises(grpc.RpcError) as info:
            stub.Generate(long, timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert details(info.value).startswith("sampling.min_new_tokens:")


def test_absurd_requests_are_refused_cheaply_naming_the_field(edge_server: ServerProcess) -> None:
    turns = [user("吾輩は猫である。" * 600) for _ in range(256)]  # ~1.2 MB: a 12 MB Tokenize reply on old servers
    with edge_server.channel() as channel:
        stub = edge_server.stub(channel)
        for call in (
            lambda: stub.Tokenize(chat_pb2.TokenizeRequest(turns=turns), timeout=10),
            lambda: stub.Generate(chat_pb2.GenerateRequest(turns=turns, drop_oldest_turns=True), timeout=10),
        ):
            with pytest.raises(grpc.RpcError) as info:
                call()
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert details(info.value).startswith("turns: 1228800 characters in all; one request may have at most")
        assert stub.Generate(chat_pb2.GenerateRequest(turns=[user("やあ")], sampling=greedy(2)), timeout=10).text


def test_request_ids_that_could_forge_log_text_are_replaced() -> None:
    assert request_id_from([("x-request-id", "9f1c-42_a.b:c/d+e=f@g~h")]) == "9f1c-42_a.b:c/d+e=f@g~h"
    for hostile in ("ok] INFO forged line", 'a"b', "a\tb", "x" * 129, "", "id\u3000"):
        replaced = request_id_from([("x-request-id", hostile)])
        assert replaced != hostile and len(replaced) == 32


def test_unauthenticated_calls_to_unknown_methods_are_denied_without_a_traceback(
    tmp_path: Path, model_f32: Path
) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("secret\n")
    server = start(model_f32, "--auth-token-file", str(tokens), process=True)  # its whole stderr is read
    try:
        with server.channel() as channel:
            unknown: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(
                "/jachat.v1.ChatService/NoSuchMethod"
            )
            for _ in range(3):
                with pytest.raises(grpc.RpcError) as info:
                    unknown(b"", timeout=5)
                assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED  # a stranger learns nothing of what exists
    finally:
        server.stop()
    assert not problems_in_log(server), problems_in_log(server)


def test_concurrent_rpcs_are_capped_per_server(model_f32: Path) -> None:
    server = start(model_f32, "--max-concurrent-rpcs", "4")
    try:
        with server.channel() as channel:
            stub = server.stub(channel)
            calls = [
                stub.GenerateStream(chat_pb2.GenerateStreamRequest(turns=[user("やあ")], sampling=LONG))
                for _ in range(4)
            ]
            for call in calls:
                next(call)
            with pytest.raises(grpc.RpcError) as info:
                stub.Generate(chat_pb2.GenerateRequest(turns=[user("やあ")], sampling=greedy(2)), timeout=10)
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            for call in calls:
                call.cancel()
    finally:
        server.stop()
