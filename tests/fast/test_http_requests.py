"""The HTTP edge's parsers without a server: both routes' bodies to the engine's requests, every violation named as
the body names its field (edge/http/request.py, chat_request.py, completions_request.py)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from jachat.service.domain.errors import InvalidRequest
from jachat.service.domain.request import MAX_REQUEST_CHARACTERS
from jachat.service.domain.results import ModelInfo, Priority
from jachat.service.edge.http.chat_request import parse_chat
from jachat.service.edge.http.completions_request import DEFAULTS, parse_completion
from jachat.service.edge.http.request import parse_json, spell
from jachat.service.text.prompt import Speaker

INFO = ModelInfo("rinna-demo", "int8", "int8", "cpu", 32000, 2048)
CHAT = {"model": "rinna-demo", "messages": [{"role": "user", "content": "こんにちは"}]}
TEXT = {"model": "rinna-demo", "prompt": "こんにちは"}


def refused(parse: Any, body: object) -> dict[str, str]:
    """The violations of a refused body: {field as the body names it: why}."""
    with pytest.raises(InvalidRequest) as refusal:
        parse(body, INFO)
    return {spell(v.path): v.description for v in refusal.value.violations}


def test_a_chat_body_becomes_the_engines_request_with_the_model_cards_defaults() -> None:
    body = {
        **CHAT,
        "messages": [
            {"role": "user", "content": "やあ"},
            {"role": "assistant", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
            {"role": "user", "content": "元気?"},
        ],
        "stream": True,
        "stream_options": {"include_usage": True},
        "priority": "batch",
        "max_completion_tokens": 7,
        "logprobs": True,
        "user": "someone",
    }
    parsed = parse_chat(body, INFO)
    assert [(t.speaker, t.text) for t in parsed.chat.turns] == [
        (Speaker.USER, "やあ"),
        (Speaker.SYSTEM, "a\nb"),  # text parts joined by newlines, as vLLM joins them
        (Speaker.USER, "元気?"),
    ]
    options = parsed.chat.options
    assert (options.max_new_tokens, parsed.chat.explicit_max_new_tokens) == (7, True)
    assert (options.temperature, options.top_k, options.repetition_penalty) == (0.7, 50, 1.1)  # the card's
    assert parsed.stream and parsed.include_usage and parsed.logprobs and parsed.user == "someone"
    assert parsed.priority is Priority.BATCH


@pytest.mark.parametrize(
    ("extra", "field", "why"),
    [
        ({"messages": []}, "messages", "non-empty list"),
        ({"messages": [{"role": "system", "content": "x"}]}, "messages[0].role", "no system turn"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content[0]", "text"),
        ({"tools": [{"type": "function"}]}, "tools", "not supported"),
        ({"presence_penalty": 0.5}, "presence_penalty", "repetition_penalty"),
        ({"frobnicate": 1}, "frobnicate", "unrecognized"),
        ({"max_tokens": 5, "max_completion_tokens": 6}, "max_tokens", "differs"),
        ({"stream_options": {"include_usage": True}}, "stream_options", "only allowed with stream"),
        ({"seed": -1}, "seed", "must be 0 to 18446744073709551615"),
        ({"seed": 2**64}, "seed", "must be 0 to"),
        ({"seed": 1.5}, "seed", "an integer"),
        ({"n": 2}, "n", "only 1"),
        ({"priority": "urgent"}, "priority", "interactive"),
        ({"top_logprobs": 3}, "top_logprobs", "alternatives"),
        ({"response_format": {"type": "json_object"}}, "response_format", "text"),
        ({"top_p": 0}, "top_p", ""),
        ({"top_p": 1e-50}, "top_p", ""),  # 0 as the engine's float32
        ({"temperature": True}, "temperature", "a number"),
        ({"max_tokens": 10**400}, "max_tokens", ""),  # beyond any float: out of range, not a crash
        ({"max_completion_tokens": 5000}, "max_completion_tokens", ""),  # named as sent
        ({"model": None}, "model", "required"),
    ],
)
def test_a_chat_violation_names_the_body_field(extra: dict[str, Any], field: str, why: str) -> None:
    violations = refused(parse_chat, {**CHAT, **extra})
    assert field in violations, violations
    assert why in violations[field]


def test_a_seed_is_taken_at_any_temperature() -> None:
    """The engine honours it with the decode loop and refuses a sampled one where static batches serve."""
    assert parse_chat({**CHAT, "seed": 7, "temperature": 0}, INFO).chat.options.seed == 7
    assert parse_chat({**CHAT, "seed": 2**64 - 1, "temperature": 1.3}, INFO).chat.options.seed == 2**64 - 1


def test_a_completions_body_takes_every_prompt_form_with_openais_defaults() -> None:
    one = parse_completion(TEXT, INFO)
    assert [p.prompt for p in one.prompts] == ["こんにちは"] and not one.listed
    assert one.prompts[0].options == DEFAULTS  # OpenAI's defaults for the raw model, not the card's
    ids = parse_completion({**TEXT, "prompt": [1, 2, 3]}, INFO)
    assert [list(p.prompt) for p in ids.prompts] == [[1, 2, 3]] and not ids.listed
    lists = parse_completion({**TEXT, "prompt": [[1, 2], [3]]}, INFO)
    assert [list(p.prompt) for p in lists.prompts] == [[1, 2], [3]] and lists.listed
    echo = parse_completion({**TEXT, "echo": True, "max_tokens": 0, "logprobs": 1}, INFO)
    assert echo.echo and echo.logprobs == 1 and not echo.prompts[0].generate


@pytest.mark.parametrize(
    ("extra", "field", "why"),
    [
        ({"prompt": ["a"] * 17}, "prompt", "at most 16"),
        ({"prompt": ["a", [1]]}, "prompt", "mixes"),
        ({"prompt": ["a", 5]}, "prompt[1]", "a string or"),
        ({"prompt": None}, "prompt", "required"),
        ({"max_tokens": 0}, "max_tokens", "echo"),
        ({"logprobs": 2}, "logprobs", "0 (each chosen"),
        ({"logprobs": 1, "temperature": 0.5}, "logprobs", "greedy"),
        ({"stream": True, "prompt": ["a", "b"]}, "prompt", "one prompt"),
        ({"suffix": "x"}, "suffix", "not supported"),
        ({"best_of": 3}, "best_of", "only 1"),
        ({"logit_bias": {"5": 1}}, "logit_bias", "not supported"),
        ({"messages": []}, "messages", "unrecognized"),  # chat's own field
        ({"prompt": "x" * (MAX_REQUEST_CHARACTERS + 1)}, "prompt", "characters"),
        ({"prompt": ["x" * 40_000, "y" * 40_000]}, "prompt", "in all"),  # 16 prompts cannot hold 16 budgets
    ],
)
def test_a_completions_violation_names_the_body_field(extra: dict[str, Any], field: str, why: str) -> None:
    violations = refused(parse_completion, {**TEXT, **extra})
    assert field in violations, violations
    assert why in violations[field]


@pytest.mark.parametrize("parse", [parse_chat, parse_completion])
def test_a_body_that_is_no_object_is_refused_by_both_routes(parse: Any) -> None:
    assert set(refused(parse, [1, 2])) == {"body"}


@pytest.mark.parametrize(
    ("data", "field"),
    [
        (b"{", "body"),
        (b"[" * 100_000, "body"),  # nested past any recursion limit
        (b'{"prompt": "a\\ud800b"}', "prompt"),
        (b'{"messages": [{"content": "\\udfff"}]}', "messages[0].content"),
        (b'{"\\ud800": 1}', "body"),  # a key: the object's own path
    ],
)
def test_json_that_is_no_text_is_refused_naming_its_field(data: bytes, field: str) -> None:
    with pytest.raises(InvalidRequest) as refusal:
        parse_json(data)
    assert spell(refusal.value.violations[0].path) == field


def test_json_text_passes_a_surrogate_pair_included() -> None:
    assert parse_json(json.dumps({"prompt": "😀"}).encode()) == {"prompt": "😀"}
    assert parse_json(b'{"prompt": "\\ud83d\\ude00"}') == {"prompt": "😀"}


def test_field_paths_are_spelled_as_the_body_names_them() -> None:
    assert spell(("sampling", "max_new_tokens")) == "max_tokens"
    assert spell(("sampling", "min_new_tokens")) == "min_tokens"
    assert spell(("turns", 2, "text")) == "messages[2].content"
    assert spell(("turns", 0, "speaker")) == "messages[0].role"
    assert spell(("prompt", 3)) == "prompt[3]"
