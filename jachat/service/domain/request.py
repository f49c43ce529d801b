"""A chat request as every edge hands it to the engine, and the rules on its turns that cost nothing to check.

Each rule is here once. The edges check the turn count before converting a single turn (so a request of a million
turns costs one comparison); request preparation checks the rest before any text is touched beyond its length.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from jachat.service.domain.errors import FieldPath, FieldViolation, InvalidRequest
from jachat.service.domain.sampling import SamplingOptions
from jachat.service.text.prompt import Speaker, Turn

MAX_TURNS = 256
MAX_TURN_CHARACTERS = 16_384
# The whole request: 32 contexts' worth of Japanese text, far more than a conversation that drop_oldest_turns can
# still use, and little enough to encode in a few milliseconds.
MAX_REQUEST_CHARACTERS = 65_536
MAX_REQUEST_TOKENS = 65_536  # tokens of all encoded turns (byte fallback can spend several per character)


@dataclass(frozen=True)
class ChatRequest:
    """A generation request as every front end hands it to the engine."""

    turns: Sequence[Turn]
    options: SamplingOptions
    explicit_max_new_tokens: bool = False  # an explicit value that does not fit is an error, a default shrinks
    drop_oldest_turns: bool = False


MAX_CANDIDATES = 16  # replies scored in one call (one score_batch)
MAX_PROMPTS = 16  # prompts of one completions call (each its own sequence)


@dataclass(frozen=True)
class TextRequest:
    """A raw prompt, used as written (no chat format, no turn defence: the caller writes the whole text), or given
    as token ids; `generate` False scores the prompt only (echo with max_tokens 0)."""

    prompt: str | Sequence[int]
    options: SamplingOptions
    explicit_max_new_tokens: bool = False
    generate: bool = True


@dataclass(frozen=True)
class ScoreRequest:
    """Candidate replies to a conversation, to be scored (each token's log-probability), as one batch."""

    turns: Sequence[Turn]
    candidates: Sequence[str]


def check_candidates(candidates: Sequence[str]) -> None:
    """1 to MAX_CANDIDATES candidates, each 1 to MAX_TURN_CHARACTERS characters."""
    if not candidates:
        raise InvalidRequest([FieldViolation(("candidates",), "must not be empty: give at least one reply to score")])
    if len(candidates) > MAX_CANDIDATES:
        raise InvalidRequest([FieldViolation(("candidates",), f"{len(candidates)}; at most {MAX_CANDIDATES}")])
    violations = [
        FieldViolation(("candidates", i), f"{len(c)} characters; 1 to {MAX_TURN_CHARACTERS}")
        for i, c in enumerate(candidates)
        if not 0 < len(c) <= MAX_TURN_CHARACTERS
    ]
    if violations:
        raise InvalidRequest(violations)


def check_prompts(prompts: Sequence[str | Sequence[int]], listed: bool) -> None:
    """A completions call's raw prompts (1 to MAX_PROMPTS of them: the parser counts them before it reads one),
    before any is encoded: each text 1 to MAX_REQUEST_CHARACTERS characters, and MAX_REQUEST_CHARACTERS in all (a
    chat request's budget: 16 prompts of the most each would be 16 times the encoding work of any other call)."""
    texts = [(("prompt", i) if listed else ("prompt",), p) for i, p in enumerate(prompts) if isinstance(p, str)]
    violations = [v for where, p in texts if (v := prompt_text_violation(p, where)) is not None]
    total = sum(len(p) for _, p in texts)
    if not violations and total > MAX_REQUEST_CHARACTERS:
        violations.append(FieldViolation(("prompt",), f"{total} characters in all; at most {MAX_REQUEST_CHARACTERS}"))
    if violations:
        raise InvalidRequest(violations)


def prompt_text_violation(text: str, where: FieldPath) -> FieldViolation | None:
    """A raw prompt's text: 1 to MAX_REQUEST_CHARACTERS characters."""
    if 0 < len(text) <= MAX_REQUEST_CHARACTERS:
        return None
    return FieldViolation(where, f"{len(text)} characters; 1 to {MAX_REQUEST_CHARACTERS}")


def check_prompt_ids(ids: Sequence[int], vocab_size: int, context_length: int, where: FieldPath) -> None:
    """A prompt given as token ids: 1 to a context of them, each in the vocabulary."""
    if not 0 < len(ids) <= context_length:
        raise InvalidRequest([FieldViolation(where, f"{len(ids)} token ids; 1 to {context_length}")])
    bad = [i for i, t in enumerate(ids) if not 0 <= t < vocab_size]
    if bad:
        raise InvalidRequest(
            [FieldViolation((*where, i), f"token id {ids[i]}; must be 0 to {vocab_size - 1}") for i in bad[:4]]
        )


def check_turn_count(count: int) -> None:
    """At least one turn, at most MAX_TURNS: checked by each edge before it converts any turn."""
    if count == 0:
        raise InvalidRequest([FieldViolation(("turns",), "must not be empty: give at least the user's turn")])
    if count > MAX_TURNS:
        raise InvalidRequest([FieldViolation(("turns",), f"{count} turns; at most {MAX_TURNS}")])


def check_turns(turns: Sequence[Turn]) -> None:
    """The cheap checks on converted turns: characters per turn and in all, the last turn the user's."""
    check_turn_count(len(turns))  # O(1): an engine caller that is no edge gets the same rule
    violations = [
        FieldViolation(("turns", i, "text"), f"{len(t.text)} characters; at most {MAX_TURN_CHARACTERS}")
        for i, t in enumerate(turns)
        if len(t.text) > MAX_TURN_CHARACTERS
    ]
    total = sum(len(t.text) for t in turns)
    if total > MAX_REQUEST_CHARACTERS:
        violations.append(
            FieldViolation(
                ("turns",), f"{total} characters in all; one request may have at most {MAX_REQUEST_CHARACTERS}"
            )
        )
    if turns[-1].speaker is not Speaker.USER:
        violations.append(
            FieldViolation(
                ("turns", len(turns) - 1, "speaker"), "the last turn must be the user's: the model writes the reply"
            )
        )
    if violations:
        raise InvalidRequest(violations)
