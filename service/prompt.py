"""rinna's chat prompt format, exactly as the model card builds it, with turns that cannot be forged.

The format is plain text: turns `speaker: text` joined with `<NL>`. Text inside a turn could therefore pretend to
start a new turn. Rendering neutralises that, for every turn (the history a client sends is not trusted either):
- a literal `<NL>` in text becomes `＜NL＞` (full-width brackets): it stays readable, but is no longer the model's
  newline token, so it cannot end the turn;
- a line of text (after a line break) that starts with a speaker label and a colon, `ユーザー:` or `システム:`
  (spaces before it allowed), gets a full-width colon instead: `ユーザー：`. The line break still becomes `<NL>`,
  but what follows no longer has the form of a turn.
Text without these patterns renders byte for byte as the model card does (golden tests pin both).
"""

from __future__ import annotations

import enum
import re
from collections.abc import Sequence
from dataclasses import dataclass

NEWLINE = "<NL>"
NEUTRAL_NEWLINE = "＜NL＞"
_LINE_BREAK = re.compile(r"\r\n|\r|\n")


class Speaker(enum.Enum):
    USER = "ユーザー"
    SYSTEM = "システム"  # the model's own earlier replies


_FORGED_LABEL = re.compile(rf"^([ \t\u3000]*(?:{'|'.join(s.value for s in Speaker)})[ \t\u3000]*):")
# The model ends its reply by starting the user's next turn itself; the reply stops there (see reply.py).
TURN_MARKERS = (f"\n{Speaker.USER.value}:",)


@dataclass(frozen=True)
class Turn:
    speaker: Speaker
    text: str


def neutralise(text: str) -> str:
    """Text that cannot end its turn or start another one (see the module docstring)."""
    lines = _LINE_BREAK.split(text.replace(NEWLINE, NEUTRAL_NEWLINE))
    return NEWLINE.join([lines[0], *(_FORGED_LABEL.sub(r"\1：", line) for line in lines[1:])])


def render_turn(turn: Turn) -> str:
    return f"{turn.speaker.value}: {neutralise(turn.text)}"


def render_prompt(turns: Sequence[Turn]) -> str:
    """`speaker: text` lines joined with <NL>, newlines in text as <NL>, ending with `<NL>システム: `."""
    return NEWLINE.join(render_turn(turn) for turn in turns) + f"{NEWLINE}{Speaker.SYSTEM.value}: "
