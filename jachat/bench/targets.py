"""The benchmark's targets, as data: what is measured from which runs, the limit, and which side of it passes."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from jachat.bench.workload import Report

Runs = dict[str, Report]


@dataclass(frozen=True)
class Target:
    what: str  # {n} stands for the concurrency
    measure: Callable[[Runs], float | None]  # None when the runs it needs are missing
    limit: float
    floor: bool = True  # True: the figure must be at least `limit`; False: at most


def _ratio(a: str, b: str, figure: Callable[[Report], float]) -> Callable[[Runs], float | None]:
    return lambda runs: figure(runs[a]) / figure(runs[b]) if a in runs and b in runs else None


def _tokens_per_second(report: Report) -> float:
    return report.tokens_per_second


def _ttft_p99_over_alone(runs: Runs) -> float | None:
    if "service_n" not in runs or "service_1" not in runs:
        return None
    return runs["service_n"].ttft["p99"] / runs["service_1"].e2e["p50"]


def _loop_ttft_p99_over_alone(runs: Runs) -> float | None:
    if "loop_n" not in runs or "loop_1" not in runs:
        return None
    return runs["loop_n"].ttft["p99"] / runs["loop_1"].e2e["p50"]


def _loop_steady_ttft_p99_over_alone(runs: Runs) -> float | None:
    if "loop_n" not in runs or "loop_1" not in runs or not runs["loop_n"].ttft_after_opening:
        return None
    return runs["loop_n"].ttft_after_opening["p99"] / runs["loop_1"].e2e["p50"]


def _errors(runs: Runs) -> float | None:
    return float(sum(runs["service_n"].errors.values())) if "service_n" in runs else None


TARGETS = (
    Target("service 1 stream / ctranslate2 best for 1", _ratio("service_1", "ct2_1", _tokens_per_second), 0.95),
    Target("service {n} streams / ctranslate2 best for {n}", _ratio("service_n", "ct2_n", _tokens_per_second), 0.9),
    Target("service {n} streams / service 1 stream", _ratio("service_n", "service_1", _tokens_per_second), 2.5),
    Target("service 1 stream / transformers 1 sequence", _ratio("service_1", "hf", _tokens_per_second), 5.0),
    Target("TTFT p99 at {n} streams / one generation alone (e2e p50)", _ttft_p99_over_alone, 2.0, floor=False),
    Target("errors at {n} streams", _errors, 0.0, floor=False),
    # jachat-bench loop (decodeloop.py): the decode loop, static batches and raw CTranslate2 in one run
    Target("static {n} streams / ctranslate2 best for {n}", _ratio("static_n", "ct2_n", _tokens_per_second), 0.9),
    Target("loop 1 stream / ctranslate2 best for 1", _ratio("loop_1", "ct2_1", _tokens_per_second), 0.95),
    Target("loop {n} streams / ctranslate2 best for {n}", _ratio("loop_n", "ct2_n", _tokens_per_second), 1.0),
    Target("loop {n} streams / static {n} streams", _ratio("loop_n", "static_n", _tokens_per_second), 1.0),
    Target("loop alone, {n} rows / ctranslate2 best for {n}", _ratio("alone_n", "ct2_n", _tokens_per_second), 1.0),
    Target("loop TTFT p99 at {n} streams / one generation alone (e2e p50)", _loop_ttft_p99_over_alone, 0.25, False),
    Target(
        "loop TTFT p99 at {n} streams, past the opening burst / one generation alone",
        _loop_steady_ttft_p99_over_alone,
        0.25,
        False,
    ),
    Target("loop, 4 kinds of options / one kind", _ratio("loop_mixed_n", "loop_n", _tokens_per_second), 0.95),
)
