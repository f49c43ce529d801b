"""One row's next token from its logits, with the row's own options, picked as Hugging Face's `generate` picks it.

The logits are processed in Hugging Face's order: the repetition penalty over every token the row has seen, its
prompt and its reply (a positive logit divided by the penalty, a negative one multiplied), no-repeat n-grams over
the same tokens, `</s>` banned until min_new_tokens; then, to sample, the temperature, top-k and top-p (the smallest
set of the likeliest tokens whose probability reaches top_p, at least one), and a draw from the row's own generator:
seeded, a row gives the same tokens whatever runs beside it. A token's log-probability is the log-softmax of the
processed logits before the temperature, as CTranslate2's `return_scores` gives it for static batches.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

NUCLEUS_HEAD = 256  # the likeliest candidates sorted first for top-p (token._nucleus)
SAMPLE_STRIDE = 8  # top_indices: every 8th value gives a threshold that the k largest all reach


def top_indices(values: np.ndarray, k: int) -> np.ndarray:
    """The indices of the k largest values, in no order (0 < k < values.size).

    The k-th largest of a subsample (every SAMPLE_STRIDE-th value) is at most the k-th largest of all, so every one
    of the k largest reaches it: they are found among the few values that do, not by partitioning the vocabulary
    (on 32,000 logits: 27 µs against 68-126 µs for an argpartition of them all, per row per step)."""
    sample = values[::SAMPLE_STRIDE]
    if sample.size > 2 * k:
        threshold = np.partition(sample, sample.size - k)[sample.size - k]
        reach = np.flatnonzero(values >= threshold)
        if reach.size > k:
            return reach[np.argpartition(values[reach], reach.size - k)[reach.size - k :]]
        if reach.size == k:
            return reach
    return np.argpartition(values, values.size - k)[values.size - k :]


@dataclasses.dataclass(frozen=True)
class Decoding:
    """A row's options, as the loop applies them (greedy when top_k is 1)."""

    top_k: int = 1  # 0: no limit
    top_p: float = 1.0
    temperature: float = 1.0
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    min_new_tokens: int = 0
    logprobs: bool = False
    seed: int | None = None  # None: drawn from the operating system's entropy

    def check(self) -> None:
        """Refuse what CTranslate2's generate_batch refuses (the server never sends it: its requests are validated;
        a job that does fails alone, as a static batch's would)."""
        if self.top_k < 0 or not 0 < self.top_p <= 1 or self.temperature < 0 or self.repetition_penalty <= 0:
            raise ValueError(f"decoding options out of range: {self}")
        if self.no_repeat_ngram_size < 0 or self.min_new_tokens < 0:
            raise ValueError(f"decoding options out of range: {self}")

    @classmethod
    def from_options(
        cls, options: dict[str, Any], rows: int, seeds: Sequence[int | None] | None = None
    ) -> list[Decoding]:
        """Each row's options from a job's generate_batch arguments (SamplingOptions.ctranslate2_kwargs, and
        return_scores) and its rows' seeds."""
        common = cls(
            top_k=int(options.get("sampling_topk", 1)),
            top_p=float(options.get("sampling_topp", 1.0)),
            temperature=float(options.get("sampling_temperature", 1.0)),
            repetition_penalty=float(options.get("repetition_penalty", 1.0)),
            no_repeat_ngram_size=int(options.get("no_repeat_ngram_size", 0)),
            min_new_tokens=int(options.get("min_length", 0)),
            logprobs=bool(options.get("return_scores", False)),
        )
        common.check()
        return [dataclasses.replace(common, seed=seed) for seed in (seeds or [None] * rows)]


class Chooser:
    """A row's token choices, one per step, with what they depend on: the tokens seen, the n-grams, the draw."""

    def __init__(self, decoding: Decoding, prompt: Sequence[int], eos_id: int, vocab_size: int) -> None:
        self.decoding, self.eos_id = decoding, eos_id
        self.generated = 0
        self.rng = np.random.default_rng(decoding.seed)
        self.seen: np.ndarray | None = None
        if decoding.repetition_penalty != 1.0:
            self.seen = np.zeros(vocab_size, dtype=bool)
            self.seen[np.asarray(prompt, dtype=np.int64)] = True
        n = decoding.no_repeat_ngram_size
        self.history: list[int] = list(prompt) if n > 0 else []
        self.followers: dict[tuple[int, ...], set[int]] = {}
        if n > 0:
            for end in range(n, len(self.history) + 1):
                self._note(self.history[end - n : end])

    def choose(self, logits: Any) -> tuple[int, float | None]:
        """The next token and, when the row asked, its log-probability."""
        scores = self.processed(logits)
        token = int(np.argmax(scores)) if self.decoding.top_k == 1 else self._draw(scores)
        log_prob = None
        if self.decoding.logprobs:
            top = float(np.max(scores))
            log_prob = float(scores[token]) - top - float(np.log(np.sum(np.exp(scores - top))))
        self._seen(token)
        return token, log_prob

    def processed(self, logits: Any) -> np.ndarray:
        """A copy of the logits after the penalties and bans (the step's array is shared by its rows)."""
        d = self.decoding
        scores = np.array(logits, dtype=np.float32)
        if self.seen is not None:
            seen = np.flatnonzero(self.seen)
            picked = scores[seen]
            scores[seen] = np.where(picked < 0, picked * d.repetition_penalty, picked / d.repetition_penalty)
        n = d.no_repeat_ngram_size
        if n > 0 and len(self.history) >= n - 1:
            banned = self.followers.get(tuple(self.history[len(self.history) - n + 1 :]))
            if banned:
                scores[list(banned)] = -np.inf
        if self.generated < d.min_new_tokens:
            scores[self.eos_id] = -np.inf
        return scores

    def _draw(self, scores: np.ndarray) -> int:
        """Top-k first (a positive temperature keeps the order), then the temperature over the candidates only."""
        d = self.decoding
        candidates: np.ndarray | None = None  # None: the whole vocabulary, in order
        values = scores
        if 0 < d.top_k < scores.size:
            candidates = top_indices(scores, d.top_k)
            values = scores[candidates]
        if d.temperature != 1.0:
            values = values / np.float32(d.temperature)
        probs = np.exp(values - np.max(values))
        if d.top_p < 1.0:
            candidates, probs = self._nucleus(candidates, values, probs / probs.sum(), d.top_p)
        cumulative = np.cumsum(probs)
        index = min(int(np.searchsorted(cumulative, self.rng.random() * cumulative[-1], side="right")), probs.size - 1)
        return index if candidates is None else int(candidates[index])

    @staticmethod
    def _nucleus(
        candidates: np.ndarray | None, values: np.ndarray, probs: np.ndarray, top_p: float
    ) -> tuple[np.ndarray, np.ndarray]:
        """The smallest set of the likeliest candidates whose probability reaches top_p (at least one). It nearly
        always lies among the likeliest few hundred, so those are sorted first; when they fall short, one sort of the
        probabilities finds the cut (an argsort of the vocabulary per row per step cost 4 ms)."""
        if values.size > NUCLEUS_HEAD:
            head = top_indices(values, NUCLEUS_HEAD)
            if probs[head].sum() < top_p:  # a flat distribution: the cut is a probability, found by one sort
                descending = np.sort(probs)[::-1]
                keep = max(1, int(np.count_nonzero(np.cumsum(descending) - descending < top_p)))
                inside = np.flatnonzero(probs >= descending[keep - 1])  # ties at the cut stay in
                return (inside if candidates is None else candidates[inside]), probs[inside]
        else:
            head = np.arange(values.size)
        order = head[np.argsort(-values[head], kind="stable")]
        sorted_probs = probs[order]
        keep = max(1, int(np.count_nonzero(np.cumsum(sorted_probs) - sorted_probs < top_p)))
        return (order[:keep] if candidates is None else candidates[order[:keep]]), sorted_probs[:keep]

    def _seen(self, token: int) -> None:
        self.generated += 1
        if self.seen is not None:
            self.seen[token] = True
        n = self.decoding.no_repeat_ngram_size
        if n > 0:
            self.history.append(token)
            if len(self.history) >= n:
                self._note(self.history[-n:])

    def _note(self, ngram: Sequence[int]) -> None:
        *prefix, last = ngram
        self.followers.setdefault(tuple(prefix), set()).add(last)
