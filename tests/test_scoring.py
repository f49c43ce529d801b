"""The Score RPC: candidate replies' teacher-forced log-probabilities over gRPC, equal to Hugging Face's, and its
errors naming their fields."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from jachat.v1 import chat_pb2
from tests.helpers import details, hf_model, user
from tests.servers import Server, serving

CANDIDATES = ["東京です。", "大阪です。\n京都も近い。", "わかりません"]


@pytest.fixture(scope="module")
def server(model_f32: Path) -> Iterator[Server]:
    with serving(model_f32) as running:
        yield running


def score(server: Server, request: chat_pb2.ScoreRequest) -> chat_pb2.ScoreResponse:
    with server.channel() as channel:
        return server.stub(channel).Score(request, timeout=60)


def test_scores_equal_hugging_face_teacher_forced_and_sum_to_each_replys_logprob(
    server: Server, demo_checkpoint: Path
) -> None:
    import torch

    turns = [user("日本の首都はどこですか?")]
    before = server.scrape()
    reply = score(server, chat_pb2.ScoreRequest(turns=turns, candidates=CANDIDATES))
    with server.channel() as channel:
        prompt = server.stub(channel).Tokenize(chat_pb2.TokenizeRequest(turns=turns), timeout=60)
    assert reply.prompt_tokens == prompt.token_count and len(reply.candidates) == len(CANDIDATES)
    model = hf_model(demo_checkpoint)
    for candidate in reply.candidates:
        ids = list(prompt.token_ids) + [t.id for t in candidate.tokens]
        with torch.no_grad():
            expected = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
        for step, token in enumerate(candidate.tokens):
            assert abs(token.logprob - float(expected[prompt.token_count - 1 + step, token.id])) < 1e-3
            assert token.piece and token.logprob < 0
        assert candidate.logprob == pytest.approx(sum(t.logprob for t in candidate.tokens), abs=1e-4)
    after = server.scrape()
    name = 'jachat_requests_total{api="grpc",code="OK",rpc="Score"}'
    assert after[name] - before.get(name, 0.0) == 1


@pytest.mark.parametrize(
    ("turns", "candidates", "field"),
    [
        ([user("やあ")], [], "candidates"),
        ([user("やあ")], ["a"] * 17, "candidates"),
        ([user("やあ")], ["a", ""], "candidates[1]"),
        ([user("やあ")], ["a", "b" * 16_385], "candidates[1]"),
        ([], ["a"], "turns"),
        ([user("やあ"), chat_pb2.Turn(speaker=chat_pb2.SPEAKER_SYSTEM, text="はい")], ["a"], "turns[1].speaker"),
        ([user("猫" * 1900)], ["猫" * 300], "candidates[0]"),  # prompt and reply beyond the context
    ],
)
def test_bad_score_requests_are_invalid_argument_naming_the_field(
    server: Server, turns: list[chat_pb2.Turn], candidates: list[str], field: str
) -> None:
    with pytest.raises(grpc.RpcError) as failure:
        score(server, chat_pb2.ScoreRequest(turns=turns, candidates=candidates))
    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert details(failure.value).startswith(f"{field}: "), details(failure.value)
