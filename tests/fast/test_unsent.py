"""The one place where a reply's text and tokens are merged (unsent.Unsent), and a generation's use of it: what a
caller takes, when it is woken, and the tail that rides on the Completion."""

from __future__ import annotations

import asyncio

from jachat.service.domain.results import Delta, FinishReason, GeneratedToken
from jachat.service.domain.sampling import SamplingOptions
from jachat.service.engine.sequence import MORE, Generation
from jachat.service.engine.unsent import Unsent
from jachat.service.text.prompt import TURN_MARKERS
from jachat.service.text.reply import ReplyAssembler
from jachat.service.text.tokenizer import Tokenizer


def tokens(*ids: int) -> tuple[GeneratedToken, ...]:
    return tuple(GeneratedToken(i, -0.1 * i) for i in ids)


def test_tokens_wait_for_the_text_they_make_and_a_late_caller_takes_everything_in_one_delta() -> None:
    unsent = Unsent(streaming=True)
    unsent.token(tokens(1)[0])  # half a character: no text yet
    assert unsent.take() is None
    unsent.token(tokens(2)[0])
    assert unsent.text("猫") is True  # the first text since the caller took: wake it
    unsent.token(tokens(3)[0])
    assert unsent.text("が") is False  # it has not taken yet: one wake-up is enough
    unsent.token(tokens(4)[0])  # generated since, its text not final
    assert unsent.take() == Delta("猫が", tokens(1, 2, 3))
    assert unsent.take() is None
    assert unsent.text("") is False  # no text: nothing to take, no wake-up
    assert unsent.tail() == tokens(4)  # the end: what no text was made of
    assert unsent.tail() == ()


def test_a_caller_that_wants_the_whole_reply_is_never_woken_for_text() -> None:
    unsent = Unsent(streaming=False)
    for i, text in enumerate(["a", "b", "c"]):
        unsent.token(tokens(i)[0])
        assert unsent.text(text) is False
    assert unsent.take() == Delta("abc", tokens(0, 1, 2))


def test_a_generation_posts_one_wake_up_per_take_and_its_stop_tokens_are_the_tail(tokenizer: Tokenizer) -> None:
    """A stop string's tokens make no text (it is dropped), so they come as the tail, not as a text-less delta."""

    async def run() -> tuple[list[object], Delta | None, list[object], Delta | None, Generation]:
        options = SamplingOptions(stop=("犬",))
        reply = ReplyAssembler(options.stop, TURN_MARKERS)
        loop = asyncio.get_running_loop()
        gen = Generation([5], options, 16, None, tokenizer.eos_id, tokenizer.decoder(), reply, loop)
        for token in tokenizer.encode("猫が"):
            gen.on_token(token, -1.0, 0.0)
        first = await gen.take()
        delta = gen.unsent.take()
        for token in tokenizer.encode("走る犬"):
            if gen.on_token(token, -1.0, 0.0):
                break
        last = await gen.take()
        return first, delta, last, gen.unsent.take(), gen

    first, delta, last, rest, gen = asyncio.run(run())
    tail = gen.unsent.tail()
    assert first == [MORE]  # however many tokens made text before the loop looked
    assert delta is not None and delta.text == "猫が" and len(delta.tokens) == len(tokenizer.encode("猫が"))
    assert last[-1] is None and rest is not None and rest.text == "走る"
    assert [t.id for t in (*rest.tokens, *tail)] == tokenizer.encode("走る犬")  # every token, once, in order
    assert tail and gen.finish_reason is FinishReason.STOP  # the stop string's own tokens: no text made of them
