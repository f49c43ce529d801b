"""The native decoder (native/, scripts/build-native) and the decode loop on the demo checkpoints: logits equal stock
CTranslate2's while rows join and leave, greedy replies equal Hugging Face's whatever runs beside them, seeds decide
sampled replies, and the engine falls back to static batches, in one line, where the decoder is absent or wrong."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from jachat.service.domain.errors import InvalidRequest
from jachat.service.domain.results import Completion, Delta
from jachat.service.domain.sampling import SamplingOptions
from jachat.service.engine import native
from jachat.service.engine.engine import Engine
from jachat.service.engine.loop import CHUNK_TOKENS
from jachat.service.engine.options import EngineOptions
from jachat.service.text.prompt import Speaker, Turn, render_prompt
from tests.helpers import hf_generate
from tests.test_parity import GREEDY as PARITY_GREEDY
from tests.test_parity import PROMPTS, scores_equal_hugging_faces, streamed_logprobs_equal_hugging_faces
from tests.test_parity import run as parity_run

REPO = Path(__file__).resolve().parent.parent
FLOAT32 = 4e-6  # stock's logits against ours, every row, every step (float32)
GREEDY = SamplingOptions(temperature=0.0, repetition_penalty=1.0, max_new_tokens=24)


def decoder_module() -> Any:
    import ctranslate2  # noqa: F401  (the wheel's library, which the module links)

    try:
        return native.module()
    except ImportError as exc:
        pytest.fail(f"the native decoder is not built ({exc}): scripts/build-native")


def vocabulary(model: Path) -> list[str]:
    words: list[str] = json.loads((model / "vocabulary.json").read_text(encoding="utf-8"))
    return words


def test_rows_joining_and_leaving_at_any_step_have_stock_logits(model_f32: Path) -> None:
    """Rows of different lengths join at different steps and some leave, so the cache is padded, grown and
    trimmed; every row's logits at every step equal stock CTranslate2's forward pass over that row alone."""
    import ctranslate2

    ours = decoder_module().Decoder(str(model_f32), "cpu", "float32", 0, 1)
    stock = ctranslate2.Generator(str(model_f32), device="cpu", compute_type="float32", intra_threads=1)
    words = vocabulary(model_f32)
    rng = np.random.default_rng(3)
    joins = {0: [(1, 5)], 2: [(2, 9)], 5: [(3, 1)], 7: [(4, 12)], 13: [(5, 30)]}
    leaves = {9: [2], 11: [1]}
    tokens: dict[int, list[int]] = {}
    worst, compared = 0.0, 0

    def check(row: int, logits: np.ndarray) -> int:
        nonlocal worst, compared
        reference = np.asarray(stock.forward_batch([[words[i] for i in tokens[row]]]))[0, -1]
        worst, compared = max(worst, float(np.max(np.abs(logits - reference)))), compared + 1
        token = int(np.argmax(logits))
        tokens[row].append(token)
        return token

    feed: dict[int, int] = {}
    for step in range(18):
        for row in leaves.get(step, []):
            ours.drop([row])
            del feed[row]
        for row, length in joins.get(step, []):
            tokens[row] = [int(i) for i in rng.integers(4, len(words), size=length)]
            ours.join(row, tokens[row])  # its last prompt token is its input at this step
            feed[row] = tokens[row][-1]
        out = ours.step_array([feed[row] for row in ours.rows])
        for row, logits in zip(ours.rows, out, strict=True):
            feed[row] = check(row, logits)
        assert ours.cache_columns == max(ours.lengths)  # trimmed to the longest running row
    assert compared == 47 and worst <= FLOAT32, worst  # 47: every row at every step of the schedule


def test_a_prompt_prefilled_in_chunks_beside_running_rows_has_stock_logits(model_f32: Path) -> None:
    """extend: a long prompt prefilled a chunk at a time, outside the running batch, between its steps; join then
    prefills the rest and the row runs. Its logits are stock CTranslate2's on that row alone, and the rows already
    running are untouched by it; a row dropped while pending leaves nothing behind."""
    import ctranslate2

    ours = decoder_module().Decoder(str(model_f32), "cpu", "float32", 0, 1)
    stock = ctranslate2.Generator(str(model_f32), device="cpu", compute_type="float32", intra_threads=1)
    words = vocabulary(model_f32)
    rng = np.random.default_rng(11)
    running = [int(i) for i in rng.integers(4, len(words), size=9)]
    long = [int(i) for i in rng.integers(4, len(words), size=300)]

    def reference(ids: list[int]) -> np.ndarray:
        last: np.ndarray = np.asarray(stock.forward_batch([[words[i] for i in ids]]))[0, -1]
        return last

    ours.join(1, running)
    feed = running[-1]
    for start in range(0, 299, 128):  # 128, 128, then 43: the last prompt token is the row's input
        out = ours.step_array([feed])
        assert np.max(np.abs(out[0] - reference(running))) <= FLOAT32  # the running row, as if alone
        running.append(feed := int(np.argmax(out[0])))
        ours.extend(2, long[start : min(start + 128, 299)])
        assert ours.pending(2) == min(start + 128, 299) and ours.rows == [1]
    ours.join(2, long)
    assert ours.pending(2) == 0 and ours.rows == [1, 2]
    out = ours.step_array([feed, long[-1]])
    assert np.max(np.abs(out[0] - reference(running))) <= FLOAT32
    assert np.max(np.abs(out[1] - reference(long))) <= FLOAT32
    ours.extend(3, long[:50])
    ours.drop([3])
    assert ours.pending(3) == 0 and ours.rows == [1, 2]


def test_scores_equal_stock_forward_batch(model_f32: Path) -> None:
    import ctranslate2

    ours = decoder_module().Decoder(str(model_f32), "cpu", "float32", 0, 1)
    stock = ctranslate2.Generator(str(model_f32), device="cpu", compute_type="float32", intra_threads=1)
    words = vocabulary(model_f32)
    ids = [int(i) for i in np.random.default_rng(5).integers(4, len(words), size=50)]
    log_probs = np.asarray(stock.forward_batch([[words[i] for i in ids]], return_log_probs=True))[0, :-1]
    chosen, best, best_scores = ours.score(ids)
    np.testing.assert_allclose(chosen, log_probs[np.arange(49), ids[1:]], atol=1e-5)
    assert best == log_probs.argmax(axis=1).tolist()
    np.testing.assert_allclose(best_scores, log_probs.max(axis=1), atol=1e-5)
    with pytest.raises(ValueError, match="two tokens"):
        ours.score(ids[:1])


@pytest.mark.parametrize("compute_type", ["float32", "int8"])
def test_the_self_test_passes_on_the_real_library_and_refuses_a_wrong_expectation(
    model_f32: Path, compute_type: str
) -> None:
    import ctranslate2

    decoder_module()
    stock = ctranslate2.Generator(str(model_f32), device="cpu", compute_type=compute_type, intra_threads=1)
    expected = native.expect(stock, vocabulary(model_f32))
    decoder, line = native.start(str(model_f32), "cpu", 0, compute_type, 1, expected)
    assert decoder is not None and line.startswith("self-test passed"), line
    wrong = native.Expectation(expected.prompt, expected.tokens, expected.logits + 1e-3)
    refused, why = native.start(str(model_f32), "cpu", 0, compute_type, 1, wrong)
    assert refused is None and why.startswith("self-test failed: logits differ from stock CTranslate2's"), why
    assert native.check(decoder, wrong, native.tolerance(compute_type)) is not None
    assert decoder.rows == []  # the self-test leaves no row behind


def test_a_build_without_the_headers_leaves_no_module_and_says_so_in_one_line(tmp_path: Path) -> None:
    stale = tmp_path / "_native.cpython-311-x86_64-linux-gnu.so"
    stale.write_bytes(b"an older build")
    env = {**os.environ, "JACHAT_CT2_INCLUDE": str(tmp_path / "nowhere"), "JACHAT_NATIVE_DIR": str(tmp_path)}
    done = subprocess.run([REPO / "scripts" / "build-native"], env=env, capture_output=True, text=True, check=True)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "no CTranslate2" in lines[0] and "static batches" in lines[0], lines
    assert not stale.exists()


def run(engine: Engine, prompt_ids: list[int], options: SamplingOptions) -> Completion:
    return parity_run(engine, prompt_ids, options)[1]


async def staggered(engine: Engine, calls: list[tuple[list[int], SamplingOptions]], gap: int = 3) -> list[Completion]:
    """The calls started one after another, each once the one before has `gap` tokens: each joins a running
    batch at a different step, beside rows at other positions."""
    seen: list[int] = [0] * len(calls)
    started = [asyncio.Event() for _ in calls]

    async def one(index: int, prompt_ids: list[int], options: SamplingOptions) -> Completion:
        if index:
            await started[index - 1].wait()
        async for item in engine.stream(prompt_ids, options):
            if isinstance(item, Delta):
                seen[index] += len(item.tokens)
                if seen[index] >= gap:
                    started[index].set()
            else:
                started[index].set()
                return item
        raise AssertionError("no completion")

    return list(await asyncio.gather(*(one(i, p, o) for i, (p, o) in enumerate(calls))))


@pytest.fixture(scope="module")
def loop_f32(model_f32: Path) -> Iterator[Engine]:
    decoder_module()
    engine = Engine(EngineOptions(model_f32, device="cpu", decode_loop="native"))
    assert engine.loop
    yield engine
    engine.close()


def test_greedy_replies_equal_hugging_faces_for_calls_that_join_a_running_batch(
    loop_f32: Engine, demo_checkpoint: Path
) -> None:
    prompts = [loop_f32.tokenizer.encode(render_prompt(turns)) for turns in PROMPTS]
    replies = asyncio.run(staggered(loop_f32, [(p, GREEDY) for p in prompts]))
    for prompt_ids, reply in zip(prompts, replies, strict=True):
        assert list(reply.token_ids) == hf_generate(demo_checkpoint, prompt_ids, GREEDY.max_new_tokens)
    alone = run(loop_f32, prompts[2], GREEDY)
    assert alone.token_ids == replies[2].token_ids  # the same alone and in a batch


def test_a_long_prompt_prefilled_in_chunks_beside_running_calls_gives_hugging_faces_reply(
    loop_f32: Engine, demo_checkpoint: Path
) -> None:
    """A prompt of 700-odd tokens (loop.CHUNK_TOKENS a gap) joins between the steps of two running calls."""
    short = [loop_f32.tokenizer.encode(render_prompt(turns)) for turns in PROMPTS[:2]]
    long = loop_f32.tokenizer.encode(render_prompt([Turn(Speaker.USER, "吾輩は猫である。名前はまだ無い。" * 40)]))
    assert len(long) > 2 * CHUNK_TOKENS + 1
    replies = asyncio.run(staggered(loop_f32, [(short[0], GREEDY), (long, GREEDY), (short[1], GREEDY)], gap=2))
    for prompt_ids, reply in zip([short[0], long, short[1]], replies, strict=True):
        assert list(reply.token_ids) == hf_generate(demo_checkpoint, prompt_ids, GREEDY.max_new_tokens)


def test_the_repetition_penalty_is_hugging_faces_over_prompt_and_reply_beside_other_options(
    loop_f32: Engine, demo_checkpoint: Path
) -> None:
    """Calls with the penalty, prompts of different lengths, share the running batch with sampled calls."""
    penalty = SamplingOptions(temperature=0.0, repetition_penalty=1.1, max_new_tokens=24)
    card = SamplingOptions(max_new_tokens=24, seed=1)
    prompts = [loop_f32.tokenizer.encode(render_prompt(turns)) for turns in PROMPTS[:4]]
    calls = [(prompts[0], penalty), (prompts[1], card), (prompts[2], penalty), (prompts[3], penalty)]
    replies = asyncio.run(staggered(loop_f32, calls))
    for (prompt_ids, options), reply in zip(calls, replies, strict=True):
        if options is penalty:
            expected = hf_generate(demo_checkpoint, prompt_ids, 24, repetition_penalty=1.1)
            assert list(reply.token_ids) == expected


def test_token_logprobs_equal_hugging_faces_log_softmax(loop_f32: Engine, demo_checkpoint: Path) -> None:
    prompt_ids = loop_f32.tokenizer.encode(render_prompt(PROMPTS[1]))
    [generated] = streamed_logprobs_equal_hugging_faces(loop_f32, demo_checkpoint, [prompt_ids])
    assert len(generated) == PARITY_GREEDY.max_new_tokens  # the helper streams test_parity's greedy options


def test_a_seed_gives_the_same_sampled_reply_alone_and_beside_other_traffic(loop_f32: Engine) -> None:
    """With the card's sampling. A row's logits in a batch differ from its logits alone by the kernels' rounding
    (float32: up to 4e-6, measured on the bench model before and after the cache's spare columns), so a draw that
    falls that close to a boundary between two tokens can differ. Temperature 1 over the whole vocabulary of the
    untrained demo model (nearly uniform: 32,000 boundaries 3e-5 apart) made that likely (it flipped a token when
    the cache changed shape); the card's top-k 50 leaves boundaries far apart."""
    prompt_ids = loop_f32.tokenizer.encode(render_prompt(PROMPTS[0]))
    seeded = SamplingOptions(max_new_tokens=24, seed=42)  # the card's: temperature 0.7, top-k 50, penalty 1.1
    alone = [run(loop_f32, prompt_ids, seeded).token_ids for _ in range(3)]
    others = [(loop_f32.tokenizer.encode(render_prompt(t)), SamplingOptions(max_new_tokens=30)) for t in PROMPTS[1:4]]
    beside = asyncio.run(staggered(loop_f32, [*others[:2], (prompt_ids, seeded), others[2]], gap=2))[2].token_ids
    assert alone[0] == alone[1] == alone[2] == beside
    other_seed = SamplingOptions(max_new_tokens=24, seed=43)
    assert run(loop_f32, prompt_ids, other_seed).token_ids != alone[0]


def test_scoring_on_the_loop_equals_hugging_faces_teacher_forced(loop_f32: Engine, demo_checkpoint: Path) -> None:
    scored = scores_equal_hugging_faces(loop_f32, demo_checkpoint, PROMPTS[1], ["東京です。", "吾輩は猫である。"])
    assert len(scored.candidates) == 2


def test_without_the_decoder_auto_serves_static_batches_and_says_so_in_one_line(
    model_f32: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("JACHAT_NATIVE", "off")  # the engine process inherits it: the module goes unused
    caplog.set_level(logging.INFO, logger="jachat")
    engine = Engine(EngineOptions(model_f32, device="cpu", decode_loop="auto"))
    try:
        assert not engine.loop
        said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("native decoder")]
        assert said == [
            "native decoder: not built (JACHAT_NATIVE=off; scripts/build-native builds it); serving with static batches"
        ], said
        prompt_ids = engine.tokenizer.encode(render_prompt(PROMPTS[1]))
        assert len(run(engine, prompt_ids, GREEDY).token_ids) == GREEDY.max_new_tokens
        with pytest.raises(InvalidRequest, match=r"sampling\.seed"):
            run(engine, prompt_ids, SamplingOptions(seed=1))
    finally:
        engine.close()


def test_native_without_the_decoder_refuses_to_start_and_says_why(
    model_f32: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("JACHAT_NATIVE", "off")
    with pytest.raises(RuntimeError, match=r"--decode-loop native.*not built"):
        Engine(EngineOptions(model_f32, device="cpu", decode_loop="native"))


def test_one_token_prompts_join_leave_and_reset_cleanly(model_f32: Path) -> None:
    """Rows that joined with one token hold no cache column until their first step: dropping one of them, or
    resetting the decoder, leaves a decoder that steps on."""
    ours = decoder_module().Decoder(str(model_f32), "cpu", "float32", 0, 1)
    ours.join(1, [100])
    ours.join(2, [200])
    ours.drop([1])
    assert ours.rows == [2] and ours.cache_columns == 0
    assert ours.step_array([200]).shape == (1, ours.vocab_size)
    ours.join(3, [5, 6, 7])
    ours.reset()
    assert ours.rows == [] and ours.cache_columns == 0
    ours.join(4, [8])
    assert ours.step_array([8]).shape == (1, ours.vocab_size)
