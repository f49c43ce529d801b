"""`jachat-bench warmstart`: is the first call after start-up as fast as the tenth? A fresh server answers ten
identical calls one after another, with the warm start and without it; the report gives each call's latency, the
first over the median of calls 2-10, and how long the warm start took (from the server's log)."""

from __future__ import annotations

import re
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc

from jachat.bench.launcher import spawn
from jachat.bench.reports import write_report
from jachat.v1 import chat_pb2, chat_pb2_grpc

CALLS = 10


def first_calls(model: Path, serve_args: Sequence[str], warm: bool) -> dict[str, Any]:
    # the static engine's warm start: the decode loop has none (its start-up self-test runs the decoder instead)
    server = spawn(model, "--device", "cpu", "--decode-loop", "static", "--warm-up", str(warm).lower(), *serve_args)
    try:
        seconds: list[float] = []
        with grpc.insecure_channel(server.target) as channel:
            # the connection is made before the clock starts: what is timed is the server, not the client's connect
            grpc.channel_ready_future(channel).result(timeout=30)
            stub = chat_pb2_grpc.ChatServiceStub(channel)
            turns = [chat_pb2.Turn(speaker=chat_pb2.SPEAKER_USER, text="日本の首都はどこですか?")]
            sampling = chat_pb2.SamplingParams(max_new_tokens=16, min_new_tokens=16)
            for _ in range(CALLS):
                started = time.perf_counter()
                stub.Generate(chat_pb2.GenerateRequest(turns=turns, sampling=sampling), timeout=120)
                seconds.append(time.perf_counter() - started)
        log = "".join(server.log)
    finally:
        server.stop()
    found = re.search(r"warm start: .* in ([0-9.]+) s", log)
    rest = statistics.median(seconds[1:])
    return {
        "warm_up": warm,
        "warm_up_seconds": float(found.group(1)) if found else None,
        "call_seconds": seconds,
        "first_over_median_of_rest": seconds[0] / rest,
        "first_over_tenth": seconds[0] / seconds[-1],
    }


def warmstart_main(model: Path, serve_args: Sequence[str], output: Path | None, meta: dict[str, Any]) -> int:
    runs = [first_calls(model, serve_args, warm) for warm in (True, False)]
    for run in runs:
        calls = " ".join(f"{s * 1000:.0f}" for s in run["call_seconds"])
        took = f"warm start {run['warm_up_seconds']:.2f} s" if run["warm_up_seconds"] is not None else "no warm start"
        print(
            f"{took:<22} first/median(2-10) {run['first_over_median_of_rest']:.2f}  first/tenth "
            f"{run['first_over_tenth']:.2f}  calls (ms): {calls}"
        )
    if output is not None:
        write_report(output, {"meta": meta, "runs": runs})
    return 0
