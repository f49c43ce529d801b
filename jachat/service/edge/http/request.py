"""What both OpenAI-compatible routes read alike: the request specification they share (the known fields, the ones
jachat accepts only at their "off" value, the delivery and caller fields, the sampling fields from the one table),
typed reads of a JSON body that record every violation under its field's name, and the JSON itself. Each route's own
module adds its extras: chat_request.py (messages, chat's bookkeeping fields) and completions_request.py (prompt,
echo). The rules are gRPC's (same limits, same defaults), spelled with OpenAI's names: a violation names the body
field (`messages[2].role`, `max_tokens`), so a client learns what to fix whichever API it uses; nothing past the
HTTP edge sees OpenAI's shapes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass
from typing import Any

from jachat.service.domain.errors import FieldPath, FieldViolation, InvalidRequest, NotFound, dotted
from jachat.service.domain.results import ModelInfo, Priority
from jachat.service.domain.sampling import BY_NAME, FIELDS, SamplingOptions

PRIORITIES = {p.value: p for p in Priority}  # the body names a priority as the metrics label it

# Both routes' fields: the model, how the reply is delivered, who asks, the sampling table's fields, and jachat's own
# (as extra body fields, as vLLM's are). A route adds its own.
KNOWN = frozenset(
    {
        "model",
        "stream",
        "stream_options",
        "stop",
        "logprobs",
        "n",
        "seed",
        "user",
        "priority",
        "include_stop_str_in_output",
    }
    | {f.openai for f in FIELDS}
)
# Fields jachat cannot honour, on both routes: accepted only at their "off" value (null, 0, or empty).
OFF_ONLY = {
    "logit_bias": "logit_bias is not supported",
    "presence_penalty": "is not supported (0 only); use repetition_penalty (the model card's is 1.1)",
    "frequency_penalty": "is not supported (0 only); use repetition_penalty (the model card's is 1.1)",
}
_OFF_VALUES: dict[str, tuple[Any, ...]] = {"presence_penalty": (0, 0.0), "frequency_penalty": (0, 0.0)}


def body_of(body: object, known: frozenset[str], off_only: dict[str, str]) -> Body:
    """A route's JSON body, as an object, with the fields it does not know and those it cannot honour refused."""
    if not isinstance(body, dict):
        raise InvalidRequest([FieldViolation(("body",), "must be a JSON object")])
    b = Body(body)
    b.refuse(KNOWN | known, {**OFF_ONLY, **off_only})
    return b


class Body:
    """Typed reads of a JSON object, each problem recorded as a violation naming its field."""

    def __init__(self, body: dict[str, Any]) -> None:
        self.body = body
        self.violations: list[FieldViolation] = []

    def bad(self, name: str | FieldPath, why: str) -> None:
        self.violations.append(FieldViolation((name,) if isinstance(name, str) else name, why))

    def refuse(self, known: frozenset[str], off_only: dict[str, str]) -> None:
        """Fields the API does not know, and fields jachat cannot honour given at other than their "off" value."""
        for name in sorted(set(self.body) - known)[:8]:
            self.bad(name, "unrecognized request argument")
        for name, why in off_only.items():
            value = self.body.get(name)
            if not (value is None or value == [] or value == {} or value in _OFF_VALUES.get(name, ())):
                self.bad(name, why)

    def model(self, info: ModelInfo) -> str | None:
        model = self.get("model", str, "a string")
        if model is None and self.body.get("model") is None:
            self.bad("model", f"is required: {info.model_name!r} (GET /v1/models)")
        return model  # type: ignore[no-any-return]

    def get(self, name: str, kind: type | tuple[type, ...], what: str) -> Any:
        value = self.body.get(name)
        if value is None:
            return None
        kinds = kind if isinstance(kind, tuple) else (kind,)
        # JSON has one number type: a float field takes 2 as well as 2.0; true is never a number
        ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
        if float in kinds and isinstance(value, int) and not isinstance(value, bool):
            try:
                value, ok = float(value), True
            except OverflowError:  # an integer beyond any float: out of every range, not a server error
                value, ok = math.inf, True
        if float in kinds and ok and not math.isfinite(value):
            ok = False
        if not ok:
            self.bad(name, f"must be {what}")
            return None
        return value


@dataclass(frozen=True)
class Common:
    """The fields both completion APIs read alike: how the reply is delivered, and who asks."""

    stream: bool = False
    include_usage: bool = False
    include_stop: bool = False
    priority: Priority = Priority.INTERACTIVE
    user: str | None = None

    @classmethod
    def read(cls, b: Body) -> Common:
        stream = b.get("stream", bool, "true or false") or False
        include_usage = False
        stream_options = b.body.get("stream_options")
        if stream_options is not None:
            if not isinstance(stream_options, dict) or not isinstance(stream_options.get("include_usage", False), bool):
                b.bad("stream_options", 'must be an object like {"include_usage": true}')
            elif not stream:
                b.bad("stream_options", "is only allowed with stream: true")
            else:
                include_usage = stream_options.get("include_usage", False)
        priority_name = b.get("priority", str, '"interactive" or "batch"')
        priority = PRIORITIES.get(priority_name or "interactive")
        if priority is None:
            b.bad("priority", f'is {priority_name[:32]!r}; must be "interactive" or "batch"')
        include_stop = b.get("include_stop_str_in_output", bool, "true or false") or False
        user = b.get("user", str, "a string")
        return cls(stream, include_usage, include_stop, priority or Priority.INTERACTIVE, user)


def sampling(b: Body, info: ModelInfo, base: SamplingOptions | None = None) -> tuple[SamplingOptions, bool]:
    """The sampling fields of the body, by the one table (domain/sampling.py), over `base`'s defaults (the model
    card's unless given); a violation names the body's field (max_completion_tokens when the client sent that instead
    of max_tokens)."""
    given: dict[str, Any] = {}
    names = {f.name: f.openai for f in FIELDS}
    if b.body.get("max_completion_tokens") is not None:
        names["max_new_tokens"] = "max_completion_tokens"
    for f in FIELDS:
        what = "an integer" if f.type is int else "a number"
        value = b.get(names[f.name], f.type, what)
        if value is not None:
            given[f.name] = value
    stop = b.body.get("stop")
    if isinstance(stop, str):
        stops: tuple[str, ...] = (stop,)
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stops = tuple(stop)
    else:
        stops = ()
        if stop is not None:
            b.bad("stop", "must be a string or a list of strings")
    seed = b.get("seed", int, "an integer")  # the engine refuses a sampled one where static batches serve
    options = dataclasses.replace(base or SamplingOptions(), **given, stop=stops, seed=seed)
    for v in options.violations(info.context_length, info.vocab_size):
        _, name, *rest = v.path  # ("sampling", field, ...): the body's own field
        b.bad((names.get(str(name), str(name)), *rest), v.description)
    return options, "max_new_tokens" in given


def spell(path: FieldPath) -> str:
    """A field path of the engine's vocabulary (request preparation, sampling) as this API's body names it."""
    head, *rest = path
    if head == "sampling" and rest:
        name = str(rest[0])
        return dotted((BY_NAME[name].openai if name in BY_NAME else name, *rest[1:]))
    if head == "turns":
        return dotted(("messages", *({"text": "content", "speaker": "role"}.get(str(p), p) for p in rest)))
    return dotted(path)


def unknown_model(asked: str, served: str) -> NotFound:
    return NotFound(f"the model {asked[:256]!r} does not exist; this server serves {served!r} (GET /v1/models)")


def parse_json(data: bytes) -> object:
    """The body's JSON. A string holding a lone surrogate (JSON's \\ud800 escape, alone) is no text at all: every
    later step (the tokenizer, the log line, the reply) would fail on it, so it is refused here, naming its field."""
    try:
        body = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise InvalidRequest([FieldViolation(("body",), f"not valid JSON ({str(exc)[:120]})")]) from None
    if _SURROGATE_ESCAPE.search(data):  # UTF-8 cannot carry surrogates: only this escape can
        try:
            where = _lone_surrogate(body, ())
        except RecursionError:  # nested as deep as json allows: name the body
            where = ()
        if where is not None:
            why = "holds a lone surrogate (an escape like \\ud800 without its pair): it is not text"
            raise InvalidRequest([FieldViolation(where or ("body",), why)])
    return body


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _text(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _lone_surrogate(value: object, path: FieldPath) -> FieldPath | None:
    """The path of the first string in `value` that is not valid Unicode (an object's own path for a key), or
    None."""
    if isinstance(value, str):
        return None if _text(value) else path
    items = enumerate(value) if isinstance(value, list) else value.items() if isinstance(value, dict) else ()
    for key, item in items:
        if isinstance(key, str) and not _text(key):
            return path
        found = _lone_surrogate(item, (*path, key))
        if found is not None:
            return found
    return None
