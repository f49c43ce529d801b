"""OpenAI's replies, both routes': the engine's results as OpenAI's JSON. Chat: chat.completion and its stream
chunks (with `logprobs.content`); completions: text_completion, its chunks and its `logprobs` object (tokens,
token_logprobs, top_logprobs, text_offset); the models list; and the JSON response of any body or error (an error's
shape is status.py's). request.py and the routes' own request modules read the requests."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from jachat.service.domain.results import Completion, FinishReason, GeneratedToken, ModelInfo, PromptScores
from jachat.service.edge.http.status import HttpError
from jachat.service.text.tokenizer import StreamDecoder

FINISH_REASONS = {FinishReason.END_OF_TURN: "stop", FinishReason.STOP: "stop", FinishReason.LENGTH: "length"}


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        text=json.dumps(body, ensure_ascii=False), status=status, content_type="application/json", headers=headers
    )


def error_response(error: HttpError, headers: dict[str, str] | None = None) -> web.Response:
    """An error in OpenAI's shape, with the headers its status calls for (Retry-After, WWW-Authenticate)."""
    return json_response(error.body(), error.status, {**(headers or {}), **error.headers()})


def chat_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex


def text_completion_id() -> str:
    return "cmpl-" + uuid.uuid4().hex


def usage_body(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def token_text(data: bytes) -> str:
    """A token as OpenAI spells it: its text, or `bytes:\\xe3` for a byte-fallback token that is part of a
    character."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{byte:02x}" for byte in data)


def models_body(info: ModelInfo, created: int) -> dict[str, Any]:
    return {"object": "list", "data": [model_body(info, created)]}


def model_body(info: ModelInfo, created: int) -> dict[str, Any]:
    return {"id": info.model_name, "object": "model", "created": created, "owned_by": "jachat"}


# ---- chat ----


def logprobs_content(tokens: Sequence[GeneratedToken], token_bytes: Sequence[bytes]) -> list[dict[str, Any]]:
    """OpenAI's logprobs.content: per chosen token its text, its UTF-8 bytes and its log-probability (after the
    repetition penalty, before temperature and top-k/top-p, as gRPC's Token.logprob). A byte-fallback token that
    is part of a character is spelled `bytes:\\xe3`, as OpenAI spells them."""
    return [
        {
            "token": token_text(token_bytes[token.id]),
            "logprob": token.logprob,
            "bytes": list(token_bytes[token.id]),
            "top_logprobs": [],
        }
        for token in tokens
    ]


def chat_body(
    cid: str, model: str, text: str, completion: Completion, logprobs: list[dict[str, Any]] | None
) -> dict[str, Any]:
    return {
        "id": cid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text, "refusal": None},
                "logprobs": None if logprobs is None else {"content": logprobs, "refusal": None},
                "finish_reason": FINISH_REASONS.get(completion.finish_reason, "stop"),
            }
        ],
        "usage": usage_body(completion.prompt_tokens, completion.completion_tokens),
        "system_fingerprint": None,
    }


def chat_chunk_body(
    cid: str,
    model: str,
    delta: dict[str, Any],
    finish_reason: str | None = None,
    logprobs: list[dict[str, Any]] | None = None,
    with_usage: bool = False,
) -> dict[str, Any]:
    """One chat.completion.chunk; with stream_options.include_usage every chunk but the last has usage null."""
    body: dict[str, Any] = {
        "id": cid,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "delta": delta,
                "logprobs": None if logprobs is None else {"content": logprobs, "refusal": None},
                "finish_reason": finish_reason,
            }
        ],
        "system_fingerprint": None,
    }
    if with_usage:
        body["usage"] = None
    return body


def chat_usage_chunk(cid: str, model: str, completion: Completion) -> dict[str, Any]:
    return {
        "id": cid,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [],
        "usage": usage_body(completion.prompt_tokens, completion.completion_tokens),
        "system_fingerprint": None,
    }


# ---- completions ----


@dataclass(frozen=True)
class Entry:
    """One token of a choice's logprobs: its log-probability (None for a prompt's first token, which has no
    context) and the most likely token at its place (None when not asked or not known)."""

    id: int
    logprob: float | None
    top: GeneratedToken | None = None


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


def text_completion_body(cid: str, model: str, choices: list[dict[str, Any]], usage: dict[str, int]) -> dict[str, Any]:
    return {
        "id": cid,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": usage,
        "system_fingerprint": None,
    }


def text_chunk_body(
    cid: str, model: str, choices: list[dict[str, Any]], with_usage: bool, usage: dict[str, int] | None = None
) -> dict[str, Any]:
    """One streamed text_completion; with stream_options.include_usage every chunk but the last has usage null."""
    body = text_completion_body(cid, model, choices, {})
    del body["usage"]
    if with_usage or usage is not None:
        body["usage"] = usage
    return body
