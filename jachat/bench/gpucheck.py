"""The body of scripts/gpu-check: everything a machine with an NVIDIA GPU should tell us, in one JSON report.

1. The environment: GPU, driver, CUDA device count, the compute types CTranslate2 offers there, where cuBLAS 12
   came from.
2. The device tests (tests/test_device.py with JACHAT_TEST_DEVICE=cuda): float16 and int8_float16 against float32
   greedy, streaming, cancellation, deadlines, and prompt scoring both ways (score_batch, and the forward pass whose
   distributions are copied from the device).
3. The benchmark on the bench model (rinna-shaped, 134M; with --full-size also rinna's own 3.6B shape, random
   weights): closed loops of 1, 16 and 64 streams on the default engine, the decode loop where the native decoder
   is built and passes its start-up self-test against stock CTranslate2 on the device (its parity check: the
   report keeps the line that says which engine ran, and why) and the same on static batches; replicas 1, 2 and 4
   of static batches under 64 streams; an open-loop sweep on the default engine.
4. One stream against the memory-bandwidth roofline (weights read once per token / the device's bandwidth), and
   the replicas and batch size that served best, as the recommended GPU defaults.

`--dry-run` runs the same steps on the CPU with a tiny model and short runs, so the script itself is tested
everywhere (tests/test_bench.py); its report says it was a dry run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from jachat.bench.clients import run_grpc
from jachat.bench.launcher import spawn
from jachat.bench.sweep import best_rate, over_grpc, sweep
from jachat.bench.workload import Workload

REPO = Path(__file__).resolve().parents[2]  # jachat/bench/ in a checkout: gpu-check runs from one
# memory bandwidth (bytes/s) of the GPUs this is meant for, by the name nvidia-smi gives
BANDWIDTH = {
    "H100 80GB HBM3": 3.35e12,
    "H100 PCIe": 2.0e12,
    "H100 NVL": 3.9e12,
    "H200": 4.8e12,
    "A100-SXM4-80GB": 2.04e12,
}


def nvidia_smi() -> dict[str, str] | None:
    if shutil.which("nvidia-smi") is None:
        return None
    fields = "name,driver_version,memory.total,memory.used,compute_cap"
    result = subprocess.run(
        ["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader"], capture_output=True, text=True, timeout=30
    )
    if result.returncode != 0 or not result.stdout.strip():
        return {"error": result.stderr.strip()[:500]}
    return dict(zip(fields.split(","), (v.strip() for v in result.stdout.splitlines()[0].split(",")), strict=False))


def environment(device: str) -> dict[str, Any]:
    import ctranslate2

    info: dict[str, Any] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "ctranslate2": ctranslate2.__version__,
        "cuda_devices": ctranslate2.get_cuda_device_count(),
        "nvidia_smi": nvidia_smi(),
        "LD_LIBRARY_PATH": os.environ.get("LD_LIBRARY_PATH", ""),
        "note": os.environ.get("JACHAT_GPU_CHECK_NOTE"),  # e.g. cuBLAS 13 standing in for 12: measurement only
    }
    if device == "cuda":
        from jachat.service.engine import gpu

        info["cublas_from"] = gpu.prepare(0, info["cuda_devices"])
    info["compute_types"] = sorted(ctranslate2.get_supported_compute_types(device))
    return info


def build_model(folder: Path, name: str, shape: Any, quantization: str) -> Path:
    from jachat.converter.convert import ConvertOptions, convert
    from jachat.converter.demo import build_demo_checkpoint

    output = folder / f"{name}-{quantization}"
    if not (output / "jachat-manifest.json").is_file():
        checkpoint = build_demo_checkpoint(folder / f"{name}-hf", shape)
        convert(ConvertOptions(str(checkpoint), output, quantization, force=True))
    return output


def run_tests(device: str) -> dict[str, Any]:
    env = {**os.environ, "JACHAT_TEST_DEVICE": device}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(REPO / "tests" / "test_device.py")]
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO, timeout=1800)
    lines = result.stdout.strip().splitlines()
    return {
        "passed": result.returncode == 0,
        "summary": lines[-1] if lines else result.stderr[-500:],
        "seconds": round(time.perf_counter() - started, 1),
        "output_tail": "\n".join(lines[-30:]) if result.returncode else "",
    }


def closed_loop(
    model: Path, device: str, workload: Workload, streams: int, requests: int, *serve: str
) -> dict[str, Any]:
    server = spawn(model, "--device", device, "--max-batch-size", str(max(16, streams)), *serve)
    try:
        report = asyncio.run(run_grpc(server.target, workload, streams, requests, label=f"{streams} streams"))
    finally:
        server.stop()
    row = asdict(report)
    row["serve_args"] = list(serve)
    row["engine"] = engine_line(server.log)
    return row


def engine_line(log: Sequence[str]) -> str | None:
    """What the server said of its engine: the native decoder's self-test and whether the loop runs."""
    return next((line.strip() for line in log if "native decoder:" in line), None)


def roofline(model: Path, gpu: dict[str, str] | None, tokens_per_second: float) -> dict[str, Any]:
    weights = (model / "model.bin").stat().st_size
    name = (gpu or {}).get("name", "")
    bandwidth = next((b for key, b in BANDWIDTH.items() if key in name), None)
    if bandwidth is None:
        return {"weights_bytes": weights, "device": name or None, "note": "bandwidth unknown for this device"}
    ceiling = bandwidth / weights  # tokens/s if every token read the weights once at full bandwidth
    return {
        "weights_bytes": weights,
        "device": name,
        "bandwidth_bytes_per_s": bandwidth,
        "roofline_tokens_per_s": ceiling,
        "one_stream_tokens_per_s": tokens_per_second,
        "fraction_of_roofline": tokens_per_second / ceiling,
        "target": 0.6,
    }


def check(args: argparse.Namespace) -> dict[str, Any]:
    from jachat.converter.demo import DemoShape

    device = "cpu" if args.dry_run else "cuda"
    folder = args.work
    folder.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "dry_run": args.dry_run,
        "device": device,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    report["environment"] = environment(device)
    report["tests"] = {"skipped": True} if args.skip_tests else run_tests(device)
    quantization = "int8" if args.dry_run else "int8_float16"
    shape = DemoShape() if args.dry_run else DemoShape(hidden_size=768, num_layers=12, num_heads=12)
    models = {"bench": build_model(folder, "bench", shape, quantization)}
    if args.full_size:
        models["rinna-3.6b-shape"] = build_model(folder, "full", DemoShape.full_size(), quantization)
    streams = (1, 4, 8) if args.dry_run else (1, 16, 64)
    replicas = (1, 2) if args.dry_run else (1, 2, 4)
    workload = Workload(tokens=8 if args.dry_run else 64)
    runs: dict[str, Any] = {}
    for name, model in models.items():
        loops = [
            closed_loop(model, device, workload, n, 2 * n if args.dry_run else 4 * n, "--decode-loop", "auto")
            for n in streams
        ]
        static = [
            closed_loop(model, device, workload, n, 2 * n if args.dry_run else 4 * n, "--decode-loop", "static")
            for n in streams[1:]
        ]
        busiest = streams[-1]
        requests = 2 * busiest if args.dry_run else 4 * busiest
        by_replicas = [
            closed_loop(model, device, workload, busiest, requests, "--decode-loop", "static", "--replicas", str(r))
            for r in replicas
        ]
        server = spawn(model, "--device", device, *args.serve_arg)
        try:
            rates = [2.0, 4.0] if args.dry_run else [4.0, 8.0, 16.0, 32.0, 64.0, 128.0]
            steps = sweep(over_grpc(server.target, workload, 2.0 if args.dry_run else 20.0), rates, args.slo, stop=True)
        finally:
            server.stop()
        best = max(by_replicas, key=lambda row: row["tokens_per_second"])
        runs[name] = {
            "model": str(model),
            "closed_loops": loops,
            "static_closed_loops": static,
            "replicas": by_replicas,
            "sweep": {
                "slo_seconds": args.slo,
                "best_rate": best_rate(steps, args.slo),
                "steps": [asdict(s) for s in steps],
            },
            "roofline": roofline(model, report["environment"]["nvidia_smi"], loops[0]["tokens_per_second"]),
            "recommended": {"static_replicas": int(best["serve_args"][-1]), "max_batch_size": max(16, busiest)},
        }
    report["runs"] = runs
    report["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/gpu-check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="on the CPU, tiny model, short runs (tests the script)")
    parser.add_argument("--full-size", action="store_true", help="also benchmark rinna's own 3.6B shape")
    parser.add_argument("--skip-tests", action="store_true", help="only the benchmark")
    parser.add_argument("--slo", type=float, default=1.0, help="the sweep's TTFT p99 target (s)")
    parser.add_argument("--serve-arg", action="append", default=[], help="extra jachat-serve argument for the sweep")
    parser.add_argument("--work", type=Path, default=REPO / "models" / "gpu-check", help="where the models go")
    parser.add_argument(
        "--output", "-o", type=Path, help="the JSON report (default docs/benchmarks/DATE-gpu-check.json)"
    )
    args = parser.parse_args(argv)
    output = args.output or REPO / "docs" / "benchmarks" / f"{time.strftime('%Y-%m-%d')}-gpu-check.json"
    report = check(args)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    tests = report["tests"]
    print(f"device tests: {tests.get('summary', 'skipped')}")
    for name, run in report["runs"].items():
        loops = ", ".join(
            f"{row['concurrency']} streams {row['tokens_per_second']:.0f} tok/s" for row in run["closed_loops"]
        )
        static = ", ".join(
            f"{row['concurrency']} streams {row['tokens_per_second']:.0f} tok/s" for row in run["static_closed_loops"]
        )
        print(f"{name}: {run['closed_loops'][0]['engine']}")
        print(f"{name}: decode loop {loops}; static batches {static}; sweep best {run['sweep']['best_rate']} calls/s")
    print(f"written to {output}")
    return 0 if tests.get("passed", True) else 1


if __name__ == "__main__":
    sys.exit(main())
