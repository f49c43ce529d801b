"""rinna's chat prompt format, exactly as the model card builds it."""

from __future__ import annotations

import enum
import re
from collections.abc import Sequence
from dataclasses import dataclass

NEWLINE = "<NL>"
_LINE_BREAK = re.compile(r"\r\n|\r|\n")


class Speaker(enum.Enum):
    USER = "ユーザー"
    SYSTEM = "システム"  # the model's own earlier replies


@dataclass(frozen=True)
class Turn:
    speaker: Speaker
    text: str


def render_turn(turn: Turn) -> str:
    return f"{turn.speaker.value}: {_LINE_BREAK.sub(NEWLINE, turn.text)}"


def render_prompt(turns: Sequence[Turn]) -> str:
    """`speaker: text` lines joined with <NL>, newlines in text as <NL>, ending with `<NL>システム: `."""
    return NEWLINE.join(render_turn(turn) for turn in turns) + f"{NEWLINE}{Speaker.SYSTEM.value}: "
