"""jachat-bench loop: the decode loop against static batches and raw CTranslate2, in one run on one machine.

The same closed-loop workload (`jachat-bench all`'s: 1 stream, then N) runs against jachat-serve with
`--decode-loop static`, then with `--decode-loop native`, where a mixed workload (four kinds of sampling options,
workload.MixedWorkload) follows it; then CTranslate2 alone in its best static configuration. Each server has the
machine to itself while it is measured. The ratios are the decode-loop issue's targets (targets.py).
"""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path
from typing import Any

from jachat.bench.baselines import run_ct2
from jachat.bench.clients import run_grpc
from jachat.bench.launcher import spawn
from jachat.bench.reports import print_results
from jachat.bench.workload import MixedWorkload, Report, Workload


def loop_main(
    model: Path,
    workload: Workload,
    n: int,
    requests: int,
    serve_args: list[str],
    output: Path | None,
    meta: dict[str, Any],
) -> int:
    reports: dict[str, Report] = {}
    alone = max(4, requests // n)
    for name, flag in (("static", "static"), ("loop", "native")):
        flags = ("--device", "cpu", "--max-batch-size", str(max(n, 16)), "--decode-loop", flag)
        server = spawn(model, *flags, *serve_args)
        try:
            target = server.target
            reports[f"{name}_1"] = asyncio.run(run_grpc(target, workload, 1, alone, label=f"{name}, 1 stream"))
            reports[f"{name}_n"] = asyncio.run(run_grpc(target, workload, n, requests, label=f"{name}, {n} streams"))
            if name == "loop":
                mixed = MixedWorkload(**dataclasses.asdict(workload))
                label = f"loop, {n} streams, 4 kinds of options"
                reports["loop_mixed_n"] = asyncio.run(run_grpc(target, mixed, n, requests, label=label))
        finally:
            server.stop()
    reports["ct2_1"] = run_ct2(model, workload, 1, alone)
    reports["ct2_n"] = run_ct2(model, workload, n, max(2, requests // n))
    meta["serve_args"] = serve_args
    return print_results(reports, n, output, meta)
