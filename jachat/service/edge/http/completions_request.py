"""OpenAI's (legacy) completions requests at the edge: /v1/completions bodies to the engine's dataclasses
(response.py writes the replies). What both routes share is request.py's: its rules and names are the chat API's
wherever the two APIs share a field.

The prompt is the model's raw input, used as written: no chat format and so no turn defence (the caller writes every
turn, and a literal `<NL>` is the model's newline). Deployments that rely on turn integrity turn the route off
(--completions false). The defaults are OpenAI's, not the model card's: max_tokens 16, temperature 1, top_p 1, no
top_k, no repetition penalty (jachat's own fields, named as vLLM names them, change them).

`logprobs` is 0 (each chosen token's log-probability) or 1 (and the most likely token at its place): the most
likely token is known for the prompt (echo) and for greedy decoding, where it is the chosen one; with sampling it is
not, and 1 is refused. More alternatives are not offered.
"""

from __future__ import annotations

from dataclasses import dataclass

from jachat.service.domain.errors import InvalidRequest
from jachat.service.domain.request import MAX_PROMPTS, TextRequest, check_prompts
from jachat.service.domain.results import ModelInfo, Priority
from jachat.service.domain.sampling import SamplingOptions
from jachat.service.edge.http.request import Body, Common, body_of, sampling

# OpenAI's defaults for completions (the raw model), where the chat API has the model card's
DEFAULTS = SamplingOptions(max_new_tokens=16, temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0)
MAX_LOGPROBS = 1

_OFF_ONLY = {"suffix": "is not supported (insertion needs a model trained for it)"}
_KNOWN = frozenset({"prompt", "echo", "best_of"} | set(_OFF_ONLY))


@dataclass(frozen=True)
class TextCompletionRequest:
    """A completions request, converted: one TextRequest per prompt, and how to answer."""

    prompts: tuple[TextRequest, ...]
    listed: bool  # the prompt was a list (of texts or of token-id lists): violations name prompt[i]
    model: str
    common: Common
    echo: bool = False
    logprobs: int | None = None  # None: none; 0: each chosen token's; 1: and the most likely token at its place

    @property
    def priority(self) -> Priority:
        return self.common.priority

    @property
    def user(self) -> str | None:
        return self.common.user


def parse_completion(body: object, info: ModelInfo) -> TextCompletionRequest:
    """Check and convert a /v1/completions body; every violation names its field."""
    b = body_of(body, _KNOWN, _OFF_ONLY)
    fields = b.body
    model = b.model(info)
    prompts, listed = _prompts(b, fields.get("prompt"))
    echo = b.get("echo", bool, "true or false") or False
    generate = True
    if fields.get("max_tokens") == 0 and not isinstance(fields.get("max_tokens"), bool):
        generate, b.body = False, {k: v for k, v in fields.items() if k != "max_tokens"}  # read the rest without it
        if not echo:
            b.bad("max_tokens", "0 only with echo: true (the prompt's log-probabilities, nothing generated)")
    options, explicit_max = sampling(b, info, DEFAULTS)
    common = Common.read(b)
    logprobs = b.get("logprobs", int, "an integer")
    if logprobs is not None and not 0 <= logprobs <= MAX_LOGPROBS:
        b.bad(
            "logprobs",
            f"is {logprobs}; 0 (each chosen token's log-probability) or 1 (and the most likely token's): more "
            "alternatives are not offered",
        )
    elif logprobs == 1 and generate and not options.greedy:
        b.bad(
            "logprobs",
            "1 (the most likely token at each place) is known for the prompt (echo) and for greedy decoding "
            "(temperature 0); with sampling use 0 (each chosen token's log-probability)",
        )
    for name in ("n", "best_of"):
        if b.get(name, int, "an integer") not in (None, 1):
            b.bad(name, "only 1 completion per prompt (send several prompts or requests; they are batched)")
    if common.stream and len(prompts) > 1:
        b.bad("prompt", "stream: true takes one prompt (send a request per prompt; they are batched)")
    if b.violations:
        raise InvalidRequest(b.violations)
    check_prompts(prompts, listed)  # the texts' characters, in all too, before any is encoded
    assert model is not None
    requests = tuple(TextRequest(p, options, explicit_max, generate) for p in prompts)
    return TextCompletionRequest(requests, listed, model, common, echo, logprobs)


def _prompts(b: Body, prompt: object) -> tuple[list[str | list[int]], bool]:
    """A text, a list of texts, a list of token ids, or a list of token-id lists (1 to MAX_PROMPTS prompts)."""
    what = "a string, a list of strings, a list of token ids or a list of token-id lists"
    if isinstance(prompt, str):
        return [prompt], False
    if not isinstance(prompt, list) or not prompt:
        b.bad("prompt", f"is required: {what}")
        return [], False
    if all(_is_id(t) for t in prompt):
        return [list(prompt)], False
    if len(prompt) > MAX_PROMPTS:
        b.bad("prompt", f"{len(prompt)} prompts; at most {MAX_PROMPTS} in one request")
        return [], True
    prompts: list[str | list[int]] = []
    for i, item in enumerate(prompt):
        if isinstance(item, str) or (isinstance(item, list) and item and all(_is_id(t) for t in item)):
            prompts.append(item)
        else:
            b.bad(("prompt", i), "must be a string or a non-empty list of token ids (all prompts of one kind)")
    if len({isinstance(p, str) for p in prompts}) > 1:
        b.bad("prompt", "mixes texts and token-id lists; give one kind")
    return prompts, True


def _is_id(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
