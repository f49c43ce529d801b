from __future__ import annotations

import random

import sentencepiece as spm

from jachat.service.text.tokenizer import Tokenizer

CARD_EXAMPLE = "გამარჯობა 吾輩は 猫である "


def test_card_example_round_trips_exactly(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode(CARD_EXAMPLE)
    assert tokenizer.decode(ids) == CARD_EXAMPLE
    assert 1 not in ids  # no [UNK]


def test_georgian_uses_byte_fallback_not_unk(tokenizer: Tokenizer) -> None:
    pieces = [tokenizer.pieces[i] for i in tokenizer.encode("გამარჯობა")]
    assert all(p.startswith("<0x") for p in pieces)
    assert "[UNK]" not in pieces


def test_whitespace_is_kept_and_there_is_no_dummy_prefix(tokenizer: Tokenizer) -> None:
    pieces = [tokenizer.pieces[i] for i in tokenizer.encode("吾輩は猫である")]
    assert not pieces[0].startswith("\u2581")
    for text in ("  吾輩は  猫である   ", " a", "a ", "a  b", "\u3000全角\u3000"):
        assert tokenizer.decode(tokenizer.encode(text)) == text
    spaced = [tokenizer.pieces[i] for i in tokenizer.encode("  吾輩")]
    assert spaced[:2] == ["\u2581", "\u2581"]


def test_decode_matches_sentencepiece_on_random_ids(tokenizer: Tokenizer) -> None:
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer.path))
    rng = random.Random(1234)
    normal = [i for i in range(tokenizer.vocab_size) if not sp.is_control(i) and not sp.is_unknown(i)]
    bytes_ = [i for i in normal if sp.is_byte(i)]
    for _ in range(300):
        ids = [rng.choice(bytes_ if rng.random() < 0.6 else normal) for _ in range(rng.randint(1, 20))]
        assert tokenizer.decode(ids) == sp.decode(ids), ids


def test_stream_decoder_never_emits_half_a_character(tokenizer: Tokenizer) -> None:
    text = "猫😺がいます。" + CARD_EXAMPLE
    ids = tokenizer.encode(text)
    decoder = tokenizer.decoder()
    deltas = [decoder.feed(i) for i in ids] + [decoder.flush()]
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)
    # a character spread over several byte pieces appears whole, in one delta
    assert any(d == "გ" for d in deltas)


def test_stray_bytes_become_replacement_characters(tokenizer: Tokenizer) -> None:
    byte = {b: tokenizer.pieces.index(f"<0x{b:02X}>") for b in (0xE3, 0x81, 0x82, 0xFF)}
    decoder = tokenizer.decoder()
    # U+3042 (あ) is E3 81 82; then an unfinished E3 81 cut off by FF, and a dangling E3 at the end.
    ids = [byte[b] for b in (0xE3, 0x81, 0x82, 0xE3, 0x81, 0xFF, 0xE3)]
    deltas = [decoder.feed(i) for i in ids] + [decoder.flush()]
    # like sentencepiece: one U+FFFD per byte that is not part of a valid character
    assert "".join(deltas) == "あ" + "\ufffd" * 4
    assert "".join(deltas) == spm.SentencePieceProcessor(model_file=str(tokenizer.path)).decode(ids)
    assert deltas[:3] == ["", "", "あ"]
    for d in deltas:
        d.encode("utf-8")  # every delta is valid UTF-8
