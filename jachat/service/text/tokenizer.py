"""sentencepiece tokenization that behaves like sentencepiece itself (rinna's `use_fast=False`).

Decoding is byte-exact and incremental: every id maps to the bytes it stands for (byte-fallback pieces to their
byte, `▁` to a space, control tokens to nothing), and a UTF-8 decoder turns those bytes into text, holding back an
incomplete character until its last byte arrives. Invalid bytes become U+FFFD one byte at a time, which is what
sentencepiece's own decode does (Python's codec would merge some of them), so the text equals the card's.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import sentencepiece as spm

_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


class Tokenizer:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._sp = spm.SentencePieceProcessor(model_file=str(self.path))
        self.vocab_size: int = self._sp.get_piece_size()
        self.eos_id: int = self._sp.eos_id()
        self.bos_id: int = self._sp.bos_id()
        self.pieces: list[str] = [self._sp.id_to_piece(i) for i in range(self.vocab_size)]
        self.token_bytes: list[bytes] = [self._bytes_of(i) for i in range(self.vocab_size)]

    def _bytes_of(self, token_id: int) -> bytes:
        if self._sp.is_control(token_id) or self._sp.is_unknown(token_id):
            return b""
        piece = self.pieces[token_id]
        if self._sp.is_byte(token_id):
            match = _BYTE_PIECE.match(piece)
            if match is None:  # pragma: no cover - sentencepiece always spells byte pieces <0xNN>
                raise ValueError(f"unexpected byte piece {piece!r}")
            return bytes([int(match.group(1), 16)])
        return piece.replace("\u2581", " ").encode("utf-8")

    def encode(self, text: str) -> list[int]:
        """Token ids of text, without special tokens."""
        ids: list[int] = self._sp.encode(text)
        return ids

    def encode_spans(self, text: str) -> list[tuple[int, int, int]]:
        """(id, begin, end) of every token of text: begin and end are UTF-8 byte offsets into text itself (before
        normalization), so a token can be traced back to the characters that produced it."""
        proto = self._sp.encode(text, return_type="proto")
        return [(piece.id, piece.begin, piece.end) for piece in proto.pieces]

    @property
    def normalization_rule(self) -> str:
        """The normalization rule spiece.model declares (identity, nmt_nfkc, nfkc, nmt_nfkc_cf, or a custom one)."""
        from sentencepiece import sentencepiece_model_pb2 as model_pb2

        proto = model_pb2.ModelProto()  # type: ignore[attr-defined]
        proto.ParseFromString(self._sp.serialized_model_proto())
        return str(proto.normalizer_spec.name) or "custom"

    def decode(self, ids: Sequence[int]) -> str:
        return decode(self.token_bytes, ids)

    def decoder(self) -> StreamDecoder:
        return StreamDecoder(self.token_bytes)


def decode(token_bytes: Sequence[bytes], ids: Sequence[int]) -> str:
    """The text of ids, each spelled by `token_bytes` (a Tokenizer's), byte-exact as sentencepiece decodes."""
    decoder = StreamDecoder(token_bytes)
    return "".join(decoder.feed(i) for i in ids) + decoder.flush()


def _char_length(data: bytes | bytearray, start: int) -> int:
    """Length of the UTF-8 character at start: > 0 if valid, 0 if data ends inside a valid prefix, -1 if invalid."""
    lead = data[start]
    if lead < 0x80:
        return 1
    if 0xC2 <= lead <= 0xDF:
        size, low, high = 2, 0x80, 0xBF
    elif 0xE0 <= lead <= 0xEF:
        size = 3
        low, high = {0xE0: (0xA0, 0xBF), 0xED: (0x80, 0x9F)}.get(lead, (0x80, 0xBF))
    elif 0xF0 <= lead <= 0xF4:
        size = 4
        low, high = {0xF0: (0x90, 0xBF), 0xF4: (0x80, 0x8F)}.get(lead, (0x80, 0xBF))
    else:
        return -1
    for i in range(1, size):
        if start + i >= len(data):
            return 0
        byte = data[start + i]
        if not (low <= byte <= high if i == 1 else 0x80 <= byte <= 0xBF):
            return -1
    return size


class StreamDecoder:
    """Token ids in, text out, one id at a time; never emits half a character."""

    def __init__(self, token_bytes: Sequence[bytes]) -> None:
        self._bytes = token_bytes
        self._pending = bytearray()

    def feed(self, token_id: int) -> str:
        if 0 <= token_id < len(self._bytes):
            self._pending += self._bytes[token_id]
        return self._decode(final=False)

    def flush(self) -> str:
        return self._decode(final=True)

    def _decode(self, final: bool) -> str:
        data, out, pos = self._pending, [], 0
        while pos < len(data):
            size = _char_length(data, pos)
            if size == 0 and not final:
                break
            if size <= 0:
                out.append("\ufffd")
                pos += 1
            else:
                out.append(data[pos : pos + size].decode("utf-8"))
                pos += size
        del data[:pos]
        return "".join(out)
