"""Batching as callers see it: cancellation, deadlines, backpressure, tenants and health against real server processes
(float32 demo model). The scheduler's own unit tests, against a fake engine, are tests/fast/test_scheduler.py."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2

from jachat.v1 import chat_pb2, chat_pb2_grpc
from tests.helpers import details, greedy, health_stub, status_of, until, user
from tests.servers import Server, ServerProcess, serving

PROMPTS = [
    "こんにちは",
    "日本の首都はどこですか?",
    "吾輩は猫である。名前はまだ無い。どこで生れたかとんと見当がつかぬ。",
    "おすすめの本を教えてください。最近は小説よりもエッセイをよく読みます。何かありますか?",
]


def fixed(tokens: int, **kwargs: Any) -> chat_pb2.SamplingParams:
    """Greedy, exactly `tokens` tokens long."""
    return greedy(tokens, min_new_tokens=tokens, **kwargs)


def request(text: str, sampling: chat_pb2.SamplingParams) -> chat_pb2.GenerateStreamRequest:
    return chat_pb2.GenerateStreamRequest(turns=[user(text)], sampling=sampling)


async def collect(
    stub: chat_pb2_grpc.ChatServiceAsyncStub, text: str, sampling: chat_pb2.SamplingParams, timeout: float = 60
) -> tuple[str, chat_pb2.GenerateStreamResponse]:
    parts = []
    async for message in stub.GenerateStream(request(text, sampling), timeout=timeout):
        parts.append(message.text)
    return "".join(parts), message


def delta(before: dict[str, float], after: dict[str, float], name: str) -> float:
    return after.get(name, 0.0) - before.get(name, 0.0)


@pytest.fixture(scope="module")
def batching_server(model_f32: Path) -> Iterator[ServerProcess]:
    """A child process, so its event loop's latency is measured apart from the test's own Python."""
    with serving(model_f32, "--max-batch-size", "16", "--max-batch-wait-ms", "50", process=True) as server:
        yield server


def test_greedy_output_is_the_same_alone_and_batched(batching_server: Server) -> None:
    """Four calls at once, beside a long reply already running: each reply is the one it gets alone. The decode loop
    (the default) runs one batch, so they joined the long reply's (on static batches they share one of their own:
    tests/test_parity.py pins static parity)."""

    async def scenario() -> tuple[list[str], list[str], bool]:
        async with grpc.aio.insecure_channel(batching_server.target) as channel:
            stub = chat_pb2_grpc.ChatServiceStub(channel)
            alone = [(await collect(stub, p, fixed(24)))[0] for p in PROMPTS]
            long = stub.GenerateStream(request("やあ", fixed(1900)), timeout=120)
            await long.read()  # its first token: it runs
            together = await asyncio.gather(*(collect(stub, p, fixed(24)) for p in PROMPTS))
            ran_beside = long.done() is False
            long.cancel()
            return alone, [t for t, _ in together], ran_beside

    alone, batched, ran_beside = asyncio.run(scenario())
    assert batched == alone
    assert ran_beside, "the long reply ended before the four calls did"


def test_different_sampling_options_in_flight_together_all_complete(batching_server: Server) -> None:
    penalised = chat_pb2.SamplingParams(temperature=0, max_new_tokens=20, min_new_tokens=20, repetition_penalty=1.3)
    sampled = chat_pb2.SamplingParams(temperature=0.9, top_k=20, top_p=0.9, max_new_tokens=16, min_new_tokens=16)

    async def scenario() -> None:
        async with grpc.aio.insecure_channel(batching_server.target) as channel:
            stub = chat_pb2_grpc.ChatServiceStub(channel)
            expected_greedy = (await collect(stub, PROMPTS[1], fixed(20)))[0]
            expected_penalised = (await collect(stub, PROMPTS[2], penalised))[0]
            stop = expected_greedy[5:7]
            results = await asyncio.gather(
                collect(stub, PROMPTS[1], fixed(20)),
                collect(stub, PROMPTS[2], penalised),
                collect(stub, PROMPTS[0], sampled),
                collect(stub, PROMPTS[3], sampled),
                collect(stub, PROMPTS[1], greedy(20, stop=[stop])),
            )
            (g, g_last), (p, _), (_, s1), (_, s2), (st, st_last) = results
            assert g == expected_greedy and g_last.finish_reason == chat_pb2.FINISH_REASON_LENGTH
            assert p == expected_penalised
            assert s1.usage.completion_tokens == s2.usage.completion_tokens == 16
            assert st == expected_greedy[: expected_greedy.find(stop)]
            assert st_last.finish_reason == chat_pb2.FINISH_REASON_STOP

    asyncio.run(scenario())


def test_cancelled_stream_stops_within_two_tokens_and_batch_mates_finish(batching_server: Server) -> None:
    long = fixed(400)

    async def scenario() -> None:
        async with grpc.aio.insecure_channel(batching_server.target) as channel:
            stub = chat_pb2_grpc.ChatServiceStub(channel)
            expected = [(await collect(stub, p, fixed(60)))[0] for p in PROMPTS[:3]]
            before = batching_server.scrape()
            victim = stub.GenerateStream(request(PROMPTS[3], long))
            mates = [asyncio.ensure_future(collect(stub, p, fixed(60))) for p in PROMPTS[:3]]
            received = 0
            async for message in victim:
                received += bool(message.text)
                if received == 5:
                    victim.cancel()
                    break
            assert [t for t, _ in await asyncio.gather(*mates)] == expected
            # the freed capacity is used by the next call
            assert (await collect(stub, PROMPTS[0], fixed(60)))[0] == expected[0]
            after = batching_server.scrape()
            assert delta(before, after, 'jachat_finished_total{reason="cancelled"}') == 1
            assert delta(before, after, "jachat_tokens_after_cancel_count") == 1
            assert delta(before, after, 'jachat_tokens_after_cancel_bucket{le="2.0"}') == 1
            # the victim generated far fewer than its 400 tokens: 3 mates x 60 + next 60 + victim
            victim_tokens = delta(before, after, "jachat_generated_tokens_total") - 4 * 60
            assert 5 <= victim_tokens < 100
            assert after["jachat_running_requests"] == 0 and after["jachat_queue_size"] == 0

    asyncio.run(scenario())


@pytest.fixture
def single_slot_server(model_f32: Path) -> Iterator[Server]:
    """One replica, batches of one, one waiting request at most."""
    with serving(model_f32, "--max-batch-size", "1", "--max-queued-requests", "1", "--replicas", "1") as server:
        yield server


def test_deadline_stops_a_running_call_and_an_expired_queued_call_never_starts(
    single_slot_server: Server,
) -> None:
    server = single_slot_server

    async def scenario() -> None:
        async with grpc.aio.insecure_channel(server.target) as channel:
            stub = chat_pb2_grpc.ChatServiceStub(channel)
            before = server.scrape()
            with pytest.raises(grpc.aio.AioRpcError) as running:
                await collect(stub, PROMPTS[0], fixed(1900), timeout=0.5)
            assert running.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            deadline_ended = 'jachat_finished_total{reason="deadline"}'
            await until(lambda: delta(before, server.scrape(), deadline_ended) == 1, "the running call ended")
            mid = server.scrape()
            assert delta(before, mid, 'jachat_finished_total{reason="deadline"}') == 1
            assert delta(before, mid, "jachat_generated_tokens_total") < 1900
            blocker = asyncio.ensure_future(collect(stub, PROMPTS[1], fixed(1900)))
            batches = mid["jachat_batch_size_count"]  # the blocker runs; the next call must wait in the queue
            await until(lambda: server.scrape()["jachat_batch_size_count"] > batches, "the blocker started")
            with pytest.raises(grpc.aio.AioRpcError) as queued:
                await collect(stub, PROMPTS[2], fixed(10), timeout=0.2)
            assert queued.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            await blocker
            after = server.scrape()
            assert delta(mid, after, 'jachat_finished_total{reason="deadline"}') == 1
            assert delta(mid, after, "jachat_batch_size_sum") == 1  # only the blocker ever started
            assert delta(mid, after, "jachat_generated_tokens_total") == 1900

    asyncio.run(scenario())


def test_full_queue_is_resource_exhausted_at_once_with_retry_info(single_slot_server: Server) -> None:
    server = single_slot_server

    async def scenario() -> None:
        async with grpc.aio.insecure_channel(server.target) as channel:
            stub = chat_pb2_grpc.ChatServiceStub(channel)
            expected = [(await collect(stub, p, fixed(1500)))[0] for p in PROMPTS[:2]]
            batches = server.scrape()["jachat_batch_size_count"]
            running = asyncio.ensure_future(collect(stub, PROMPTS[0], fixed(1500)))
            await until(lambda: server.scrape()["jachat_batch_size_count"] > batches)  # it holds the replica
            waiting = asyncio.ensure_future(collect(stub, PROMPTS[1], fixed(1500)))
            await until(lambda: server.scrape()["jachat_queue_size"] == 1)  # it fills the queue
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.Generate(chat_pb2.GenerateRequest(turns=[user("やあ")], sampling=fixed(5)))
            assert not running.done() and not waiting.done()  # refused at once: not after a generation
            error = refused.value
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            status = status_of(error)
            assert status is not None
            retry = error_details_pb2.RetryInfo()
            assert any(detail.Unpack(retry) for detail in status.details)
            assert retry.retry_delay.ToNanoseconds() > 0
            assert [(await running)[0], (await waiting)[0]] == expected

    asyncio.run(scenario())


def test_health_answers_fast_while_sixteen_streams_generate(batching_server: Server) -> None:
    """Health is answered between tokens, never after a batch: its slowest answer while sixteen streams generate,
    compared with the time those streams take, in the same run (no absolute bound a busy machine could miss)."""

    async def scenario() -> tuple[float, float]:
        async with grpc.aio.insecure_channel(batching_server.target) as channel:
            stub = chat_pb2_grpc.ChatServiceStub(channel)
            health = health_stub(channel)
            began = time.perf_counter()
            streams = [asyncio.ensure_future(collect(stub, PROMPTS[i % 4], fixed(1000))) for i in range(16)]
            await until(lambda: batching_server.scrape()["jachat_running_requests"] == 16, "all sixteen running")
            slowest, checks_while_generating = 0.0, 0
            while not any(s.done() for s in streams):  # as long as all sixteen generate, however fast the machine
                started = time.perf_counter()
                reply = await health.Check(health_pb2.HealthCheckRequest(service="jachat.v1.ChatService"))
                slowest = max(slowest, time.perf_counter() - started)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
                checks_while_generating += not any(s.done() for s in streams)
                await asyncio.sleep(0.05)
            assert checks_while_generating >= 5, f"only {checks_while_generating} checks while the streams ran"
            await asyncio.gather(*streams)
            return slowest, time.perf_counter() - began

    slowest, generating = asyncio.run(scenario())
    assert slowest < generating / 20, f"health took {slowest * 1000:.0f} ms of {generating * 1000:.0f} ms"


def test_an_interactive_call_sheds_a_queued_batch_call_from_the_full_queue(single_slot_server: Server) -> None:
    """One replica, one waiting place: a batch call holds it; an interactive call takes it, and the batch caller gets
    RESOURCE_EXHAUSTED with a retry delay; the metrics say so by priority. An unknown priority names its field."""
    server = single_slot_server
    before = server.scrape()

    async def scenario() -> None:
        async with grpc.aio.insecure_channel(server.target) as channel:
            stub = chat_pb2_grpc.ChatServiceStub(channel)
            batches = server.scrape()["jachat_batch_size_count"]
            running = asyncio.ensure_future(collect(stub, PROMPTS[0], fixed(1500)))
            await until(lambda: server.scrape()["jachat_batch_size_count"] > batches)
            bulk = chat_pb2.GenerateRequest(
                turns=[user("まとめて")], sampling=fixed(5), priority=chat_pb2.PRIORITY_BATCH
            )
            shed = asyncio.ensure_future(stub.Generate(bulk))
            await until(lambda: server.scrape()["jachat_queue_size"] == 1)
            urgent = chat_pb2.GenerateRequest(
                turns=[user("急ぎ")], sampling=fixed(5), priority=chat_pb2.PRIORITY_INTERACTIVE
            )
            answered = asyncio.ensure_future(stub.Generate(urgent))
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await shed
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "interactive call took this batch call's place" in details(refused.value)
            retry = error_details_pb2.RetryInfo()
            assert any(detail.Unpack(retry) for detail in status_of(refused.value).details)
            running.cancel()
            assert (await answered).usage.completion_tokens == 5
            unknown = chat_pb2.GenerateRequest(
                turns=[user("やあ")], sampling=fixed(2), priority=chat_pb2.Priority.ValueType(9)
            )
            with pytest.raises(grpc.aio.AioRpcError) as invalid:
                await stub.Generate(unknown)
            assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert details(invalid.value).startswith("priority: is 9")

    asyncio.run(scenario())
    after = server.scrape()
    moved = {key: after.get(key, 0.0) - before.get(key, 0.0) for key in after}
    assert moved['jachat_finished_total{reason="shed"}'] == 1
    assert moved['jachat_rejected_total{api="grpc",priority="batch",reason="overloaded"}'] == 1
    assert moved['jachat_queue_duration_seconds_count{priority="interactive"}'] >= 2


def test_tenants_are_named_by_their_token_or_header_and_share_the_server_fairly(
    model_f32: Path, tmp_path: Path
) -> None:
    """With auth the tenant is the token's name (a plain token's is token- and its sha256's start); without it,
    x-jachat-tenant. On one replica with batches of 4, tenant A floods 16 calls, then B sends 2: B's calls start in
    the next batch, so they end while A still has calls to run."""
    import hashlib

    tokens = tmp_path / "tokens"
    tokens.write_text("alice secret-a\nbob secret-b\nplain-token\n")
    flags = ("--replicas", "1", "--max-batch-size", "4", "--max-queued-per-tenant", "32")
    with serving(model_f32, "--auth-token-file", str(tokens), *flags) as server, server.channel() as channel:
        stub = server.stub(channel)
        for secret in ("secret-a", "secret-b", "plain-token"):
            stub.Generate(
                chat_pb2.GenerateRequest(turns=[user("やあ")], sampling=fixed(3)),
                metadata=(("authorization", f"Bearer {secret}"),),
                timeout=30,
            )
        counted = server.scrape()
        plain = "token-" + hashlib.sha256(b"plain-token").hexdigest()[:8]
        for tenant in ("alice", "bob", plain):
            assert counted[f'jachat_tenant_generated_tokens_total{{tenant="{tenant}"}}'] == 3

    with serving(model_f32, *flags) as server:

        async def scenario() -> list[str]:
            finished: list[str] = []
            async with grpc.aio.insecure_channel(server.target) as channel:
                stub = chat_pb2_grpc.ChatServiceStub(channel)

                async def call(tenant: str, i: int) -> None:
                    request = chat_pb2.GenerateRequest(turns=[user(f"{tenant}{i}")], sampling=fixed(300))
                    await stub.Generate(request, metadata=(("x-jachat-tenant", tenant),), timeout=120)
                    finished.append(tenant)

                batches = server.scrape()["jachat_batch_size_count"]
                flood = [asyncio.ensure_future(call("a", i)) for i in range(16)]
                await until(lambda: server.scrape()["jachat_batch_size_count"] > batches)  # A's first batch runs
                await until(lambda: server.scrape()["jachat_queue_size"] >= 12)
                light = [asyncio.ensure_future(call("b", i)) for i in range(2)]
                await asyncio.gather(*flood, *light)
            return finished

        order = asyncio.run(scenario())
        assert order.count("b") == 2 and order.count("a") == 16
        assert max(i for i, tenant in enumerate(order) if tenant == "b") < 10, order  # not behind A's 16
        assert server.scrape()['jachat_tenant_generated_tokens_total{tenant="b"}'] == 600
