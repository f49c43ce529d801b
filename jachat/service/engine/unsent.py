"""What a generation's caller has not taken yet: the reply's text that became final and the tokens behind it. The
one place where text and tokens are merged.

The receiver thread (sequence.py) adds each token as it comes, and text once the reply made it final; a token that
is half a character, or held back as the start of a stop string, waits here for the text it will make. The caller
takes everything there is at once (engine.stream), so one that falls behind gets all the text and tokens since its
last look in one delta, never a backlog of one message per token, and a caller that wants the whole reply is never
woken for it: it takes it at the end. What no text was made of by the end (a final </s>, tokens whose text the reply
dropped) is the tail, which rides on the Completion: so every delta a caller sees has text.
"""

from __future__ import annotations

import threading

from jachat.service.domain.results import Delta, GeneratedToken


class Unsent:
    """Written by one thread (the receiver), taken on the caller's event loop."""

    def __init__(self, streaming: bool) -> None:
        self.streaming = streaming  # a caller that wants the whole reply is not woken per delta
        self._lock = threading.Lock()
        self._text: list[str] = []  # final, not taken yet
        self._tokens: list[GeneratedToken] = []  # the tokens that text was made of
        self._waiting: list[GeneratedToken] = []  # generated since, their text not final yet

    def token(self, token: GeneratedToken) -> None:
        with self._lock:
            self._waiting.append(token)

    def text(self, text: str) -> bool:
        """Text became final, made of the tokens that waited for it. True: wake the caller (it streams, and this is
        the first text since it last took)."""
        if not text:
            return False
        with self._lock:
            wake = self.streaming and not self._text
            self._text.append(text)
            self._tokens.extend(self._waiting)
            self._waiting.clear()
        return wake

    def take(self) -> Delta | None:
        """The text that became final since the last take, with its tokens (None: none)."""
        with self._lock:
            if not self._text:
                return None
            delta = Delta("".join(self._text), tuple(self._tokens))
            self._text, self._tokens = [], []
        return delta

    def tail(self) -> tuple[GeneratedToken, ...]:
        """At the end, after the last take: the tokens no text was made of."""
        with self._lock:
            tail, self._waiting = tuple(self._waiting), []
        return tail
