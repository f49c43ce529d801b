"""/v1/completions: the raw model, as OpenAI's (legacy) completions API defines it, for evaluation harnesses,
scoring callers and the Inference Gateway's model-server protocol.

Each prompt is prepared as written (completions_request.py), generated as a sequence of its own (several prompts of
one call batch like separate calls), and, with `echo`, scored by the engine, every prompt in one scoring job
(Engine.score_prompts: score_batch, or a forward pass when the most likely tokens are asked for). The call frame,
limits, tokens, tenants, priorities, metrics and traces are every route's (frame.py).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator
from typing import Any

from aiohttp import web

from jachat.service.domain.results import Completion, Delta, PromptScores
from jachat.service.edge.calls import Call, Reply
from jachat.service.edge.http.completions_request import TextCompletionRequest, parse_completion
from jachat.service.edge.http.frame import HttpFrame
from jachat.service.edge.http.response import (
    FINISH_REASONS,
    Entry,
    Offsets,
    choice,
    generated_entries,
    logprobs_body,
    prompt_entries,
    text_chunk_body,
    text_completion_body,
    text_completion_id,
    usage_body,
)
from jachat.service.engine.preparation import PreparedRequest
from jachat.service.text.tokenizer import decode

BUILD_OFF_LOOP_TOKENS = 512  # an answer with more tokens than this is built and serialised off the event loop


async def answer(frame: HttpFrame, request: web.Request, call: Call, data: bytes) -> web.StreamResponse:
    parsed = await frame.parse(call, data, parse_completion)
    prepared = [
        await frame.calls.prepare_text(call, text, ("prompt", i) if parsed.listed else ("prompt",))
        for i, text in enumerate(parsed.prompts)
    ]
    top = parsed.logprobs == 1
    scores: list[PromptScores | None] = [None] * len(prepared)
    if parsed.echo and parsed.logprobs is not None:
        scores = list(await frame.calls.score_prompts(call, [p.prompt.ids for p in prepared], top))
    if parsed.common.stream:
        return await _stream(frame, request, call, parsed, prepared[0], scores[0])
    replies = await _replies(frame, call, parsed, prepared)

    def body() -> bytes:
        choices, completion_tokens = [], 0
        for index, (p, score, reply) in enumerate(zip(prepared, scores, replies, strict=True)):
            entries = prompt_entries(p.prompt.ids, score) if score is not None else []
            text = _echo(call, p) if parsed.echo else ""
            finish = "length"
            if reply is not None:
                entries += generated_entries(reply.tokens, top)
                text += reply.text
                finish = FINISH_REASONS.get(reply.completion.finish_reason, "stop")
                completion_tokens += reply.completion.completion_tokens
            logprobs = _logprobs(call, parsed, entries)
            choices.append(choice(index, text, logprobs, finish))
        usage = usage_body(sum(len(p.prompt.ids) for p in prepared), completion_tokens)
        return _dumps(text_completion_body(text_completion_id(), parsed.model, choices, usage)).encode()

    # an answer of many tokens (16 echoed contexts with log-probabilities: 2 MiB of JSON, hundreds of milliseconds)
    # is built and serialised on the preparation pool: the event loop serves everyone
    tokens = sum(len(p.prompt.ids) for p in prepared) if parsed.echo else 0
    tokens += sum(len(r.tokens) for r in replies if r is not None)
    data = await frame.calls.engine().offload(body) if tokens > BUILD_OFF_LOOP_TOKENS else body()
    return web.Response(body=data, content_type="application/json", charset="utf-8")


async def _replies(
    frame: HttpFrame, call: Call, parsed: TextCompletionRequest, prepared: list[PreparedRequest]
) -> list[Reply | None]:
    """Every prompt's whole reply, generated side by side (None: nothing to generate)."""
    if not parsed.prompts[0].generate:
        return [None] * len(prepared)
    logprobs, stop = parsed.logprobs is not None, parsed.common.include_stop
    tasks = [asyncio.ensure_future(frame.calls.reply(call, p, stop, logprobs, raw=True)) for p in prepared]
    try:
        return list(await asyncio.gather(*tasks))
    finally:  # one failure (or the caller leaving) ends the others: the call fails as a whole
        for task in tasks:
            task.cancel()


async def _stream(
    frame: HttpFrame,
    request: web.Request,
    call: Call,
    parsed: TextCompletionRequest,
    prepared: PreparedRequest,
    score: PromptScores | None,
) -> web.StreamResponse:
    """One prompt's completion as server-sent events: the echoed prompt first (with `echo`), a chunk per delta, the
    finish chunk, the usage chunk if asked."""
    cid, model, usage = text_completion_id(), parsed.model, parsed.common.include_usage
    top = parsed.logprobs == 1
    offsets = Offsets(call.token_bytes)

    def logprobs(entries: list[Entry]) -> dict[str, Any] | None:
        return _logprobs(call, parsed, entries, offsets)

    def echoed_prompt() -> list[dict[str, Any]]:
        entries = prompt_entries(prepared.prompt.ids, score) if score is not None else []
        return [text_chunk_body(cid, model, [choice(0, _echo(call, prepared), logprobs(entries), None)], usage)]

    # the echoed prompt's event (a context's log-probabilities: hundreds of KiB) is built off the event loop, now
    first: list[dict[str, Any]] = []
    if parsed.echo:
        many = len(prepared.prompt.ids) > BUILD_OFF_LOOP_TOKENS
        first = await frame.calls.engine().offload(echoed_prompt) if many else echoed_prompt()

    def opening() -> list[dict[str, Any]]:
        return first

    def render(item: Delta | Completion) -> list[dict[str, Any]]:
        entries = generated_entries(item.tokens, top)
        if isinstance(item, Delta):
            return [text_chunk_body(cid, model, [choice(0, item.text, logprobs(entries), None)], usage)]
        finish = FINISH_REASONS.get(item.finish_reason, "stop")
        return _ending(cid, model, finish, logprobs(entries), usage, item.prompt_tokens, item.completion_tokens)

    if not prepared.max_new_tokens:  # echo alone: the prompt, then the end

        def echoed() -> list[dict[str, Any]]:
            return opening() + _ending(cid, model, "length", None, usage, len(prepared.prompt.ids), 0)

        return await frame.events.stream(request, call, _nothing(), echoed, render)
    replies = frame.calls.generate(call, prepared, parsed.common.include_stop, parsed.logprobs is not None, raw=True)
    return await frame.events.stream(request, call, replies, opening, render)


async def _nothing() -> AsyncGenerator[Delta | Completion, None]:
    return
    yield  # an async generator that yields nothing


def _ending(
    cid: str,
    model: str,
    finish: str,
    logprobs: dict[str, Any] | None,
    usage: bool,
    prompt_tokens: int,
    completion_tokens: int,
) -> list[dict[str, Any]]:
    """A stream's last chunks: the finish chunk, and the usage chunk if asked."""
    chunks = [text_chunk_body(cid, model, [choice(0, "", logprobs, finish)], usage)]
    if usage:
        chunks.append(text_chunk_body(cid, model, [], usage, usage_body(prompt_tokens, completion_tokens)))
    return chunks


def _echo(call: Call, prepared: PreparedRequest) -> str:
    """The prompt as the choice's text begins with it: as written, or its token ids decoded."""
    return prepared.prompt.text or decode(call.token_bytes, prepared.prompt.ids)


def _logprobs(
    call: Call, parsed: TextCompletionRequest, entries: list[Entry], offsets: Offsets | None = None
) -> dict[str, Any] | None:
    if parsed.logprobs is None:
        return None
    return logprobs_body(entries, call.token_bytes, offsets or Offsets(call.token_bytes), parsed.logprobs == 1)


def _dumps(body: Any) -> str:
    return json.dumps(body, ensure_ascii=False)
