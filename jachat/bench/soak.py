"""jachat-bench soak: a fresh server under closed-loop load with cancellations, its memory and health watched."""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import grpc

from jachat.bench.clients import run_grpc
from jachat.bench.processes import tree_rss_bytes
from jachat.bench.reports import write_report
from jachat.bench.workload import Workload


async def run_soak(
    model: Path,
    workload: Workload,
    concurrency: int,
    duration: float,
    warmup: float,
    cancel_fraction: float,
    serve_args: Sequence[str] = (),
) -> dict[str, Any]:
    """Load a fresh jachat-serve for `duration` seconds with cancellations, watching its memory (the server
    process's and the engine process's together) and health."""
    from grpc_health.v1 import health_pb2

    from jachat.bench.launcher import health_stub, spawn

    server = spawn(model, *serve_args)
    samples: list[tuple[float, int]] = []
    health_failures: list[str] = []
    try:
        started = time.monotonic()

        async def watch() -> None:
            async with grpc.aio.insecure_channel(server.target) as channel:
                health = health_stub(channel)
                while True:
                    samples.append((time.monotonic() - started, tree_rss_bytes(server.process.pid)))
                    try:
                        reply = await health.Check(
                            health_pb2.HealthCheckRequest(service="jachat.v1.ChatService"), timeout=1
                        )
                        if reply.status != health_pb2.HealthCheckResponse.SERVING:
                            health_failures.append(f"{time.monotonic() - started:.0f}s: {reply.status}")
                    except grpc.aio.AioRpcError as exc:
                        health_failures.append(f"{time.monotonic() - started:.0f}s: {exc.code().name}")
                    await asyncio.sleep(1.0)

        watcher = asyncio.ensure_future(watch())
        report = await run_grpc(
            server.target, workload, concurrency, duration=duration, label="soak", cancel_fraction=cancel_fraction
        )
        watcher.cancel()
    finally:
        exit_code = server.stop()
    after_warmup = [rss for t, rss in samples if t >= warmup] or [rss for _, rss in samples]
    fifth = max(1, len(after_warmup) // 5)  # compare means of the first and last fifths: single samples are noisy
    baseline = sum(after_warmup[:fifth]) / fifth
    end = sum(after_warmup[-fifth:]) / fifth
    peak_after = max(after_warmup)
    return {
        "report": asdict(report),
        "rss_at_warmup_bytes": baseline,  # mean over the first fifth after warm-up
        "rss_end_bytes": end,  # mean over the last fifth
        "rss_peak_after_warmup_bytes": peak_after,
        "rss_growth": (end - baseline) / baseline,
        "health_failures": health_failures,
        "server_exit_code": exit_code,
        "rss_samples": samples[:: max(1, len(samples) // 200)],
    }


def soak_main(args: argparse.Namespace, workload: Workload, meta: dict[str, Any]) -> int:
    """Soak: zero unexpected errors, memory growth under 5% after warm-up, health SERVING throughout."""
    result = asyncio.run(
        run_soak(
            args.model,
            workload,
            args.concurrency,
            args.duration,
            args.warmup,
            args.cancel_fraction,
            ["--device", "cpu", *args.serve_arg],
        )
    )
    report = result["report"]
    checks = [
        ("unexpected errors", sum(report["errors"].values()), 0, sum(report["errors"].values()) == 0),
        ("memory growth after warm-up (%)", 100 * result["rss_growth"], 5.0, result["rss_growth"] < 0.05),
        ("health checks not SERVING", len(result["health_failures"]), 0, not result["health_failures"]),
        ("server exit code", result["server_exit_code"], 0, result["server_exit_code"] == 0),
    ]
    print(
        f"soak: {report['requests']} calls in {report['seconds']:.0f} s, {report['cancelled']} cancelled on purpose,"
        f" {report['tokens_per_second']:.1f} tokens/s; RSS (server and engine processes)"
        f" {result['rss_at_warmup_bytes'] / 2**20:.1f} MiB after warm-up, {result['rss_end_bytes'] / 2**20:.1f} MiB at"
        " the end"
    )
    for what, value, target, met in checks:
        print(
            f"{what:<40} {value:10.2f}  target {'<' if 'growth' in what else '=='} {target:<5} "
            f"{'met' if met else 'NOT MET'}"
        )
    if args.output is not None:
        document = {
            "meta": meta,
            "soak": result,
            "checks": [{"what": w, "value": v, "target": t, "met": m} for w, v, t, m in checks],
        }
        write_report(args.output, document)
    return 0 if all(m for *_, m in checks) else 1
