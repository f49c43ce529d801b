"""Assembling the reply text: `<NL>` becomes a newline and stop strings end the reply, across delta boundaries.

The model writes `<NL>` either as one piece or as several (`<`, `NL`, `>`), so the replacement works on text, not
ids. Text that could still turn into `<NL>` or into a stop string is held back until it can't, so no delta ever
has to be taken back and a matched stop string is never sent.
"""

from __future__ import annotations

from collections.abc import Sequence

from jachat.service.text.prompt import NEWLINE


def _held_suffix(text: str, patterns: Sequence[str]) -> int:
    """Length of the longest suffix of text that is a proper prefix of one of patterns."""
    longest = 0
    for pattern in patterns:
        for size in range(min(len(pattern) - 1, len(text)), longest, -1):
            if text.endswith(pattern[:size]):
                longest = size
                break
    return longest


class ReplyAssembler:
    """`stop`: the caller's stop strings. `turn_markers`: text with which the model starts another speaker's turn
    (prompt.TURN_MARKERS); a match ends the reply just like a stop string, but counts as the end of the turn.
    Without `newlines`, `<NL>` is left as the model wrote it (a raw completion)."""

    def __init__(
        self,
        stop: Sequence[str] = (),
        turn_markers: Sequence[str] = (),
        include_stop: bool = False,
        newlines: bool = True,
    ) -> None:
        self.caller_stops = tuple(s for s in stop if s)
        self.stop = self.caller_stops + tuple(turn_markers)
        self.ended_turn = False
        self.include_stop = include_stop  # end the text with the caller's matched stop string
        self.newline = NEWLINE if newlines else None  # None: <NL> stays as the model wrote it (a raw completion)
        self.matched = ""  # the caller's stop string that ended the reply
        self._raw = ""  # decoded model text not yet converted (may end in part of "<NL>")
        self._text = ""  # converted text not yet emitted (may end in part of a stop string)
        self.stopped = False

    def push(self, text: str) -> str:
        """Add decoded model text; returns the text that is now final. Sets `stopped` on a stop match."""
        if self.stopped:
            return ""
        self._raw += text
        keep = 0 if self.newline is None else _held_suffix(self._raw, (self.newline,))
        cut = len(self._raw) - keep
        self._text += self._newlines(self._raw[:cut])
        self._raw = self._raw[cut:]
        return self._release()

    def _newlines(self, text: str) -> str:
        return text if self.newline is None else text.replace(self.newline, "\n")

    def _release(self) -> str:
        matches = [(i, s) for i, s in ((self._text.find(s), s) for s in self.stop) if i >= 0]
        if matches:
            # the earliest match; at the same place (or when they are equal) the caller's stop string wins
            first, stop = min(matches, key=lambda m: (m[0], m[1] not in self.caller_stops))
            self.stopped = True
            self.ended_turn = stop not in self.caller_stops
            self.matched = "" if self.ended_turn else stop
            out, self._text, self._raw = self._text[:first] + (self.matched if self.include_stop else ""), "", ""
            return out
        keep = _held_suffix(self._text, self.stop)
        cut = len(self._text) - keep
        out, self._text = self._text[:cut], self._text[cut:]
        return out

    def finish(self) -> str:
        """The model is done: release whatever was held back."""
        if self.stopped:
            return ""
        self._text += self._newlines(self._raw)
        self._raw = ""
        out = self._release()
        if not self.stopped:
            out, self._text = out + self._text, ""
        return out
