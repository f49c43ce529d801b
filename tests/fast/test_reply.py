from __future__ import annotations

import random

from jachat.service.text.reply import ReplyAssembler
from jachat.service.text.tokenizer import Tokenizer


def assemble(chunks: list[str], stop: tuple[str, ...] = ()) -> tuple[list[str], bool]:
    reply = ReplyAssembler(stop)
    out = [reply.push(c) for c in chunks]
    out.append(reply.finish())
    return out, reply.stopped


def reference(text: str, stop: tuple[str, ...]) -> tuple[str, bool]:
    text = text.replace("<NL>", "\n")
    hits = [i for i in (text.find(s) for s in stop) if i >= 0]
    return (text[: min(hits)], True) if hits else (text, False)


def test_nl_split_over_chunks_becomes_newline() -> None:
    out, _ = assemble(["一行目<", "N", "L>二", "行目<NL", ">"])
    assert "".join(out) == "一行目\n二行目\n"
    assert all("<" not in o for o in out)


def test_partial_nl_at_the_end_is_kept_literally() -> None:
    out, _ = assemble(["a<N"])
    assert "".join(out) == "a<N"


def test_stop_string_split_over_chunks_is_never_sent() -> None:
    out, stopped = assemble(["こんに", "ちは。ユー", "ザー: 次"], stop=("\nユーザー:", "ユーザー:"))
    assert stopped
    assert "".join(out) == "こんにちは。"


def test_stop_string_across_nl() -> None:
    out, stopped = assemble(["答え<", "NL>ユーザー", ": また"], stop=("\nユーザー:",))
    assert stopped and "".join(out) == "答え"


def test_text_that_only_looks_like_a_stop_prefix_is_released() -> None:
    out, stopped = assemble(["abc ST", "ILL going"], stop=("STOP",))
    assert not stopped and "".join(out) == "abc STILL going"


def test_random_chunkings_agree_with_the_whole_text() -> None:
    rng = random.Random(7)
    alphabet = ["a", "<", "N", "L", ">", "\n", "終", "わ", "り", "<NL>"]
    for _ in range(500):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        stop = tuple({"".join(rng.choice(alphabet[:9]) for _ in range(rng.randint(1, 3))) for _ in range(2)})
        cuts = sorted(rng.sample(range(len(text) + 1), k=min(len(text) + 1, rng.randint(0, 6))))
        chunks = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        out, stopped = assemble(chunks, stop)
        assert ("".join(out), stopped) == reference(text, stop), (text, stop, chunks)


def test_nl_spelled_with_several_pieces_streams_as_newline(split_nl_tokenizer: Tokenizer) -> None:
    tokenizer = split_nl_tokenizer
    ids = tokenizer.encode("はい<NL>いいえ<NL>")
    assert len(ids) > len(tokenizer.encode("はいいいえ")) + 2  # <NL> is several pieces here
    decoder, reply = tokenizer.decoder(), ReplyAssembler()
    deltas = [reply.push(decoder.feed(i)) for i in ids] + [reply.finish()]
    assert "".join(deltas) == "はい\nいいえ\n"


def test_model_starting_the_users_turn_ends_the_reply_unsent() -> None:
    from jachat.service.text.prompt import TURN_MARKERS

    reply = ReplyAssembler((), TURN_MARKERS)
    out = [reply.push(c) for c in ["はい、", "どうぞ。<", "NL>ユー", "ザー: 次の質問", "です"]] + [reply.finish()]
    assert "".join(out) == "はい、どうぞ。"
    assert reply.stopped and reply.ended_turn


def test_a_callers_stop_string_at_the_same_place_wins_over_the_turn_marker() -> None:
    from jachat.service.text.prompt import TURN_MARKERS

    reply = ReplyAssembler(("\n",), TURN_MARKERS)
    assert reply.push("a<NL>ユーザー: b") + reply.finish() == "a"
    assert reply.stopped and not reply.ended_turn


def test_a_callers_stop_string_equal_to_the_turn_marker_is_a_stop() -> None:
    from jachat.service.text.prompt import TURN_MARKERS

    reply = ReplyAssembler(TURN_MARKERS, TURN_MARKERS)
    assert reply.push("a<NL>ユーザー: b") + reply.finish() == "a"
    assert reply.stopped and not reply.ended_turn  # the caller asked for it: FINISH_REASON_STOP


def test_a_stop_string_completed_at_the_final_flush_is_a_stop(tokenizer: Tokenizer) -> None:
    """The model ends with half a character: the flush turns it into U+FFFD, which completes the stop string."""
    import asyncio

    from jachat.service.domain.results import FinishReason
    from jachat.service.domain.sampling import SamplingOptions
    from jachat.service.engine.sequence import Generation
    from jachat.service.text.prompt import TURN_MARKERS

    lead = tokenizer.pieces.index("<0xE3>")  # the first byte of a three-byte character

    async def run() -> tuple[FinishReason | None, str]:
        options = SamplingOptions(stop=("猫\ufffd",))
        reply = ReplyAssembler(options.stop, TURN_MARKERS)
        loop = asyncio.get_running_loop()
        gen = Generation([5], options, 8, None, tokenizer.eos_id, tokenizer.decoder(), reply, loop)
        for token in [*tokenizer.encode("猫"), lead, tokenizer.eos_id]:
            if gen.on_token(token, -1.0, 0.0):
                break
        assert None in await gen.take()  # it ended
        delta = gen.unsent.take()
        return gen.finish_reason, delta.text if delta is not None else ""

    reason, text = asyncio.run(run())
    assert (reason, text) == (FinishReason.STOP, "")
