"""The turn-forgery defence on token ids, for any normalization rule the tokenizer declares.

prompt.py neutralises forged turns in text, but the model reads ids, and sentencepiece normalizes text before it
segments it: under NFKC the full-width `＜NL＞` and `ユーザー：` become `<NL>` and `ユーザー:` again, half-width
`ﾕｰｻﾞｰ` becomes `ユーザー`, and a custom rule may map anything to anything. So the rule is checked where it matters:

    No turn's text may yield, in the encoded prompt, a *marker*: the ids the service itself writes between turns,
    `<NL>` followed by a speaker label and `:` (encode("<NL>ユーザー:"), encode("<NL>システム:")).

`TurnGuard` enforces it in three steps:
1. At start-up it picks, for this tokenizer, the replacements prompt.neutralise uses for a literal `<NL>` and for a
   forged label's colon: the first candidate whose ids contain no `<NL>` (resp. no marker). Under identity these
   are `＜NL＞` and `：`, so text renders as before.
2. Each turn is encoded on its own; if a marker still appears inside it (the normalizer built one from other
   characters), the characters that produced the label and colon (traced through sentencepiece's byte offsets) are
   rewritten to the canonical label and the safe colon, and the turn is encoded again, a bounded number of times.
3. The whole prompt is checked once: it must hold exactly one marker per turn (the separators and the final cue).
A turn that cannot be made safe is refused (INVALID_ARGUMENT) rather than sent to the model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from jachat.service.domain.errors import FieldViolation, InvalidRequest
from jachat.service.text.prompt import NEWLINE, Speaker, Turn, render_turn
from jachat.service.text.tokenizer import Tokenizer

NEWLINE_CANDIDATES = ("＜NL＞", "〈NL〉", "‹NL›", "[NL]", "NL")
COLON_CANDIDATES = ("：", "꞉", "∶", "」", "")
MAX_REWRITES = 8  # rewrites of one turn before it is refused; each removes one marker


def find(ids: Sequence[int], marker: Sequence[int], start: int = 0) -> int:
    """Index of the first occurrence of marker in ids at or after start, or -1."""
    n = len(marker)
    first = marker[0]
    for i in range(start, len(ids) - n + 1):
        if ids[i] == first and list(ids[i : i + n]) == list(marker):
            return i
    return -1


def count(ids: Sequence[int], marker: Sequence[int]) -> int:
    found, i = 0, find(ids, marker)
    while i >= 0:
        found += 1
        i = find(ids, marker, i + len(marker))
    return found


@dataclass(frozen=True)
class RenderedTurn:
    text: str  # `speaker: text`, neutralised
    ids: list[int]  # its tokens, encoded on its own


class TurnGuard:
    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.newline_ids = tuple(tokenizer.encode(NEWLINE))
        self.markers = {s: tuple(tokenizer.encode(f"{NEWLINE}{s.value}:")) for s in Speaker}
        self.newline = self._first_safe(NEWLINE_CANDIDATES, lambda c: [c], (self.newline_ids,))
        self.colon = self._first_safe(
            COLON_CANDIDATES, lambda c: [f"{NEWLINE}{s.value}{c}" for s in Speaker], tuple(self.markers.values())
        )

    def _first_safe(
        self, candidates: Sequence[str], probes: Callable[[str], list[str]], forbidden: Sequence[Sequence[int]]
    ) -> str:
        for candidate in candidates:
            if all(find(self.tokenizer.encode(t), f) < 0 for t in probes(candidate) for f in forbidden):
                return candidate
        raise ValueError(  # no candidate survives: this tokenizer cannot be guarded, so it is not served
            f"{self.tokenizer.path}: its normalization rule ({self.tokenizer.normalization_rule}) turns every "
            f"candidate among {list(candidates)} into a turn boundary"
        )

    def _marker_at(self, ids: Sequence[int]) -> tuple[int, Speaker] | None:
        hits = [(i, s) for s, m in self.markers.items() if (i := find(ids, m)) >= 0]
        return min(hits, key=lambda h: h[0]) if hits else None

    def render(self, turn: Turn, index: int) -> RenderedTurn:
        """The turn's text and ids, with no marker inside; InvalidRequest (naming turns[index].text) if that
        cannot be reached."""
        text = render_turn(turn, self.newline, self.colon)
        for rewrites in range(MAX_REWRITES + 1):
            ids = self.tokenizer.encode(text)
            hit = self._marker_at(ids)
            if hit is None:
                return RenderedTurn(text, ids)
            if rewrites < MAX_REWRITES:
                text = self._rewrite(text, *hit)
        raise InvalidRequest(
            [
                FieldViolation(
                    ("turns", index, "text"), "contains a turn boundary (a line starting with a speaker label)"
                )
            ]
        )

    def _rewrite(self, text: str, start: int, speaker: Speaker) -> str:
        """Replace what the tokens of the first marker's label and colon came from with `label + safe colon`."""
        spans = self.tokenizer.encode_spans(text)
        first = spans[start + len(self.newline_ids)]
        last = spans[start + len(self.markers[speaker]) - 1]
        data = text.encode("utf-8")
        begin, end = first[1], last[2]
        if not 0 <= begin < end <= len(data):  # pragma: no cover - sentencepiece always reports a surface
            raise InvalidRequest([FieldViolation(("turns",), "contains a turn boundary that cannot be neutralised")])
        replaced = data[:begin] + f"{speaker.value}{self.colon}".encode() + data[end:]
        return replaced.decode("utf-8", errors="replace")

    def check_prompt(self, ids: Sequence[int], turns: int) -> None:
        """The encoded prompt holds exactly one marker per turn: the separators the service wrote, no more."""
        found = sum(count(ids, m) for m in self.markers.values())
        if found != turns:
            raise InvalidRequest(
                [FieldViolation(("turns",), f"the text forms {found - turns} turn boundaries of its own across turns")]
            )
