"""The errors a caller can be given, in the service's own vocabulary: each has a neutral `Kind`, and an invalid
request lists its broken rules as structured field paths. No transport here: each edge maps kinds to its statuses
(edge/grpc/status.py, edge/http/status.py) and spells paths its own way."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

# A field of a request in the engine's vocabulary: names and list indices, e.g. ("turns", 2, "text") or
# ("sampling", "top_k"). Edges spell it: turns[2].text over gRPC, messages[2].content over HTTP.
FieldPath = tuple[str | int, ...]


class Kind(str, Enum):
    """What went wrong, for the caller. The values are Google's canonical status names, which both APIs' metrics
    use as their `code` label, so one error-ratio alert covers both."""

    INVALID = "INVALID_ARGUMENT"
    NOT_FOUND = "NOT_FOUND"
    UNAUTHENTICATED = "UNAUTHENTICATED"
    OVERLOADED = "RESOURCE_EXHAUSTED"
    UNAVAILABLE = "UNAVAILABLE"
    DEADLINE = "DEADLINE_EXCEEDED"
    CANCELLED = "CANCELLED"
    INTERNAL = "INTERNAL"


@dataclass(frozen=True)
class FieldViolation:
    path: FieldPath
    description: str

    def __str__(self) -> str:
        return f"{dotted(self.path)}: {self.description}"


def dotted(path: FieldPath) -> str:
    """A path as protobuf and most logs write it: turns[2].text."""
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text


class JachatError(Exception):
    """Base of the errors that reach a caller; anything else that escapes is a bug (INTERNAL, text withheld)."""

    kind = Kind.INTERNAL


# A status travels in the trailers, which clients cap (8 KiB by default): a request with hundreds of violations must
# still get INVALID_ARGUMENT, not a RESOURCE_EXHAUSTED from its own oversized error. So the message names the first
# few violations and the detail lists at most MAX_REPORTED_VIOLATIONS, each saying how many were left out.
MAX_MESSAGE_VIOLATIONS = 3
MAX_REPORTED_VIOLATIONS = 10
MAX_DESCRIPTION = 240


class InvalidRequest(JachatError):
    """The request breaks a rule; each broken rule names its field."""

    kind = Kind.INVALID

    def __init__(self, violations: list[FieldViolation]) -> None:
        self.violations = violations
        super().__init__(message(violations, dotted))

    def reported(self) -> list[FieldViolation]:
        """The violations a detail lists: the first ones, and a last entry counting the rest."""
        if len(self.violations) <= MAX_REPORTED_VIOLATIONS:
            return self.violations
        head = self.violations[: MAX_REPORTED_VIOLATIONS - 1]
        rest = len(self.violations) - len(head)
        return [*head, FieldViolation(("request",), f"{rest} more violations are not listed")]


def message(violations: list[FieldViolation], spell: Callable[[FieldPath], str]) -> str:
    """An invalid request's message, its paths spelled by `spell`: the first few violations, and how many more."""
    shown = "; ".join(
        f"{spell(v.path)}: {v.description}"[:MAX_DESCRIPTION] for v in violations[:MAX_MESSAGE_VIOLATIONS]
    )
    more = len(violations) - MAX_MESSAGE_VIOLATIONS
    return shown + (f" (and {more} more violations)" if more > 0 else "")


class ModelNotReady(JachatError):
    kind = Kind.UNAVAILABLE


class ShuttingDown(JachatError):
    """The server is draining: retry on another replica."""

    kind = Kind.UNAVAILABLE


class Overloaded(JachatError):
    """The queue is full. Clients should retry after `retry_after` seconds."""

    kind = Kind.OVERLOADED

    def __init__(self, message: str, retry_after: float) -> None:
        self.retry_after = retry_after
        super().__init__(message)


class DeadlineExceeded(JachatError):
    kind = Kind.DEADLINE


class Unauthenticated(JachatError):
    kind = Kind.UNAUTHENTICATED


class NotFound(JachatError):
    kind = Kind.NOT_FOUND


class WriteStalled(DeadlineExceeded):
    """A stream's client read nothing for the write timeout: nothing more can reach it, not even an error."""


class EngineFailure(JachatError):
    """Generation failed inside the engine; details are logged, not sent."""

    kind = Kind.INTERNAL


class EngineLost(JachatError):
    """The engine process died (a crash, a CUDA error, the OOM killer): the server stops; retry on another replica."""

    kind = Kind.UNAVAILABLE
