"""/v1/chat/completions requests: JSON bodies to the engine's ChatRequest (request.py holds what both routes
share; response.py writes the replies).

Mapping: `user` -> ユーザー, `assistant` -> システム; rinna's format has no system turn, so `system`/`developer`
messages are refused, as are tools. jachat's own options ride as extra body fields, as vLLM's do: `top_k`,
`repetition_penalty`, `min_tokens`, `no_repeat_ngram_size`, `priority`, `drop_oldest_turns`,
`include_stop_str_in_output`.
"""

from __future__ import annotations

from dataclasses import dataclass

from jachat.service.domain.errors import InvalidRequest
from jachat.service.domain.request import ChatRequest, check_turn_count
from jachat.service.domain.results import ModelInfo, Priority
from jachat.service.edge.http.request import Body, Common, body_of, sampling
from jachat.service.text.prompt import Speaker, Turn

ROLES = {"user": Speaker.USER, "assistant": Speaker.SYSTEM}

# Fields that change nothing here, accepted so that clients which always send them work: OpenAI's bookkeeping.
_IGNORED = frozenset({"store", "metadata", "service_tier", "parallel_tool_calls"})
# Chat's own fields jachat cannot honour: accepted only at their "off" value (null, or the value given).
_OFF_ONLY = {
    "tools": "tools are not supported by rinna's chat format",
    "tool_choice": "tools are not supported by rinna's chat format",
    "functions": "functions are not supported by rinna's chat format",
    "function_call": "functions are not supported by rinna's chat format",
    "audio": "audio output is not supported",
    "prediction": "predicted outputs are not supported",
}
_KNOWN = frozenset(
    {
        "messages",
        "max_completion_tokens",
        "top_logprobs",
        "response_format",
        "modalities",
        "drop_oldest_turns",
    }
    | _IGNORED
    | set(_OFF_ONLY)
)


@dataclass(frozen=True)
class ChatCompletionRequest:
    """A chat completion request, converted: what the HTTP front end needs besides the ChatRequest."""

    chat: ChatRequest
    model: str
    stream: bool = False
    include_usage: bool = False
    logprobs: bool = False
    include_stop: bool = False
    priority: Priority = Priority.INTERACTIVE
    user: str | None = None


def parse_chat(body: object, info: ModelInfo) -> ChatCompletionRequest:
    """Check and convert a /v1/chat/completions body; every violation names its field."""
    b = body_of(body, _KNOWN, _OFF_ONLY)
    fields = b.body
    if None not in (fields.get("max_tokens"), fields.get("max_completion_tokens")) and fields.get(
        "max_tokens"
    ) != fields.get("max_completion_tokens"):
        b.bad("max_tokens", "differs from max_completion_tokens; give one of them")
    model = b.model(info)
    turns = _turns(b, fields.get("messages"))
    options, explicit_max = sampling(b, info)
    common = Common.read(b)
    logprobs = b.get("logprobs", bool, "true or false") or False
    if (b.get("top_logprobs", int, "an integer") or 0) != 0:
        b.bad("top_logprobs", "alternatives are not returned (0 only); logprobs: true gives each chosen token's")
    if b.get("n", int, "an integer") not in (None, 1):
        b.bad("n", "only 1 reply per request (send several requests; they are batched)")
    response_format = fields.get("response_format")
    if response_format is not None and response_format != {"type": "text"}:
        b.bad("response_format", 'only {"type": "text"}')
    if fields.get("modalities") not in (None, ["text"]):
        b.bad("modalities", 'only ["text"]')
    drop = b.get("drop_oldest_turns", bool, "true or false") or False
    if b.violations:
        raise InvalidRequest(b.violations)
    assert model is not None
    chat = ChatRequest(turns, options, explicit_max, drop)
    return ChatCompletionRequest(
        chat, model, common.stream, common.include_usage, logprobs, common.include_stop, common.priority, common.user
    )


def _turns(b: Body, messages: object) -> list[Turn]:
    if not isinstance(messages, list) or not messages:
        b.bad("messages", "must be a non-empty list of {role, content} messages")
        return []
    check_turn_count(len(messages))  # before looking at any message
    turns = []
    for i, message in enumerate(messages):
        name = f"messages[{i}]"
        if not isinstance(message, dict):
            b.bad(name, "must be an object with role and content")
            continue
        role = message.get("role")
        if not isinstance(role, str):
            b.bad(f"{name}.role", "must be 'user' or 'assistant'")
        elif role in ("system", "developer"):
            b.bad(f"{name}.role", f"is {role!r}: rinna's chat format has no system turn; use user and assistant")
        elif role in ("tool", "function"):
            b.bad(f"{name}.role", f"is {role!r}: tools are not supported; use user and assistant")
        elif role not in ROLES:
            b.bad(f"{name}.role", f"is {str(role)[:32]!r}; must be 'user' or 'assistant'")
        if message.get("tool_calls") or message.get("function_call"):
            b.bad(f"{name}.tool_calls", "tools are not supported")
        text = _content(b, f"{name}.content", message.get("content"))
        if isinstance(role, str) and role in ROLES and text is not None:
            turns.append(Turn(ROLES[role], text))
    # the last turn must be the user's: one rule, request preparation's (domain/request.py)
    return turns


def _content(b: Body, name: str, content: object) -> str | None:
    """A message's text: a string, or a list of text parts (joined by newlines, as vLLM does)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                b.bad(f"{name}[{j}]", 'only text parts: {"type": "text", "text": "..."}')
                return None
            texts.append(part["text"])
        return "\n".join(texts)
    b.bad(name, "must be a string or a list of text parts")
    return None
