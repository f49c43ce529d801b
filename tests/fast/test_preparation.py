"""Request preparation without a model: linear in the request, and bounded in what waits for it."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest

from jachat.service.domain.errors import Overloaded
from jachat.service.domain.request import ChatRequest
from jachat.service.domain.sampling import SamplingOptions
from jachat.service.engine.preparation import Preparer
from jachat.service.text.prompt import Speaker, Turn, render_prompt
from jachat.service.text.tokenizer import Tokenizer
from tests.helpers import until


class CountingTokenizer(Tokenizer):
    """The real tokenizer, recording which thread encoded how much."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.calls: list[tuple[str, int]] = []

    def encode(self, text: str) -> list[int]:
        self.calls.append((threading.current_thread().name, len(text)))
        return super().encode(text)


def conversation(turns: int, text: str) -> list[Turn]:
    return [Turn(Speaker.USER if i % 2 == 0 else Speaker.SYSTEM, f"{i}: {text}") for i in range(turns - 1)] + [
        Turn(Speaker.USER, "最後の質問")
    ]


def test_drop_oldest_turns_finds_its_cut_in_one_pass(tokenizer_path: Path) -> None:
    tokenizer = CountingTokenizer(tokenizer_path)
    preparer = Preparer(tokenizer, 2048)
    turns = conversation(255, "吾輩は猫である。名前はまだ無い。" * 16)
    tokenizer.calls.clear()
    prepared = preparer.prepare_now(ChatRequest(turns, SamplingOptions(max_new_tokens=100), True, True))
    kept = len(turns) - prepared.prompt.dropped_turns
    # each kept turn once, the first dropped one once, the kept prompt once: not once per dropped turn
    assert len(tokenizer.calls) <= kept + 2
    assert sum(n for _, n in tokenizer.calls) < 3 * len(render_prompt(turns[-kept:]))
    # and the cut is the one the quadratic search found: the newest turns that fit, one more would not
    ids = tokenizer.encode(render_prompt(turns[-kept:]))
    assert prepared.prompt.ids == ids and len(ids) + 100 <= 2048
    assert len(tokenizer.encode(render_prompt(turns[-kept - 1 :]))) + 100 > 2048


def test_too_many_waiting_preparations_are_refused_as_overloaded(tokenizer: Tokenizer) -> None:
    preparer = Preparer(tokenizer, 2048, workers=1, max_waiting=2)
    release = threading.Event()

    async def scenario() -> None:
        blocked = [asyncio.ensure_future(preparer.run(release.wait)) for _ in range(2)]
        await until(lambda: preparer._waiting == 2, "both preparations waiting")
        with pytest.raises(Overloaded):
            await preparer.run(lambda: None)
        release.set()
        await asyncio.gather(*blocked)
        assert await preparer.run(lambda: 7) == 7  # room again

    asyncio.run(scenario())
    preparer.close()
