"""Sampling options: one declarative table of the fields (the engine's name, gRPC's, OpenAI's, type, range,
default) that drives validation, both edges' mappings and the README's table; and CTranslate2's argument names."""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field
from typing import Any

from jachat.service.domain.errors import FieldViolation

MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 256
# a temperature below this is greedy decoding, as vLLM takes it: the logits divided by less overflow float32 (a
# denormal temperature made CTranslate2 sample from NaN)
GREEDY_BELOW = 1e-5


def as_float32(value: float) -> float:
    """`value` as the engine receives it: CTranslate2 (and protobuf, over gRPC) holds these options as float32, where
    1e-50 is 0 and 1e39 is infinite. Every range is checked on this value, for both APIs alike."""
    try:
        result: float = struct.unpack("f", struct.pack("f", value))[0]
    except OverflowError:
        return math.copysign(math.inf, value)
    return result


@dataclass(frozen=True)
class SamplingOptions:
    """Decoding options; the defaults are the model card's (do_sample with Hugging Face's default top_k 50)."""

    max_new_tokens: int = 128
    min_new_tokens: int = 0
    temperature: float = 0.7  # 0 means greedy decoding
    top_k: int = 50  # 0 means no limit
    top_p: float = 1.0
    repetition_penalty: float = 1.1  # static batches: the reply's tokens only; the decode loop: prompt and reply
    no_repeat_ngram_size: int = 0
    stop: tuple[str, ...] = field(default=())
    # the row's own random generator's seed (the decode loop only: static batches share CTranslate2's one seed)
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    @property
    def history_penalty(self) -> bool:
        """Whether decoding depends on the tokens before the current one (then batches need equal prompts)."""
        return self.repetition_penalty != 1.0 or self.no_repeat_ngram_size > 0

    def batch_key(self) -> tuple[tuple[str, Any], ...]:
        """Requests with equal keys can share one generate_batch call."""
        return tuple(sorted(self.ctranslate2_kwargs().items()))

    def violations(self, context_length: int = 2048, vocab_size: int = 32000) -> list[FieldViolation]:
        """Every rule these options break, each naming its field under `sampling`."""
        problems: list[tuple[tuple[str | int, ...], str]] = []
        for f in FIELDS:
            why = f.violation(getattr(self, f.name), context_length, vocab_size)
            if why:
                problems.append(((f.name,), why))
        if self.min_new_tokens > self.max_new_tokens:
            problems.append((("min_new_tokens",), f"must not exceed max_new_tokens ({self.max_new_tokens})"))
        if self.seed is not None and not 0 <= self.seed < 2**64:
            problems.append((("seed",), "must be 0 to 18446744073709551615"))
        if len(self.stop) > MAX_STOP_STRINGS:
            problems.append((("stop",), f"at most {MAX_STOP_STRINGS} stop strings"))
        for i, s in enumerate(self.stop):
            if not s or len(s) > MAX_STOP_LENGTH:
                problems.append((("stop", i), f"must be 1 to {MAX_STOP_LENGTH} characters"))
        return [FieldViolation(("sampling", *path), why) for path, why in problems]

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


# Upper bounds that depend on the model: "context" is its context length less one, "vocab" its vocabulary size.
Bound = float | str


@dataclass(frozen=True)
class SamplingField:
    """One optional sampling field, as every layer names and bounds it."""

    name: str  # SamplingOptions' attribute (the engine's name)
    proto: str  # jachat.v1.SamplingParams' field
    openai: str  # the chat completions body's field (jachat's own ride as extra fields, as vLLM's do)
    type: type[int] | type[float]
    low: float
    high: Bound
    low_open: bool = False  # the range excludes `low`
    note: str = ""  # what special values mean

    @property
    def default(self) -> int | float:
        value: int | float = getattr(SamplingOptions(), self.name)
        return value

    def bounds(self, context_length: int, vocab_size: int) -> tuple[float, float]:
        if isinstance(self.high, str):
            return self.low, float({"context": context_length - 1, "vocab": vocab_size}[self.high])
        return self.low, self.high

    def range_text(self, context_length: int = 2048, vocab_size: int = 32000) -> str:
        low, high = (f"{b:g}" for b in self.bounds(context_length, vocab_size))
        return f"in ({low}, {high}]" if self.low_open else f"{low} to {high}"

    def violation(self, value: float, context_length: int, vocab_size: int) -> str | None:
        """Why `value` is out of range, or None. NaN and infinities are out of every range; an integer of any size
        (JSON has no limit) is compared as it is, never converted to a float; a float is compared as the float32 the
        engine receives (so 1e-50 is 0, for either API)."""
        low, high = self.bounds(context_length, vocab_size)
        if isinstance(value, float):
            value, low, high = as_float32(value), as_float32(low), as_float32(high)
        finite = isinstance(value, int) or math.isfinite(value)
        inside = finite and (low < value if self.low_open else low <= value) and value <= high
        if inside:
            return None
        return f"must be {self.range_text(context_length, vocab_size)}" + (f" ({self.note})" if self.note else "")


FIELDS: tuple[SamplingField, ...] = (
    SamplingField("max_new_tokens", "max_new_tokens", "max_tokens", int, 1, "context"),
    SamplingField("min_new_tokens", "min_new_tokens", "min_tokens", int, 0, "context"),
    SamplingField(
        "temperature",
        "temperature",
        "temperature",
        float,
        0,
        100.0,
        note="0 means greedy, as does anything below 1e-05",
    ),
    SamplingField("top_k", "top_k", "top_k", int, 0, "vocab", note="at most the vocabulary size; 0 means no limit"),
    SamplingField("top_p", "top_p", "top_p", float, 0, 1.0, low_open=True),
    # at least 0.01: CTranslate2 divides positive logits by it, and a float32 near 0 made them infinite (NaN)
    SamplingField(
        "repetition_penalty", "repetition_penalty", "repetition_penalty", float, 0.01, 100.0, note="1 disables it"
    ),
    SamplingField("no_repeat_ngram_size", "no_repeat_ngram_size", "no_repeat_ngram_size", int, 0, 64.0, note="0: off"),
)
BY_NAME = {f.name: f for f in FIELDS}
