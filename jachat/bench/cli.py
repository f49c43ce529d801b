"""jachat-bench: load and compare. One workload, three ways of running it, measured in one run on one machine.

- `grpc`: N concurrent closed-loop GenerateStream clients (or a fixed arrival rate) against a running service.
- `ct2`: CTranslate2 driven directly on the same model, one sequence and N at once, each in the best configuration
  this machine allows (threads, replicas, parallel batches: probed, then measured).
- `hf`: the model card's Transformers code path on the Hugging Face checkpoint (float32, CPU), one at a time.
- `all`: starts jachat-serve on the model and runs the three, then prints the ratios side by side.
- `loop`: the decode loop against static batches and raw CTranslate2, with a workload of mixed options (decodeloop.py).
- `soak`: a fresh server under load for a long time: errors, health and memory (soak.py).
- `abuse`: a fresh server under worst-case requests: health, stream gaps, loop lag, refusals (abuse.py).
- `sweep`: a fresh server under open-loop Poisson arrivals at rising rates until it saturates: latency curves and
  the highest rate under the TTFT SLO (sweep.py); with --openai-base-url, any running OpenAI-compatible server.
- `warmstart`: a fresh server's first ten calls, with and without the warm start (warmstart.py).
- `regime`: the GPU regime on this CPU (a tiny model, one thread): the service's unary and streaming tokens/s
  against CTranslate2 with a trivial callback, side by side (regime.py).
- `gil`: decode throughput with and without a busy Python thread, CTranslate2 in this process or in the engine
  process (gil.py).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

from jachat.bench.baselines import run_ct2, run_hf
from jachat.bench.clients import run_grpc
from jachat.bench.reports import print_results
from jachat.bench.soak import soak_main
from jachat.bench.workload import Report, Workload


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jachat-bench", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "mode",
        choices=(
            *("grpc", "ct2", "hf", "all", "loop", "soak", "abuse", "fairness", "sweep", "warmstart", "regime"),
            "gil",
        ),
    )
    parser.add_argument("--target", default="localhost:50051", help="grpc: HOST:PORT of a running service")
    parser.add_argument("--model", type=Path, help="ct2/all: converted model folder")
    parser.add_argument("--checkpoint", type=Path, help="hf/all: the Hugging Face checkpoint it came from")
    parser.add_argument("--concurrency", "-c", type=int, default=16, help="streams (grpc) / batch size (ct2)")
    parser.add_argument("--requests", "-n", type=int, help="requests per run (default: 4 x concurrency)")
    parser.add_argument("--duration", type=float, help="grpc: run for this many seconds instead")
    parser.add_argument("--rate", type=float, help="grpc: open loop, Poisson arrivals per second")
    parser.add_argument("--tokens", type=int, default=Workload.tokens, help="output tokens per request (fixed)")
    parser.add_argument("--temperature", type=float, default=Workload.temperature)
    parser.add_argument("--top-k", type=int, default=Workload.top_k)
    parser.add_argument("--repetition-penalty", type=float, default=Workload.repetition_penalty)
    parser.add_argument("--hf-requests", type=int, default=4, help="all: requests for the transformers run")
    parser.add_argument("--serve-arg", action="append", default=[], help="all: extra jachat-serve argument")
    parser.add_argument(
        "--cancel-fraction", type=float, default=0.0, help="grpc/soak: cancel this fraction of calls at a random point"
    )
    parser.add_argument("--warmup", type=float, default=60.0, help="soak: seconds before memory growth is counted")
    parser.add_argument("--clients", type=int, default=4, help="abuse: clients sending worst-case requests")
    parser.add_argument("--flood", type=int, default=48, help="fairness: calls of the flooding tenant (or priority)")
    parser.add_argument("--few", type=int, default=4, help="fairness: calls of the light tenant (or interactive)")
    parser.add_argument(
        "--promotion", type=float, default=2.0, help="fairness: the server's --batch-promotion-seconds (aging)"
    )
    parser.add_argument("--rates", help="sweep: offered calls/s, comma-separated (default: rising until saturation)")
    parser.add_argument("--start-rate", type=float, default=1.0, help="sweep: the first rate (calls/s)")
    parser.add_argument("--rate-factor", type=float, default=1.5, help="sweep: each rate is the last times this")
    parser.add_argument("--step-duration", type=float, default=20.0, help="sweep: seconds of arrivals per rate")
    parser.add_argument("--slo", type=float, default=1.0, help="sweep: the TTFT p99 target (s)")
    parser.add_argument(
        "--openai-base-url", help="sweep: measure this running OpenAI-compatible server (URL ending in /v1) instead"
    )
    parser.add_argument("--openai-model", help="sweep: the model name to ask for (default: the first of /v1/models)")
    parser.add_argument(
        "--openai-extra", help="sweep: JSON fields added to every request, e.g. '{\"ignore_eos\": true}'"
    )
    parser.add_argument("--compare", type=Path, help="sweep: another sweep's JSON report, drawn beside this one")
    parser.add_argument("--output", "-o", type=Path, help="write the JSON report here")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    workload = Workload(
        tokens=args.tokens, temperature=args.temperature, top_k=args.top_k, repetition_penalty=args.repetition_penalty
    )
    n = args.concurrency
    requests = args.requests or 4 * n
    reports: dict[str, Report] = {}
    meta = {"argv": sys.argv, "workload": asdict(workload), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    need = {
        "ct2": ["model"],
        "hf": ["checkpoint"],
        "all": ["model", "checkpoint"],
        "loop": ["model"],
        "soak": ["model", "duration"],
        "abuse": ["model"],
        "fairness": ["model"],
        "sweep": [] if args.openai_base_url else ["model"],
        "warmstart": ["model"],
        "regime": ["model"],
        "gil": ["model"],
    }
    for name in need.get(args.mode, []):
        if getattr(args, name) is None:
            build_parser().error(f"{args.mode} needs --{name}")
    if args.mode == "soak":
        return soak_main(args, workload, meta)
    if args.mode == "sweep":
        from jachat.bench.sweep import sweep_main

        return sweep_main(args, workload, meta)
    if args.mode == "regime":
        from jachat.bench.regime import regime_main

        return regime_main(args.model, n, args.requests or 8, args.tokens, args.serve_arg, args.output)
    if args.mode == "loop":
        from jachat.bench.decodeloop import loop_main

        return loop_main(args.model, workload, n, requests, args.serve_arg, args.output, meta)
    if args.mode == "gil":
        from jachat.bench.gil import gil_main

        return gil_main(args.model, n, args.requests or 8, args.tokens, args.output)
    if args.mode == "warmstart":
        from jachat.bench.warmstart import warmstart_main

        return warmstart_main(args.model, args.serve_arg, args.output, meta)
    if args.mode == "fairness":
        from jachat.bench.fairness import fairness_main

        return fairness_main(
            args.model, args.flood, args.few, args.tokens, args.serve_arg, args.output, meta, args.promotion
        )
    if args.mode == "abuse":
        from jachat.bench.abuse import abuse_main

        return abuse_main(args.model, args.duration or 20.0, args.clients, args.serve_arg, args.output, meta)
    runners: list[tuple[str, Callable[[], Report]]] = []
    if args.mode == "grpc":
        runners.append(
            (
                "service_n",
                lambda: asyncio.run(run_grpc(args.target, workload, n, args.requests, args.duration, args.rate)),
            )
        )
    if args.mode in ("ct2", "all"):
        runners += [
            ("ct2_1", lambda: run_ct2(args.model, workload, 1, max(4, requests // n))),
            ("ct2_n", lambda: run_ct2(args.model, workload, n, max(2, requests // n))),
        ]
    if args.mode in ("hf", "all"):
        runners.append(("hf", lambda: run_hf(args.checkpoint, workload, args.hf_requests)))
    server = None
    if args.mode == "all":
        from jachat.bench.launcher import spawn

        server = spawn(args.model, "--device", "cpu", "--max-batch-size", str(max(n, 16)), *args.serve_arg)
        target = server.target
        runners[0:0] = [
            ("service_1", lambda: asyncio.run(run_grpc(target, workload, 1, max(4, requests // n)))),
            ("service_n", lambda: asyncio.run(run_grpc(target, workload, n, requests))),
        ]
        meta["server"] = [str(a) for a in server.process.args]  # type: ignore[union-attr]
    try:
        for key, runner in runners:
            reports[key] = runner()
            if key == "service_n" and server is not None:
                server.stop()
                server = None  # the other runs get the machine to themselves
    finally:
        if server is not None:
            server.stop()
    return print_results(reports, n, args.output, meta)
