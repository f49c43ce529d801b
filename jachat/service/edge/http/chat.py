"""/v1/chat/completions: a conversation's reply, as OpenAI's chat completions API defines it (whole, or as
server-sent events). The body is chat_request.py's, the reply response.py's; the frame, slots, limits, tokens,
tenants, priorities, metrics and traces are frame.py's, the same for every route, and everything behind the edge is
gRPC's (`Calls.prepare`, `Calls.generate`: the very steps Generate takes).
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from jachat.service.domain.results import Completion, Delta
from jachat.service.edge.calls import Call
from jachat.service.edge.http.chat_request import parse_chat
from jachat.service.edge.http.frame import HttpFrame
from jachat.service.edge.http.response import (
    FINISH_REASONS,
    chat_body,
    chat_chunk_body,
    chat_id,
    chat_usage_chunk,
    json_response,
    logprobs_content,
)


async def answer(frame: HttpFrame, request: web.Request, call: Call, data: bytes) -> web.StreamResponse:
    parsed = await frame.parse(call, data, parse_chat)
    prepared = await frame.calls.prepare(call, parsed.chat)
    if parsed.stream:
        cid, model, usage = chat_id(), parsed.model, parsed.include_usage
        replies = frame.calls.generate(call, prepared, parsed.include_stop, parsed.logprobs)

        def opening() -> list[dict[str, Any]]:  # the role chunk
            return [chat_chunk_body(cid, model, {"role": "assistant", "content": ""}, with_usage=usage)]

        def render(item: Delta | Completion) -> list[dict[str, Any]]:
            logprobs = logprobs_content(item.tokens, call.token_bytes) if parsed.logprobs else None
            if isinstance(item, Delta):
                return [chat_chunk_body(cid, model, {"content": item.text}, None, logprobs, usage)]
            finish = FINISH_REASONS.get(item.finish_reason, "stop")
            chunks = [chat_chunk_body(cid, model, {}, finish, logprobs, usage)]
            return [*chunks, chat_usage_chunk(cid, model, item)] if usage else chunks

        return await frame.events.stream(request, call, replies, opening, render)
    reply = await frame.calls.reply(call, prepared, parsed.include_stop, parsed.logprobs)
    logprobs = logprobs_content(reply.tokens, call.token_bytes) if parsed.logprobs else None
    return json_response(chat_body(chat_id(), parsed.model, reply.text, reply.completion, logprobs))
