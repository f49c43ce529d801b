"""The engine's result vocabulary: what front ends and metrics read about a generation. Plain data, no logic.

A generation streams `Delta`s (text and the tokens behind it) and ends with one `Completion`. `FinishedGeneration`
is the frozen record the metrics receive when a generation ends (never the live, thread-shared state itself).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

# gRPC cancels a call at its deadline by its own clock (and a client's deadline fires a moment before the server's):
# a cancellation this close to the deadline is that deadline, not the caller going away.
DEADLINE_SLACK = 0.1


class FinishReason(enum.Enum):
    END_OF_TURN = "eos"  # the model wrote </s> (or started the user's turn itself)
    LENGTH = "length"  # max_new_tokens (or the context) was reached
    STOP = "stop"  # a caller's stop string was generated
    CANCELLED = "cancelled"  # the caller went away
    DEADLINE = "deadline"  # the caller's deadline passed
    ERROR = "error"  # the engine failed
    SHED = "shed"  # a queued batch call gave its place to an interactive one (RESOURCE_EXHAUSTED)


class Priority(enum.Enum):
    INTERACTIVE = "interactive"  # a person waits: first into every free place
    BATCH = "batch"  # bulk work: waits while interactive calls queue, first shed when the queue is full


@dataclass(frozen=True)
class GeneratedToken:
    id: int
    logprob: float  # log-softmax after the repetition penalty, before temperature, top-k and top-p


@dataclass(frozen=True)
class Delta:
    """Text that became final (never empty), and the tokens it was made of since the previous delta: a token can
    be half a character, or held back as the start of a stop string, so it comes with the text it ends up in."""

    text: str
    tokens: tuple[GeneratedToken, ...]


@dataclass(frozen=True)
class Completion:
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int  # tokens generated, including a final </s>
    token_ids: tuple[int, ...]  # generated ids, without a final </s>
    # the tail: generated tokens that came in no Delta, since no text was made of them (a final </s>, tokens whose
    # text a stop string dropped); so every Delta has text
    tokens: tuple[GeneratedToken, ...] = ()
    stop_sequence: str = ""  # the caller's stop string that ended the reply
    # time.monotonic() of the batch's start, the first token and the end (None: never reached)
    started_at: float | None = None
    first_token_at: float | None = None
    finished_at: float | None = None
    batch_size: int = 0  # sequences in the generate_batch call that ran it (0: it never ran)


@dataclass(frozen=True)
class Scored:
    """Candidate replies scored against one conversation: each reply's tokens with their teacher-forced
    log-probabilities (given the conversation and the reply's earlier tokens), in the order asked."""

    prompt_tokens: int
    candidates: tuple[tuple[GeneratedToken, ...], ...]


@dataclass(frozen=True)
class PromptScores:
    """A prompt's tokens after the first, each with its log-probability given the tokens before it, and, when
    asked for, the most likely token at each of those places (same positions; empty when not asked)."""

    tokens: tuple[GeneratedToken, ...]
    top: tuple[GeneratedToken, ...] = ()


@dataclass(frozen=True)
class FinishedGeneration:
    reason: FinishReason
    prompt_tokens: int
    generated_tokens: int
    tokens_after_cancel: int  # tokens generated after a cancellation was seen (promise: <= 2)
    tenant: str = "default"


@dataclass(frozen=True)
class ModelInfo:
    model_name: str
    quantization: str
    compute_type: str
    device: str
    vocab_size: int
    context_length: int
