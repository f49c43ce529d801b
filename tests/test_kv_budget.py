"""The decode loop's KV-cache budget through the real server (`--kv-cache-tokens`): a call that cannot fit alone is
INVALID_ARGUMENT naming its prompt, and a flood of calls that fit one at a time all complete, each starting once the
one before has left the cache (the fit rule itself is pinned in tests/fast/test_loop.py and test_cache.py)."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from jachat.v1 import chat_pb2
from tests.helpers import details, greedy, user, wait_until
from tests.servers import Server, serving
from tests.test_native import decoder_module

BUDGET = 200


@pytest.fixture(scope="module")
def server(model_f32: Path) -> Iterator[Server]:
    decoder_module()
    with serving(model_f32, "--decode-loop", "native", "--kv-cache-tokens", str(BUDGET)) as running:
        yield running


def test_a_prompt_over_the_budget_is_refused_naming_it(server: Server) -> None:
    with server.channel() as channel, pytest.raises(grpc.RpcError) as refused:
        server.stub(channel).Generate(chat_pb2.GenerateRequest(turns=[user("吾輩は猫である。" * 60)]), timeout=60)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert details(refused.value).startswith("turns") and "KV-cache budget" in details(refused.value)
    with server.channel() as channel, pytest.raises(grpc.RpcError) as too_long:
        server.stub(channel).Generate(chat_pb2.GenerateRequest(turns=[user("こんにちは")], sampling=greedy(500)))
    assert too_long.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "sampling.max_new_tokens" in details(too_long.value)


def test_a_flood_that_fits_one_call_at_a_time_completes_with_the_excess_waiting(server: Server) -> None:
    """Each call holds 20-odd prompt tokens and 110 new ones: two do not fit in 200 positions beside each other."""
    request = chat_pb2.GenerateRequest(
        turns=[user("日本の首都はどこですか?")], sampling=greedy(110, min_new_tokens=110)
    )
    with server.channel() as channel, ThreadPoolExecutor(4) as pool:
        stub = server.stub(channel)
        replies = list(pool.map(lambda _: stub.Generate(request, timeout=120), range(4)))
    assert all(r.usage.completion_tokens == 110 for r in replies)
    assert len({r.text for r in replies}) == 1
    timings = sorted(
        (r.timing.time_to_first_token.ToTimedelta().total_seconds(), r.timing.total.ToTimedelta().total_seconds())
        for r in replies
    )
    for (_, before_total), (first_token, _) in itertools.pairwise(timings):
        assert first_token > before_total * 0.5, timings  # it waited for the one before to leave the cache


def test_the_kv_gauge_is_the_share_of_the_budget_the_running_rows_hold(model_f32: Path) -> None:
    """The Inference Gateway's KV-cache gauge, with the decode loop: rows x the longest a row may reach, over the
    budget (here one row of its prompt and 1,000 new tokens in 4,000 positions), and 0 once the row has left."""
    flags = ("--decode-loop", "native", "--kv-cache-tokens", "4000", "--metrics-cache-seconds", "0")
    with serving(model_f32, *flags) as server, server.channel() as channel:
        stub = server.stub(channel)
        assert server.scrape()["jachat_kv_cache_usage_ratio"] == 0.0
        prompt = stub.Tokenize(chat_pb2.TokenizeRequest(turns=[user("やあ")])).token_count
        stream = stub.GenerateStream(
            chat_pb2.GenerateStreamRequest(turns=[user("やあ")], sampling=greedy(1000, min_new_tokens=1000))
        )
        next(stream)  # it runs
        held = server.scrape()["jachat_kv_cache_usage_ratio"]
        stream.cancel()
        wait_until(lambda: server.scrape()["jachat_kv_cache_usage_ratio"] == 0.0, "the row left the cache")
    assert held == (prompt + 1000) / 4000
