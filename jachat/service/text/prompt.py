"""rinna's chat prompt format, exactly as the model card builds it, with turns that cannot be forged in text.

The format is plain text: turns `speaker: text` joined with `<NL>`. Text inside a turn could therefore pretend to
start a new turn. Rendering neutralises that, for every turn (the history a client sends is not trusted either):
- every Unicode line break (`\\n`, `\\r\\n`, `\\r`, VT, FF, FS, GS, RS, NEL, U+2028, U+2029) becomes `<NL>`, the
  model's newline, as the card does for `\\n`;
- a literal `<NL>` in text becomes `newline` (default `＜NL＞`, full-width brackets): it stays readable, but is no
  longer the model's newline token, so it cannot end the turn;
- a line of text (after a line break) that starts with a speaker label and a colon, `ユーザー:` or `システム:`, with
  spaces or invisible characters (zero-width, NBSP, soft hyphen, BOM) before or after the label, gets `colon`
  (default `：`, full-width) instead, so what follows no longer has the form of a turn.
This is the text half of the defence. Whether a replacement is safe depends on the tokenizer's normalization
rule (NFKC turns `＜NL＞` back into `<NL>` and `：` into `:`), so injection.TurnGuard picks replacements that
survive it and checks the result on token ids. Text without these patterns renders byte for byte as the model card
does (golden tests pin both).
"""

from __future__ import annotations

import enum
import re
from collections.abc import Sequence
from dataclasses import dataclass

NEWLINE = "<NL>"
NEUTRAL_NEWLINE = "＜NL＞"
NEUTRAL_COLON = "："
# every line boundary of str.splitlines(); \r\n first so it counts as one break
_LINE_BREAK = re.compile(r"\r\n|[\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029]")
# characters a reader (or a normalizer) does not see: spaces of every width, zero-width characters, joiners,
# direction marks, word joiner and invisible operators, soft hyphen, Mongolian vowel separator, BOM
_INVISIBLE = r"[^\S\r\n\v\f\x1c-\x1e\x85\u2028\u2029]|[\u00ad\u034f\u180e\u200b-\u200f\u2060-\u2064\ufeff]"
_COLONS = ":：﹕︓"


class Speaker(enum.Enum):
    USER = "ユーザー"
    SYSTEM = "システム"  # the model's own earlier replies


_LABELS = "|".join(s.value for s in Speaker)
_FORGED_LABEL = re.compile(rf"^((?:{_INVISIBLE})*(?:{_LABELS})(?:{_INVISIBLE})*)[{_COLONS}]")
# The model ends its reply by starting the user's next turn itself; the reply stops there (see reply.py).
TURN_MARKERS = (f"\n{Speaker.USER.value}:",)


@dataclass(frozen=True)
class Turn:
    speaker: Speaker
    text: str


def neutralise(text: str, newline: str = NEUTRAL_NEWLINE, colon: str = NEUTRAL_COLON) -> str:
    """Text that cannot end its turn or start another one (see the module docstring)."""
    lines = _LINE_BREAK.split(text.replace(NEWLINE, newline))
    return NEWLINE.join([lines[0], *(_FORGED_LABEL.sub(lambda m: m.group(1) + colon, line) for line in lines[1:])])


def render_turn(turn: Turn, newline: str = NEUTRAL_NEWLINE, colon: str = NEUTRAL_COLON) -> str:
    return f"{turn.speaker.value}: {neutralise(turn.text, newline, colon)}"


SEPARATOR = NEWLINE  # between turns
CUE = f"{NEWLINE}{Speaker.SYSTEM.value}: "  # after the last turn: the model writes the system's reply


def join_turns(rendered: Sequence[str]) -> str:
    """Rendered turns as one prompt: joined with <NL>, ending with `<NL>システム: `."""
    return SEPARATOR.join(rendered) + CUE


def render_prompt(turns: Sequence[Turn]) -> str:
    """`speaker: text` lines joined with <NL>, newlines in text as <NL>, ending with `<NL>システム: `."""
    return join_turns([render_turn(turn) for turn in turns])
