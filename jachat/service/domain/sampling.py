"""Sampling options: the model card's defaults, validation, and CTranslate2's argument names."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from jachat.service.errors import FieldViolation

MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 256
MAX_TEMPERATURE = 100.0
MAX_REPETITION_PENALTY = 100.0
MAX_NO_REPEAT_NGRAM_SIZE = 64


@dataclass(frozen=True)
class SamplingOptions:
    """Decoding options; the defaults are the model card's (do_sample with Hugging Face's default top_k 50)."""

    max_new_tokens: int = 128
    min_new_tokens: int = 0
    temperature: float = 0.7  # 0 means greedy decoding
    top_k: int = 50  # 0 means no limit
    top_p: float = 1.0
    repetition_penalty: float = 1.1  # applies to tokens generated in this reply, not to the prompt
    no_repeat_ngram_size: int = 0
    stop: tuple[str, ...] = field(default=())

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def history_penalty(self) -> bool:
        """Whether decoding depends on the tokens before the current one (then batches need equal prompts)."""
        return self.repetition_penalty != 1.0 or self.no_repeat_ngram_size > 0

    def batch_key(self) -> tuple[tuple[str, Any], ...]:
        """Requests with equal keys can share one generate_batch call."""
        return tuple(sorted(self.ctranslate2_kwargs().items()))

    def violations(self, context_length: int = 2048, vocab_size: int = 32000) -> list[FieldViolation]:
        """Every rule these options break, each naming its field under `sampling.`."""
        problems: list[tuple[str, str]] = []
        if not 1 <= self.max_new_tokens < context_length:
            problems.append(("max_new_tokens", f"must be 1 to {context_length - 1}"))
        if self.min_new_tokens > self.max_new_tokens:
            problems.append(("min_new_tokens", f"must not exceed max_new_tokens ({self.max_new_tokens})"))
        if not 0.0 <= self.temperature <= MAX_TEMPERATURE:  # also refuses NaN
            problems.append(("temperature", f"must be 0 to {MAX_TEMPERATURE:g} (0 means greedy)"))
        if self.top_k > vocab_size:
            problems.append(("top_k", f"must be at most the vocabulary size, {vocab_size} (0 means no limit)"))
        if not 0.0 < self.top_p <= 1.0:
            problems.append(("top_p", "must be in (0, 1]"))
        if not 0.0 < self.repetition_penalty <= MAX_REPETITION_PENALTY:
            problems.append(("repetition_penalty", f"must be in (0, {MAX_REPETITION_PENALTY:g}] (1 disables it)"))
        if self.no_repeat_ngram_size > MAX_NO_REPEAT_NGRAM_SIZE:
            problems.append(("no_repeat_ngram_size", f"must be 0 to {MAX_NO_REPEAT_NGRAM_SIZE}"))
        if len(self.stop) > MAX_STOP_STRINGS:
            problems.append(("stop", f"at most {MAX_STOP_STRINGS} stop strings"))
        for i, s in enumerate(self.stop):
            if not s or len(s) > MAX_STOP_LENGTH:
                problems.append((f"stop[{i}]", f"must be 1 to {MAX_STOP_LENGTH} characters"))
        return [FieldViolation(f"sampling.{name}", why) for name, why in problems]

    def ctranslate2_kwargs(self) -> dict[str, Any]:
        """generate_batch arguments (besides lengths, which depend on the prompt)."""
        return {
            "sampling_topk": 1 if self.greedy else self.top_k,
            "sampling_topp": 1.0 if self.greedy else self.top_p,
            "sampling_temperature": 1.0 if self.greedy else self.temperature,
            "repetition_penalty": self.repetition_penalty,
            "no_repeat_ngram_size": self.no_repeat_ngram_size,
            "min_length": self.min_new_tokens,
        }
