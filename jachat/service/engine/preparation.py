"""Request preparation: the one step between a front end and the engine, the same for Generate, GenerateStream
and Tokenize (and any later front end).

A request costs the server in proportion to its text, and a client controls the text, so:
- The cheap checks come first, on the event loop, before any text is touched beyond its length: turn count,
  characters per turn and in the whole request, the sampling ranges (`check_turns`, SamplingOptions.violations).
  Then the front end asks the engine whether the queue has room, so a full server refuses at once.
- The CPU work (neutralising, sentencepiece encoding, fitting the context) runs on a small worker pool, never on the
  event loop; at most `max_waiting` preparations wait for it, beyond that the call is refused as overloaded.
- Each turn is encoded once (plus a bounded number of rewrites by the injection guard), and the whole prompt once.
  `drop_oldest_turns` finds its cut in one pass from the newest turn backwards, encoding only the turns it keeps
  (and the first one it drops), then verifies it with one encode of the kept prompt.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

from jachat.service.domain.errors import FieldPath, FieldViolation, InvalidRequest, Overloaded
from jachat.service.domain.request import (
    MAX_REQUEST_TOKENS,
    ChatRequest,
    ScoreRequest,
    TextRequest,
    check_candidates,
    check_prompt_ids,
    check_turns,
    prompt_text_violation,
)
from jachat.service.domain.sampling import SamplingOptions
from jachat.service.engine.injection import RenderedTurn, TurnGuard
from jachat.service.text.prompt import CUE, SEPARATOR, Turn, join_turns, neutralise
from jachat.service.text.tokenizer import Tokenizer

T = TypeVar("T")


@dataclass(frozen=True)
class Prompt:
    text: str
    ids: list[int]
    dropped_turns: int = 0


@dataclass(frozen=True)
class PreparedRequest:
    prompt: Prompt
    options: SamplingOptions
    max_new_tokens: int


class Preparer:
    def __init__(
        self,
        tokenizer: Tokenizer,
        context_length: int,
        workers: int = 2,
        max_waiting: int = 64,
        context_name: str = "context",
    ) -> None:
        """`context_length` is the most tokens a call may hold, prompt and reply: the model's context, or less where
        something else (`context_name`, in the errors: the decode loop's KV-cache budget) holds a call to less."""
        self.tokenizer = tokenizer
        self.guard = TurnGuard(tokenizer)
        self.context_length = context_length
        self.context_name = context_name
        self.max_waiting = max_waiting
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="jachat-prepare")
        self._waiting = 0
        self._separator = len(tokenizer.encode(SEPARATOR))
        self._cue = len(tokenizer.encode(CUE))

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def run(self, work: Callable[[], T]) -> T:
        """Run CPU work on the pool; refuse at once (Overloaded) when `max_waiting` preparations already wait."""
        if self._waiting >= self.max_waiting:
            raise Overloaded(f"{self._waiting} requests are being prepared; retry shortly", retry_after=0.5)
        self._waiting += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, work)
        finally:
            self._waiting -= 1

    async def prepare(self, request: ChatRequest) -> PreparedRequest:
        check_turns(request.turns)
        return await self.run(lambda: self.prepare_now(request))

    async def tokenize(self, turns: Sequence[Turn]) -> Prompt:
        check_turns(turns)
        return await self.run(lambda: self.prompt(turns))

    def prompt(self, turns: Sequence[Turn]) -> Prompt:
        """The whole conversation as the model sees it (Tokenize)."""
        return self._join(self._render(turns), 0)

    async def prepare_score(self, request: ScoreRequest) -> tuple[Prompt, list[list[int]]]:
        check_turns(request.turns)
        check_candidates(request.candidates)
        return await self.run(lambda: self.score_now(request))

    def score_now(self, request: ScoreRequest) -> tuple[Prompt, list[list[int]]]:
        """The conversation's prompt and each candidate reply's ids (its text as a turn's: newlines as <NL>), each
        prompt + candidate within the context (on a worker thread)."""
        prompt = self.prompt(request.turns)
        candidates = [self.tokenizer.encode(neutralise(text)) for text in request.candidates]
        violations = [
            FieldViolation(
                ("candidates", i),
                f"{len(prompt.ids)} prompt tokens and {len(ids)} of this reply exceed the {self.context_length}-token "
                f"{self.context_name}",
            )
            for i, ids in enumerate(candidates)
            if len(prompt.ids) + len(ids) > self.context_length
        ]
        if violations:
            raise InvalidRequest(violations)
        return prompt, candidates

    async def prepare_text(self, request: TextRequest, where: FieldPath = ("prompt",)) -> PreparedRequest:
        """A raw prompt (a completions call): its text encoded as written, or its ids checked, fitted to the context.
        Violations name `where` (the prompt's place in the call)."""
        prompt = request.prompt
        if isinstance(prompt, str):
            violation = prompt_text_violation(prompt, where)  # an engine caller that is no edge: the same rule
            if violation is not None:
                raise InvalidRequest([violation])
            ids = await self.run(lambda: self.tokenizer.encode(prompt))
        else:
            check_prompt_ids(prompt, self.tokenizer.vocab_size, self.context_length, where)
            ids = list(prompt)
        if not ids:
            raise InvalidRequest([FieldViolation(where, "encodes to no tokens")])
        if not request.generate:  # scored only: the prompt must fit the context
            if len(ids) > self.context_length:
                raise InvalidRequest(
                    [FieldViolation(where, f"{len(ids)} tokens; the {self.context_name} holds {self.context_length}")]
                )
            max_new = 0
        else:
            max_new = self._max_new_tokens(len(ids), request.options, request.explicit_max_new_tokens, where, "")
        return PreparedRequest(Prompt(prompt if isinstance(prompt, str) else "", ids), request.options, max_new)

    def prepare_now(self, request: ChatRequest) -> PreparedRequest:
        """Render, encode and fit one generation request (on a worker thread)."""
        turns, options = request.turns, request.options
        if request.drop_oldest_turns:
            first, rendered = self._cut(turns, options.max_new_tokens)
        else:
            first, rendered = 0, self._render(turns)
        prompt = self._join(rendered, first)
        while request.drop_oldest_turns and len(prompt.ids) + options.max_new_tokens > self.context_length:
            if len(rendered) == 1:
                break
            rendered, first = rendered[1:], first + 1  # the estimate was short (pieces merged across turns)
            prompt = self._join(rendered, first)
        hint = "" if request.drop_oldest_turns else " (set drop_oldest_turns to leave out the oldest turns)"
        max_new = self._max_new_tokens(len(prompt.ids), options, request.explicit_max_new_tokens, ("turns",), hint)
        return PreparedRequest(prompt, options, max_new)

    def _render(self, turns: Sequence[Turn]) -> list[RenderedTurn]:
        """Every turn rendered and encoded once, within the request's token budget and each under the context."""
        rendered, total = [], 0
        for i, original in enumerate(turns):
            turn = self.guard.render(original, i)
            total += len(turn.ids)
            if total > MAX_REQUEST_TOKENS:
                raise InvalidRequest(
                    [FieldViolation(("turns",), f"more than {MAX_REQUEST_TOKENS} tokens in all; too long to serve")]
                )
            rendered.append(turn)
        self._check_turn_lengths(rendered, 0)
        return rendered

    def _check_turn_lengths(self, rendered: Sequence[RenderedTurn], first: int) -> None:
        most = f"one turn may have at most {self.context_length - 1} (the {self.context_name})"
        violations = [
            FieldViolation(("turns", i, "text"), f"{n} tokens; {most}")
            for i, n in enumerate((len(t.ids) for t in rendered), start=first)
            if n >= self.context_length
        ]
        if violations:
            raise InvalidRequest(violations)

    def _cut(self, turns: Sequence[Turn], max_new_tokens: int) -> tuple[int, list[RenderedTurn]]:
        """drop_oldest_turns: the newest turns whose estimated prompt leaves room for max_new_tokens (the last turn
        always stays). One pass from the newest backwards; turns older than the first dropped one are never
        encoded."""
        budget = self.context_length - max_new_tokens - self._cue
        kept: list[RenderedTurn] = []
        used, first = 0, 0
        for i in range(len(turns) - 1, -1, -1):
            turn = self.guard.render(turns[i], i)
            used += len(turn.ids) + (self._separator if kept else 0)
            if kept and used > budget:
                first = i + 1
                break
            kept.append(turn)
        kept.reverse()
        self._check_turn_lengths(kept, first)
        return first, kept

    def _join(self, rendered: Sequence[RenderedTurn], dropped: int) -> Prompt:
        text = join_turns([t.text for t in rendered])
        ids = self.tokenizer.encode(text)
        self.guard.check_prompt(ids, len(rendered))
        return Prompt(text, ids, dropped)

    def _max_new_tokens(
        self, prompt_tokens: int, options: SamplingOptions, explicit: bool, where: FieldPath, hint: str
    ) -> int:
        """max_new_tokens for this prompt; an explicit value that overflows the context is an error, and so is a
        min_new_tokens the context cannot hold. A prompt that leaves no room is an error of `where`."""
        context = self.context_length
        room = context - prompt_tokens
        if room < 1:
            raise InvalidRequest(
                [
                    FieldViolation(
                        where, f"the prompt has {prompt_tokens} tokens; the {self.context_name} holds {context}{hint}"
                    )
                ]
            )
        if options.max_new_tokens > room and explicit:
            raise InvalidRequest(
                [
                    FieldViolation(
                        ("sampling", "max_new_tokens"),
                        f"prompt ({prompt_tokens} tokens) + max_new_tokens ({options.max_new_tokens}) exceeds the "
                        f"{self.context_name} of {context} tokens; at most {room} fit",
                    )
                ]
            )
        if options.min_new_tokens > room:
            raise InvalidRequest(
                [
                    FieldViolation(
                        ("sampling", "min_new_tokens"),
                        f"{options.min_new_tokens} tokens do not fit after the prompt ({prompt_tokens} tokens); at "
                        f"most {room} fit in the {self.context_name} of {context}",
                    )
                ]
            )
        return min(options.max_new_tokens, room)
