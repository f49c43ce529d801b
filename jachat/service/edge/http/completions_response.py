"""OpenAI's (legacy) completions replies: text_completion bodies, their stream chunks and their `logprobs` object
(tokens, token_logprobs, top_logprobs, text_offset). completions_request.py reads the requests."""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from jachat.service.domain.results import GeneratedToken, PromptScores
from jachat.service.edge.http.openai_response import token_text
from jachat.service.text.tokenizer import StreamDecoder


@dataclass(frozen=True)
class Entry:
    """One token of a choice's logprobs: its log-probability (None for a prompt's first token, which has no
    context) and the most likely token at its place (None when not asked or not known)."""

    id: int
    logprob: float | None
    top: GeneratedToken | None = None


def completion_id() -> str:
    return "cmpl-" + uuid.uuid4().hex


def prompt_entries(ids: Sequence[int], scores: PromptScores) -> list[Entry]:
    """An echoed prompt's tokens: the first without a log-probability, as OpenAI's API gives it."""
    tops: Sequence[GeneratedToken | None] = scores.top or [None] * len(scores.tokens)
    return [Entry(ids[0], None), *(Entry(t.id, t.logprob, top) for t, top in zip(scores.tokens, tops, strict=True))]


def generated_entries(tokens: Sequence[GeneratedToken], top: bool) -> list[Entry]:
    """Generated tokens; with `top` (greedy decoding only: the request's rules) each is its place's most likely."""
    return [Entry(t.id, t.logprob, t if top else None) for t in tokens]


class Offsets:
    """text_offset: where each token's text starts in the choice's text, in characters (a token that ends inside a
    character starts where that character will)."""

    def __init__(self, token_bytes: Sequence[bytes]) -> None:
        self.decoder = StreamDecoder(token_bytes)
        self.at = 0

    def take(self, ids: Sequence[int]) -> list[int]:
        out = []
        for token_id in ids:
            out.append(self.at)
            self.at += len(self.decoder.feed(token_id))
        return out


def logprobs_body(
    entries: Sequence[Entry], token_bytes: Sequence[bytes], offsets: Offsets, top: bool
) -> dict[str, Any]:
    """OpenAI's completions logprobs: top_logprobs holds each place's most likely token (`logprobs: 1`), else null."""
    tops = [None if e.top is None else {token_text(token_bytes[e.top.id]): e.top.logprob} for e in entries]
    return {
        "tokens": [token_text(token_bytes[e.id]) for e in entries],
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": tops if top else None,
        "text_offset": offsets.take([e.id for e in entries]),
    }


def choice(index: int, text: str, logprobs: dict[str, Any] | None, finish_reason: str | None) -> dict[str, Any]:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


def usage_body(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion_body(cid: str, model: str, choices: list[dict[str, Any]], usage: dict[str, int]) -> dict[str, Any]:
    return {
        "id": cid,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": usage,
        "system_fingerprint": None,
    }


def chunk_body(
    cid: str, model: str, choices: list[dict[str, Any]], with_usage: bool, usage: dict[str, int] | None = None
) -> dict[str, Any]:
    """One streamed text_completion; with stream_options.include_usage every chunk but the last has usage null."""
    body = completion_body(cid, model, choices, {})
    del body["usage"]
    if with_usage or usage is not None:
        body["usage"] = usage
    return body
