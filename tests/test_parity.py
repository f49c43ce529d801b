"""Token parity with the model card's Hugging Face code path, on the offline demo checkpoint (float32)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from jachat.service.domain.results import Completion, FinishReason, GeneratedToken, Scored
from jachat.service.domain.sampling import SamplingOptions
from jachat.service.engine.engine import Engine
from jachat.service.engine.options import EngineOptions
from jachat.service.text.prompt import Speaker, Turn, render_prompt
from tests.helpers import CARD_TURNS, hf_generate

PROMPTS = [
    [Turn(Speaker(s), t) for s, t in CARD_TURNS],
    [Turn(Speaker.USER, "吾輩は猫である。名前はまだ無い。")],
    [Turn(Speaker.USER, "日本の首都はどこですか?")],
    [Turn(Speaker.USER, "გამარჯობა 吾輩は 猫である ")],
    [Turn(Speaker.USER, "こんにちは"), Turn(Speaker.SYSTEM, "こんにちは!\nご用件は?"), Turn(Speaker.USER, "天気")],
    [Turn(Speaker.USER, "Pythonを勉強したいです。何から始めればよいでしょうか?")],
]
GREEDY = SamplingOptions(temperature=0.0, repetition_penalty=1.0, max_new_tokens=32)


def run(engine: Engine, prompt_ids: list[int], options: SamplingOptions) -> tuple[str, Completion]:
    async def collect() -> tuple[str, Completion]:
        parts: list[str] = []
        async for item in engine.stream(prompt_ids, options):
            if isinstance(item, Completion):
                return "".join(parts), item
            parts.append(item.text)
        raise AssertionError("no completion")

    return asyncio.run(collect())


@pytest.fixture(scope="module")
def engine_f32(model_f32: Path) -> Iterator[Engine]:
    engine = Engine(EngineOptions(model_f32, device="cpu"))
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def engine_int8(model_int8: Path) -> Iterator[Engine]:
    engine = Engine(EngineOptions(model_int8, device="cpu"))
    yield engine
    engine.close()


@pytest.mark.parametrize("index", range(len(PROMPTS)))
def test_greedy_token_ids_equal_hugging_face(engine_f32: Engine, demo_checkpoint: Path, index: int) -> None:
    prompt_ids = engine_f32.tokenizer.encode(render_prompt(PROMPTS[index]))
    text, completion = run(engine_f32, prompt_ids, GREEDY)
    expected = hf_generate(demo_checkpoint, prompt_ids, GREEDY.max_new_tokens, repetition_penalty=1.0)
    assert list(completion.token_ids) == expected
    assert completion.finish_reason is FinishReason.LENGTH and completion.completion_tokens == 32
    assert text == engine_f32.tokenizer.decode(expected).replace("<NL>", "\n")


class GeneratedOnlyRepetitionPenalty:
    """Hugging Face's repetition penalty, restricted to the tokens generated after the prompt."""

    def __init__(self, prompt_length: int, penalty: float) -> None:
        self.prompt_length, self.penalty = prompt_length, penalty

    def __call__(self, input_ids: object, scores: object) -> object:
        import torch

        assert isinstance(input_ids, torch.Tensor) and isinstance(scores, torch.Tensor)
        generated = input_ids[:, self.prompt_length :]
        if generated.shape[1] == 0:
            return scores
        picked = torch.gather(scores, 1, generated)
        picked = torch.where(picked < 0, picked * self.penalty, picked / self.penalty)
        return scores.scatter(1, generated, picked)


@pytest.fixture(scope="module")
def static_f32(model_f32: Path) -> Iterator[Engine]:
    engine = Engine(EngineOptions(model_f32, device="cpu", decode_loop="static"))
    assert not engine.loop
    yield engine
    engine.close()


def test_static_batches_penalise_the_replys_tokens_only(static_f32: Engine, demo_checkpoint: Path) -> None:
    """The fallback's known difference (README, "Repetition penalty"): CTranslate2's generate_batch applies the
    penalty to the reply's own tokens, not the prompt's, where the decode loop (the default) applies Hugging Face's
    rule (tests/test_native.py). Prompts that already contain the tokens the model goes on to write are where the two
    rules part."""
    engine_f32 = static_f32
    options = SamplingOptions(temperature=0.0, repetition_penalty=1.1, max_new_tokens=32)
    differs_from_prompt_penalty = 0
    for turns in PROMPTS:
        base = engine_f32.tokenizer.encode(render_prompt(turns))
        plain = hf_generate(demo_checkpoint, base, 16, repetition_penalty=1.0)
        for prompt_ids in (base, base + plain):  # the second prompt holds the model's own favourite tokens
            _, completion = run(engine_f32, prompt_ids, options)
            ours = hf_generate(
                demo_checkpoint, prompt_ids, 32, logits_processor=GeneratedOnlyRepetitionPenalty(len(prompt_ids), 1.1)
            )
            assert list(completion.token_ids) == ours
            with_prompt = hf_generate(demo_checkpoint, prompt_ids, 32, repetition_penalty=1.1)
            differs_from_prompt_penalty += ours != with_prompt
    print(
        f"\nreplies that differ from Hugging Face's prompt-inclusive penalty: "
        f"{differs_from_prompt_penalty}/{2 * len(PROMPTS)}"
    )
    assert differs_from_prompt_penalty > 0  # the rule we chose is observable, and the engine follows it


def test_int8_agrees_with_float32_on_most_greedy_tokens(engine_f32: Engine, engine_int8: Engine) -> None:
    """Teacher-forced agreement: int8's greedy choice after float32's own prefix, position by position."""
    agree = total = 0
    for turns in PROMPTS:
        prompt_ids = engine_f32.tokenizer.encode(render_prompt(turns))
        _, reference = run(engine_f32, prompt_ids, GREEDY)
        ref = list(reference.token_ids)
        for step in range(len(ref)):
            one = SamplingOptions(temperature=0.0, repetition_penalty=1.0, max_new_tokens=1)
            _, c = run(engine_int8, prompt_ids + ref[:step], one)
            agree += c.token_ids[0] == ref[step]
            total += 1
    rate = agree / total
    print(f"\nint8 vs float32 greedy agreement: {agree}/{total} = {rate:.1%}")
    assert rate >= 0.75


def test_engine_ends_at_eos_and_strips_it(scripted_model: Path, scripted_checkpoint: Path) -> None:
    engine = Engine(EngineOptions(scripted_model, device="cpu"))
    try:
        prompt_ids = engine.tokenizer.encode(render_prompt([Turn(Speaker.USER, "吾輩は猫である。")]))
        text, completion = run(engine, prompt_ids, GREEDY)
        expected = hf_generate(scripted_checkpoint, prompt_ids, GREEDY.max_new_tokens)
        assert expected[-1] == 3 and len(expected) < GREEDY.max_new_tokens
        assert completion.finish_reason is FinishReason.END_OF_TURN
        assert list(completion.token_ids) == expected[:-1]
        assert completion.completion_tokens == len(expected)
        assert "</s>" not in text and text == engine.tokenizer.decode(expected[:-1]).replace("<NL>", "\n")
    finally:
        engine.close()


def streamed_logprobs_equal_hugging_faces(
    engine: Engine, checkpoint: Path, prompts: list[list[int]]
) -> list[list[GeneratedToken]]:
    """Each prompt's greedy reply streamed with log-probabilities, each within 1e-3 of Hugging Face's log_softmax of
    the logits at that step (teacher-forced over the same ids, float32); the replies' tokens."""
    import torch

    from tests.helpers import hf_model

    async def tokens(prompt_ids: list[int]) -> list[GeneratedToken]:
        found: list[GeneratedToken] = []
        async for item in engine.stream(prompt_ids, GREEDY, logprobs=True):
            found.extend(item.tokens)  # the deltas', then the Completion's tail (a final </s>)
        return found

    model = hf_model(checkpoint)
    replies = []
    for prompt_ids in prompts:
        generated = asyncio.run(tokens(prompt_ids))
        ids = prompt_ids + [t.id for t in generated]
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0]
        expected = torch.log_softmax(logits.float(), dim=-1)
        for step, token in enumerate(generated):
            reference = float(expected[len(prompt_ids) - 1 + step, token.id])
            assert abs(token.logprob - reference) < 1e-3, (step, token, reference)
        replies.append(generated)
    return replies


def test_token_logprobs_equal_hugging_face_log_softmax(engine_f32: Engine, demo_checkpoint: Path) -> None:
    """Greedy, repetition penalty 1.0, float32: each generated token's logprob is Hugging Face's log_softmax of the
    logits at that step (teacher-forced over the same ids), within 1e-3."""
    prompts = [engine_f32.tokenizer.encode(render_prompt(turns)) for turns in PROMPTS[:3]]
    for generated in streamed_logprobs_equal_hugging_faces(engine_f32, demo_checkpoint, prompts):
        assert len(generated) > 5


def scores_equal_hugging_faces(engine: Engine, checkpoint: Path, turns: list[Turn], candidates: list[str]) -> Scored:
    """Scoring the candidate replies after the conversation gives each reply token Hugging Face's teacher-forced
    log_softmax (float32, within 1e-3); the scores."""
    import torch

    from jachat.service.domain.request import ScoreRequest
    from tests.helpers import hf_model

    prompt_ids = engine.tokenizer.encode(render_prompt(turns))
    scored = asyncio.run(engine.score(ScoreRequest(turns, candidates)))
    model = hf_model(checkpoint)
    for tokens in scored.candidates:
        ids = prompt_ids + [t.id for t in tokens]
        with torch.no_grad():
            expected = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
        for step, token in enumerate(tokens):
            assert abs(token.logprob - float(expected[len(prompt_ids) - 1 + step, token.id])) < 1e-3, (step, token)
    return scored


def test_scored_replies_equal_hugging_face_teacher_forced(engine_f32: Engine, demo_checkpoint: Path) -> None:
    """Scoring candidate replies gives each reply token Hugging Face's teacher-forced log_softmax after the
    conversation (float32, within 1e-3), one batch for all candidates of different lengths; a newline in a reply is
    the model's <NL>."""
    turns = PROMPTS[1]
    prompt_ids = engine_f32.tokenizer.encode(render_prompt(turns))
    candidates = ["東京です。", "大阪です。\n京都も近い。", "吾輩は猫である。名前はまだ無い。"]
    scored = scores_equal_hugging_faces(engine_f32, demo_checkpoint, turns, candidates)
    assert scored.prompt_tokens == len(prompt_ids) and len(scored.candidates) == 3
    for text, tokens in zip(candidates, scored.candidates, strict=True):
        assert engine_f32.tokenizer.decode([t.id for t in tokens]).replace("<NL>", "\n") == text
    newline = engine_f32.tokenizer.encode("<NL>")
    assert len(newline) == 1 and newline[0] in [t.id for t in scored.candidates[1]]
