"""The benchmark's workload and its measurements: prompts, sampling, one record per request, reports, progress.

The workload: a mix of prompts rendered as the service renders them, a fixed output length (min_new_tokens =
max_new_tokens, so every request writes exactly that many tokens), and one set of sampling options.
Figures: time to first token (TTFT), inter-token latency (ITL: per request, (last token - first token) /
(tokens - 1)), end-to-end latency, each p50/p90/p99 over requests; aggregate output tokens/s; errors by code.
"""

from __future__ import annotations

import math
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from jachat.service.domain.sampling import SamplingOptions
from jachat.service.edge.grpc.protocol import sampling_to_pb
from jachat.service.text.prompt import Speaker, Turn, render_prompt
from jachat.v1 import chat_pb2

PROMPTS = (
    "コンタクトレンズを慣れるにはどうすればよいですか?",
    "日本の首都はどこですか?大阪や京都との違いも教えてください。",
    "おすすめの本を教えてください。最近は小説よりもエッセイをよく読みます。",
    "プログラミングを勉強したいのですが、何から始めればよいでしょうか?",
    "明日は雨が降るそうです。傘以外に持っていくと良いものはありますか?",
    "朝ごはんにパンとコーヒーを食べました。昼ごはんは何がいいと思いますか?",
    "富士山に登りたいです。初心者が気をつけることを教えてください。",
    "吾輩は猫である。名前はまだ無い。この続きを書いてください。",
)


@dataclass(frozen=True)
class Workload:
    prompts: tuple[str, ...] = PROMPTS
    tokens: int = 64  # every request generates exactly this many tokens
    temperature: float = 0.7
    top_k: int = 50
    top_p: float = 1.0
    repetition_penalty: float = 1.0

    def prompt(self, i: int) -> str:
        return render_prompt([Turn(Speaker.USER, self.prompts[i % len(self.prompts)])])

    def sampling_pb(self, i: int = 0) -> chat_pb2.SamplingParams:
        return sampling_to_pb(self.options(i))

    def options(self, i: int = 0) -> SamplingOptions:
        """Request i's options (the same for every request here)."""
        return SamplingOptions(
            max_new_tokens=self.tokens,
            min_new_tokens=self.tokens,
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            repetition_penalty=self.repetition_penalty,
        )


@dataclass(frozen=True)
class MixedWorkload(Workload):
    """The same prompts and lengths, with four kinds of sampling options in turn (request i takes kind i mod 4): the
    workload's own, greedy, nucleus sampling, and a cold top-k with a stronger penalty. Static batches never put two
    kinds in one batch; the decode loop runs them all in one."""

    def options(self, i: int = 0) -> SamplingOptions:
        own = super().options(i)
        kinds = (
            own,
            replace(own, temperature=0.0, repetition_penalty=1.0),
            replace(own, temperature=1.0, top_k=0, top_p=0.9),
            replace(own, temperature=0.5, top_k=10, repetition_penalty=1.2),
        )
        return kinds[i % len(kinds)]


@dataclass
class Record:
    ttft: float
    e2e: float
    tokens: int
    code: str = "OK"

    @property
    def itl(self) -> float | None:
        return (self.e2e - self.ttft) / (self.tokens - 1) if self.tokens > 1 else None


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = q / 100 * (len(ordered) - 1)
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass
class Report:
    name: str
    concurrency: int
    requests: int
    seconds: float
    output_tokens: int
    tokens_per_second: float
    ttft: dict[str, float] = field(default_factory=dict)
    itl: dict[str, float] = field(default_factory=dict)
    e2e: dict[str, float] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)

    cancelled: int = 0  # calls the client cancelled on purpose (--cancel-fraction): not errors
    max_in_flight: int = 0  # the most calls in flight at once (open loop: bounded by the concurrency)
    nominal_rate: float | None = None  # open loop: the calls/s asked for
    offered_rate: float | None = None  # open loop: the calls/s actually sent (calls over the arrival window)
    # closed loop: TTFT of the calls launched after the first `concurrency`, which all start at once (a burst no
    # steady load has); empty for an open loop
    ttft_after_opening: dict[str, float] = field(default_factory=dict)

    @classmethod
    def of(cls, name: str, concurrency: int, records: list[Record], seconds: float, max_in_flight: int = 0) -> Report:
        ok = [r for r in records if r.code == "OK"]
        on_purpose = sum(r.code == "CANCELLED_BY_CLIENT" for r in records)
        output = sum(r.tokens for r in ok)

        def pcts(values: list[float]) -> dict[str, float]:
            return {f"p{q}": percentile(values, q) for q in (50, 90, 99)}

        return cls(
            name=name,
            concurrency=concurrency,
            requests=len(records),
            seconds=seconds,
            output_tokens=output,
            tokens_per_second=output / seconds if seconds > 0 else math.nan,
            ttft=pcts([r.ttft for r in ok]),
            itl=pcts([r.itl for r in ok if r.itl is not None]),
            e2e=pcts([r.e2e for r in ok]),
            errors=dict(Counter(r.code for r in records if r.code not in ("OK", "CANCELLED_BY_CLIENT"))),
            cancelled=on_purpose,
            max_in_flight=max_in_flight or concurrency,
        )


class Progress:
    """A one-line progress bar on stderr."""

    def __init__(self, label: str, total: int | None, seconds: float | None) -> None:
        self.label, self.total, self.seconds = label, total, seconds
        self.done = 0
        self.started = time.monotonic()
        self._shown = 0.0

    def advance(self) -> None:
        self.done += 1
        now = time.monotonic()
        if now - self._shown > 0.2:
            self._shown = now
            self.show(now)

    def show(self, now: float) -> None:
        elapsed = now - self.started
        fraction = (self.done / self.total) if self.total else min(1.0, elapsed / (self.seconds or 1))
        bar = "#" * int(30 * fraction)
        sys.stderr.write(f"\r{self.label:<24} [{bar:<30}] {self.done} requests {elapsed:6.1f} s")
        sys.stderr.flush()

    def close(self) -> None:
        self.show(time.monotonic())
        sys.stderr.write("\n")
