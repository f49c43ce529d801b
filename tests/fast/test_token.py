"""A row's token choice in the decode loop (engine/token.py), without a model: the penalties and bans equal Hugging
Face's own logits processors on random logits, sampling keeps to top-k and top-p, and a seed decides the draws."""

from __future__ import annotations

import numpy as np
import pytest

from jachat.service.engine.token import Chooser, Decoding, top_indices

VOCAB = 64
EOS = 3


def logits(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 3, VOCAB).astype(np.float32)


def hf_processed(prompt: list[int], generated: list[int], scores: np.ndarray, d: Decoding) -> np.ndarray:
    import torch
    from transformers.generation.logits_process import (
        MinNewTokensLengthLogitsProcessor,
        NoRepeatNGramLogitsProcessor,
        RepetitionPenaltyLogitsProcessor,
    )

    ids = torch.tensor([prompt + generated])
    out = torch.tensor(scores)[None].clone()
    if d.repetition_penalty != 1.0:
        out = RepetitionPenaltyLogitsProcessor(d.repetition_penalty)(ids, out)
    if d.no_repeat_ngram_size:
        out = NoRepeatNGramLogitsProcessor(d.no_repeat_ngram_size)(ids, out)
    if d.min_new_tokens:
        out = MinNewTokensLengthLogitsProcessor(len(prompt), d.min_new_tokens, EOS)(ids, out)
    result: np.ndarray = out[0].numpy()
    return result


@pytest.mark.parametrize(
    "decoding",
    [
        Decoding(repetition_penalty=1.1),
        Decoding(repetition_penalty=1.5, no_repeat_ngram_size=2),
        Decoding(no_repeat_ngram_size=1),
        Decoding(no_repeat_ngram_size=3, min_new_tokens=4),
        Decoding(repetition_penalty=0.8, min_new_tokens=2),
    ],
)
def test_the_processed_logits_are_hugging_faces_over_the_prompt_and_the_reply(decoding: Decoding) -> None:
    rng = np.random.default_rng(7)
    prompt = [int(i) for i in rng.integers(4, 20, size=12)]  # a small alphabet: n-grams repeat
    chooser = Chooser(decoding, prompt, EOS, VOCAB)
    generated: list[int] = []
    for step in range(10):
        scores = logits(step)
        expected = hf_processed(prompt, generated, scores, decoding)
        np.testing.assert_allclose(chooser.processed(scores), expected, rtol=1e-6)
        token, _ = chooser.choose(scores)
        assert token == int(np.argmax(expected))  # greedy: top_k 1
        generated.append(token)


def test_a_tokens_log_probability_is_the_log_softmax_of_the_processed_logits() -> None:
    chooser = Chooser(Decoding(repetition_penalty=1.3, logprobs=True), [5, 6], EOS, VOCAB)
    scores = logits(1)
    processed = chooser.processed(scores)
    token, log_prob = chooser.choose(scores)
    reference = processed - np.max(processed) - np.log(np.sum(np.exp(processed - np.max(processed))))
    assert log_prob == pytest.approx(float(reference[token]), abs=1e-5)
    assert Chooser(Decoding(), [5], EOS, VOCAB).choose(scores)[1] is None  # not asked for


def draws(decoding: Decoding, n: int = 300, seed: int = 3) -> list[int]:
    chooser = Chooser(decoding, [5], EOS, VOCAB)
    return [chooser.choose(logits(seed))[0] for _ in range(n)]


def test_sampling_keeps_to_top_k_and_reaches_all_of_it() -> None:
    scores = logits(3)
    top = set(np.argsort(-scores)[:5].tolist())
    assert set(draws(Decoding(top_k=5, temperature=5.0, seed=1))) == top


def test_sampling_keeps_to_the_smallest_set_that_reaches_top_p() -> None:
    scores = logits(3)
    probs = np.exp(scores - scores.max())
    probs /= probs.sum()
    order = np.argsort(-probs)
    cumulative = np.cumsum(probs[order])
    keep = int(np.searchsorted(cumulative, 0.9) + 1)  # the first place where the sum reaches 0.9, included
    got = set(draws(Decoding(top_k=0, top_p=0.9, seed=2), n=2000))
    assert got == set(order[:keep].tolist())


def test_a_low_temperature_samples_the_likeliest_token() -> None:
    assert set(draws(Decoding(top_k=0, temperature=0.01, seed=4))) == {int(np.argmax(logits(3)))}


def test_min_new_tokens_bans_eos_until_reached() -> None:
    scores = np.zeros(VOCAB, dtype=np.float32)
    scores[EOS] = 10.0
    chooser = Chooser(Decoding(min_new_tokens=2), [5], EOS, VOCAB)
    assert [chooser.choose(scores)[0] for _ in range(3)][2] == EOS
    assert EOS not in [Chooser(Decoding(min_new_tokens=2), [5], EOS, VOCAB).choose(scores)[0]]


def test_a_seed_decides_the_draws_and_another_seed_draws_otherwise() -> None:
    sampled = Decoding(top_k=0, temperature=2.0, seed=11)
    assert draws(sampled) == draws(sampled)
    assert draws(sampled) != draws(Decoding(top_k=0, temperature=2.0, seed=12))


def test_a_jobs_options_become_each_rows_decoding() -> None:
    options = {
        "sampling_topk": 50,
        "sampling_topp": 0.9,
        "sampling_temperature": 0.7,
        "repetition_penalty": 1.1,
        "no_repeat_ngram_size": 3,
        "min_length": 2,
        "return_scores": True,
    }
    rows = Decoding.from_options(options, 2, [7, None])
    assert rows[0] == Decoding(50, 0.9, 0.7, 1.1, 3, 2, True, 7)
    assert rows[1].seed is None and rows[1].top_k == 50
    assert Decoding.from_options({}, 3) == [Decoding()] * 3


@pytest.mark.parametrize("spread", [0.3, 3.0, 30.0])
def test_the_nucleus_is_the_smallest_set_that_reaches_top_p_flat_or_peaked(spread: float) -> None:
    """Over a vocabulary of 32,000: a flat distribution (the nucleus beyond the first few hundred, found by one
    sort of the probabilities) and peaked ones (inside them)."""
    values = np.random.default_rng(8).normal(0, spread, 32_000).astype(np.float32)
    probs = np.exp(values - values.max())
    probs /= probs.sum()
    order = np.argsort(-probs, kind="stable")
    cumulative = np.cumsum(probs[order])
    expected = set(order[: int(np.count_nonzero(cumulative - probs[order] < 0.9))].tolist())
    candidates, kept = Chooser._nucleus(np.arange(values.size), values, probs, 0.9)
    assert set(candidates.tolist()) == expected
    np.testing.assert_allclose(kept, probs[candidates])


def test_top_indices_are_the_k_largest_whatever_the_values() -> None:
    rng = np.random.default_rng(5)
    cases = [
        rng.standard_normal(32000).astype(np.float32),
        np.sort(rng.standard_normal(32000).astype(np.float32)),  # the largest all at one end: missed by a subsample
        np.where(rng.random(32000) < 0.99, -np.inf, rng.standard_normal(32000)).astype(np.float32),  # banned
        np.repeat(rng.standard_normal(4000).astype(np.float32), 8),  # ties everywhere
    ]
    for values in cases:
        for k in (1, 5, 50, 256):
            got = top_indices(values, k)
            assert got.size == k == np.unique(got).size
            assert np.sort(values[got])[::-1].tolist() == np.sort(values)[::-1][:k].tolist()
