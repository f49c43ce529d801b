"""`jachat-bench sweep`: open-loop load curves. Real traffic arrives when it arrives, not when the last reply ends,
so closed loops hide queueing: this sends Poisson arrivals at rising rates to a fresh server until it saturates,
and reports per rate the TTFT and end-to-end p50/p99 and the achieved tokens/s, and the highest rate whose TTFT p99
stays under the SLO (default 1 s) without errors. A progress bar per rate; a PNG of the curves beside the report.

Saturation (the sweep stops after the first such rate): TTFT p99 over 5x the SLO (queues grow without bound past
the service's capacity, and TTFT with them), or errors over 1%.

With `--openai-base-url` the same sweep (the same schedule, prompts as the same user turns, sampling and token
count) runs against any OpenAI-compatible server already running (llama-server, vLLM, TGI, jachat's HTTP API), so
servers are compared with one client; `--compare REPORT.json` draws another sweep's curves beside this one's.
"""

from __future__ import annotations

import asyncio
import json
import math
import sys
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from jachat.bench.clients import run_grpc, run_openai
from jachat.bench.reports import write_report
from jachat.bench.workload import Report, Workload

MAX_IN_FLIGHT = 512  # an open loop, bounded only so a dead server cannot exhaust the client
MAX_STEPS = 16


@dataclass(frozen=True)
class Step:
    rate: float  # nominal, calls/s
    offered_rate: float  # calls/s actually sent: the calls over the arrival window (clients.arrivals)
    achieved_rate: float  # completed calls/s
    tokens_per_second: float
    ttft_p50: float
    ttft_p99: float
    e2e_p50: float
    e2e_p99: float
    requests: int
    errors: int

    @classmethod
    def of(cls, rate: float, report: Report) -> Step:
        errors = sum(report.errors.values())
        achieved = report.requests / report.seconds if report.seconds > 0 else 0.0
        return cls(
            rate,
            report.offered_rate if report.offered_rate is not None else math.nan,
            achieved,
            report.tokens_per_second,
            report.ttft["p50"],
            report.ttft["p99"],
            report.e2e["p50"],
            report.e2e["p99"],
            report.requests,
            errors,
        )

    def within(self, slo: float) -> bool:
        return self.errors == 0 and self.ttft_p99 <= slo

    def saturated(self, slo: float) -> bool:
        return not self.ttft_p99 <= 5 * slo or self.errors > 0.01 * max(1, self.requests)  # NaN: nothing answered


def rates_from(start: float, factor: float) -> list[float]:
    return [round(start * factor**i, 3) for i in range(MAX_STEPS)]


def best_rate(steps: Sequence[Step], slo: float) -> float | None:
    """The highest offered rate whose TTFT p99 met the SLO without errors."""
    within = [s.rate for s in steps if s.within(slo)]
    return max(within) if within else None


Runner = Callable[[float, str], Coroutine[Any, Any, Report]]  # (rate, label) -> that step's report


def over_grpc(target: str, workload: Workload, duration: float) -> Runner:
    """Steps of `duration` seconds against a jachat's gRPC API."""

    async def run(rate: float, label: str) -> Report:
        return await run_grpc(target, workload, MAX_IN_FLIGHT, duration=duration, rate=rate, label=label)

    return run


def over_openai(base_url: str, workload: Workload, duration: float, model: str | None, extra: dict[str, Any]) -> Runner:
    """Steps of `duration` seconds against any OpenAI-compatible server (clients.run_openai)."""

    async def run(rate: float, label: str) -> Report:
        return await run_openai(
            base_url, workload, MAX_IN_FLIGHT, duration=duration, rate=rate, label=label, model=model, extra=extra
        )

    return run


def sweep(runner: Runner, rates: Sequence[float], slo: float, stop: bool) -> list[Step]:
    steps: list[Step] = []
    for rate in rates:
        report = asyncio.run(runner(rate, f"sweep {rate:g}/s"))
        steps.append(Step.of(rate, report))
        if stop and steps[-1].saturated(slo):
            break
    return steps


def plot(
    steps: Sequence[Step], slo: float, path: Path, title: str, other: tuple[str, Sequence[Step]] | None = None
) -> Path | None:
    """The curves as a PNG (matplotlib, the bench extra), with another sweep's beside them (dashed, grey labels);
    None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("sweep: matplotlib is not installed (pip install 'jachat[bench]'): no plot", file=sys.stderr)
        return None
    figure, (latency, throughput) = plt.subplots(1, 2, figsize=(11, 4.2))
    runs = [("", steps, "-")] + ([(f"{other[0]}: ", other[1], ":")] if other is not None else [])
    for prefix, run, line in runs:
        rates = [s.rate for s in run]
        latency.plot(rates, [s.ttft_p50 for s in run], "o" + line, label=f"{prefix}TTFT p50")
        latency.plot(rates, [s.ttft_p99 for s in run], "^" + line, label=f"{prefix}TTFT p99")
        if not prefix:
            latency.plot(rates, [s.e2e_p50 for s in run], "s" + line, label="end-to-end p50")
            latency.plot(rates, [s.e2e_p99 for s in run], "D" + line, label="end-to-end p99")
        throughput.plot(rates, [s.tokens_per_second for s in run], "o" + line, label=prefix.rstrip(": ") or "this")
    latency.axhline(slo, color="grey", linestyle=":", label=f"SLO {slo:g} s")
    latency.set(xlabel="offered calls/s (Poisson)", ylabel="seconds", yscale="log", title="latency")
    latency.legend(fontsize="small")
    if other is not None:
        throughput.legend()
    throughput.set(xlabel="offered calls/s (Poisson)", ylabel="output tokens/s", title="achieved throughput")
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def sweep_main(args: Any, workload: Workload, meta: dict[str, Any]) -> int:
    """Start jachat-serve on the model (or take the running OpenAI-compatible server), sweep, print the table, write
    the JSON report and the plot."""
    from jachat.bench.launcher import spawn

    explicit = [float(r) for r in args.rates.split(",")] if args.rates else None
    rates = explicit or rates_from(args.start_rate, args.rate_factor)
    duration, stop = args.step_duration, explicit is None
    if args.openai_base_url:
        extra = json.loads(args.openai_extra) if args.openai_extra else {}
        meta["server"] = {"openai_base_url": args.openai_base_url, "model": args.openai_model, "extra": extra}
        runner = over_openai(args.openai_base_url, workload, duration, args.openai_model, extra)
        steps = sweep(runner, rates, args.slo, stop)
    else:
        server = spawn(args.model, "--device", "cpu", *args.serve_arg)
        meta["server"] = [str(a) for a in server.process.args]  # type: ignore[union-attr]
        try:
            steps = sweep(over_grpc(server.target, workload, duration), rates, args.slo, stop)
        finally:
            server.stop()
    best = best_rate(steps, args.slo)
    header = (
        f"{'calls/s':>8} {'sent/s':>7} {'done/s':>7} {'tok/s':>8} {'TTFT p50/p99 (ms)':>18} {'e2e p50/p99 (s)':>16}"
    )
    print(f"{header} {'errors':>6}")
    for s in steps:
        ttft = f"{s.ttft_p50 * 1000:.0f}/{s.ttft_p99 * 1000:.0f}" if not math.isnan(s.ttft_p99) else "-"
        print(
            f"{s.rate:>8g} {s.offered_rate:>7.2f} {s.achieved_rate:>7.2f} {s.tokens_per_second:>8.1f} {ttft:>18} "
            f"{s.e2e_p50:>7.2f}/{s.e2e_p99:<8.2f} {s.errors:>6}"
        )
    print(
        f"\nhighest rate with TTFT p99 <= {args.slo:g} s and no errors: {best if best is not None else 'none'} calls/s"
    )
    document = {"meta": meta, "slo_seconds": args.slo, "best_rate": best, "steps": [asdict(s) for s in steps]}
    if args.output is not None:
        write_report(args.output, document, say=False)
        other = None
        if args.compare is not None:
            compared = json.loads(args.compare.read_text())
            fields = set(Step.__dataclass_fields__)
            name = str(compared.get("meta", {}).get("label") or args.compare.stem)
            other = (name, [Step(**{k: v for k, v in s.items() if k in fields}) for s in compared["steps"]])
        subject = args.openai_base_url or args.model.name
        picture = plot(steps, args.slo, args.output.with_suffix(".png"), f"open-loop sweep ({subject})", other)
        print(f"written to {args.output}" + (f" and {picture}" if picture else ""))
    return 0
