"""OpenAI's chat completion replies: the engine's results as OpenAI's JSON (chat.completion, its stream chunks,
models, errors). openai_request.py reads the requests."""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from typing import Any

from jachat.service.domain.results import Completion, FinishReason, GeneratedToken, ModelInfo

FINISH_REASONS = {FinishReason.END_OF_TURN: "stop", FinishReason.STOP: "stop", FinishReason.LENGTH: "length"}


def completion_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex


def usage(completion: Completion) -> dict[str, int]:
    return {
        "prompt_tokens": completion.prompt_tokens,
        "completion_tokens": completion.completion_tokens,
        "total_tokens": completion.prompt_tokens + completion.completion_tokens,
    }


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


def token_text(data: bytes) -> str:
    """A token as OpenAI spells it: its text, or `bytes:\\xe3` for a byte-fallback token that is part of a
    character."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{byte:02x}" for byte in data)


def completion_body(
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
        "usage": usage(completion),
        "system_fingerprint": None,
    }


def chunk_body(
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


def usage_chunk(cid: str, model: str, completion: Completion) -> dict[str, Any]:
    return {
        "id": cid,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [],
        "usage": usage(completion),
        "system_fingerprint": None,
    }


def models_body(info: ModelInfo, created: int) -> dict[str, Any]:
    return {"object": "list", "data": [model_body(info, created)]}


def model_body(info: ModelInfo, created: int) -> dict[str, Any]:
    return {"id": info.model_name, "object": "model", "created": created, "owned_by": "jachat"}


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """OpenAI's error shape."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
