"""sentencepiece tokenization that behaves like sentencepiece itself (rinna's `use_fast=False`).

Decoding is byte-exact and incremental: every id maps to the bytes it stands for (byte-fallback pieces to their
byte, `▁` to a space, control tokens to nothing), and an incremental UTF-8 decoder turns those bytes into text,
holding back an incomplete character until its last byte arrives and replacing invalid bytes with U+FFFD.
"""

from __future__ import annotations

import codecs
import re
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

    def decode(self, ids: list[int]) -> str:
        decoder = self.decoder()
        return "".join(decoder.feed(i) for i in ids) + decoder.flush()

    def decoder(self) -> StreamDecoder:
        return StreamDecoder(self)


class StreamDecoder:
    """Token ids in, text out, one id at a time; never emits half a character."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._bytes = tokenizer.token_bytes
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, token_id: int) -> str:
        piece = self._bytes[token_id] if 0 <= token_id < len(self._bytes) else b""
        text: str = self._utf8.decode(piece)
        return text

    def flush(self) -> str:
        text: str = self._utf8.decode(b"", final=True)
        return text
