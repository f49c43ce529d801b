"""jachat-bench loop: the decode loop against static batches and raw CTranslate2, in one run on one machine.

The same closed-loop workload (`jachat-bench all`'s: 1 stream, then N) runs against jachat-serve with
`--decode-loop static`, then with `--decode-loop native`, where a mixed workload (four kinds of sampling options,
workload.MixedWorkload) follows it; then CTranslate2 alone in its best static configuration. Each server has the
machine to itself while it is measured. The ratios are the decode-loop issue's targets (targets.py).

Then the loop alone in this process (inprocess.py: no server, no client beside it, as raw CTranslate2 runs), and
memory (memory.py): each engine's resident set while N rows of LONG_ROW positions run at once (greedy, one
prompt, so static batches share one batch), and a flood of FLOOD_CALLS prompts of FLOOD_PROMPT tokens against a loop
server whose KV budget holds 3 of them (`--kv-cache-tokens`): the rest must wait, none fail.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
from pathlib import Path
from typing import Any

from jachat.bench import memory
from jachat.bench.baselines import run_ct2
from jachat.bench.clients import run_grpc
from jachat.bench.inprocess import run_loop_alone
from jachat.bench.launcher import spawn
from jachat.bench.reports import print_results
from jachat.bench.workload import MixedWorkload, Report, Workload

LONG_ROW = 512  # positions per row in the memory phase: prompt and reply
FLOOD_BUDGET = 4096  # the KV budget (positions) of the flood phase's server: 3 of its rows fit at once
FLOOD_PROMPT = 1000
FLOOD_CALLS = 12


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
    memories: dict[str, memory.MemoryRun] = {}
    alone = max(4, requests // n)
    long_text = memory.long_text(model, LONG_ROW - workload.tokens)
    for name, flag in (("static", "static"), ("loop", "native")):
        flags = ("--device", "cpu", "--max-batch-size", str(max(n, 16)), "--decode-loop", flag)
        server = spawn(model, *flags, *serve_args)
        try:
            label = f"{name}, {n} rows of {LONG_ROW}"
            memories[name] = memory.measure(server, label, long_text, n, workload.tokens, LONG_ROW)
            target = server.target
            reports[f"{name}_1"] = asyncio.run(run_grpc(target, workload, 1, alone, label=f"{name}, 1 stream"))
            reports[f"{name}_n"] = asyncio.run(run_grpc(target, workload, n, requests, label=f"{name}, {n} streams"))
            if name == "loop":
                mixed = MixedWorkload(**dataclasses.asdict(workload))
                label = f"loop, {n} streams, 4 kinds of options"
                reports["loop_mixed_n"] = asyncio.run(run_grpc(target, mixed, n, requests, label=label))
        finally:
            server.stop()
    flood = spawn(model, "--device", "cpu", "--decode-loop", "native", "--kv-cache-tokens", str(FLOOD_BUDGET))
    try:
        said = re.search(r"a KV cache of \d+ positions \((\d+) MiB\)", "".join(flood.log))
        budget_mib = float(said.group(1)) if said else float("nan")
        text = memory.long_text(model, FLOOD_PROMPT)
        label = f"loop, {FLOOD_CALLS} prompts of {FLOOD_PROMPT} over a {FLOOD_BUDGET}-position budget"
        positions = FLOOD_PROMPT + workload.tokens
        memories["flood"] = memory.measure(flood, label, text, FLOOD_CALLS, workload.tokens, positions)
    finally:
        flood.stop()
    from jachat.service.engine.core import cpu_cores

    reports["alone_n"] = run_loop_alone(model, workload, n, requests, cpu_cores())
    reports["ct2_1"] = run_ct2(model, workload, 1, alone)
    reports["ct2_n"] = run_ct2(model, workload, n, max(2, requests // n))
    meta["serve_args"] = serve_args
    meta["memory"] = {k: dataclasses.asdict(v) for k, v in memories.items()}
    for run in memories.values():
        print(f"{run.name}: engine RSS {run.idle_mib:.0f} MiB idle, {run.peak_mib:.0f} MiB at peak, "
              f"{run.errors} failed, {run.seconds:.1f} s")  # fmt: skip
    rows = memory.targets(memories, budget_mib)
    meta["memory_targets"] = [{"what": w, "value": v, "target": t, "floor": f, "met": m} for w, v, t, f, m in rows]
    for what, value, limit, floor, met in rows:
        print(f"{what:<66} {value:8.2f}  target {'>=' if floor else '<='} {limit:<5} {'met' if met else 'NOT MET'}")
    code = print_results(reports, n, output, meta)
    return code if all(row[-1] for row in rows) else 1
