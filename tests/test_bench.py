"""jachat-bench runs every mode on the demo model and writes a complete report (figures are not asserted)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path


def test_bench_all_modes_write_a_report(model_f32: Path, demo_checkpoint: Path, tmp_path: Path) -> None:
    output = tmp_path / "bench.json"
    result = subprocess.run(
        [
            "jachat-bench",
            "all",
            "--model",
            str(model_f32),
            "--checkpoint",
            str(demo_checkpoint),
            "-c",
            "4",
            "-n",
            "8",
            "--tokens",
            "6",
            "--hf-requests",
            "1",
            "-o",
            str(output),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode in (0, 1), result.stderr  # 1: a target was missed (printed, not an error)
    report = json.loads(output.read_text())
    reports = report["reports"]
    assert set(reports) == {"service_1", "service_n", "ct2_1", "ct2_n", "hf"}
    for key, expected_requests in (("service_n", 8), ("ct2_n", 8), ("hf", 1)):
        r = reports[key]
        assert r["errors"] == {} and r["requests"] == expected_requests
        assert r["output_tokens"] == 6 * expected_requests  # min_new_tokens = max_new_tokens
        assert r["tokens_per_second"] > 0 and 0 < r["ttft"]["p50"] <= r["e2e"]["p99"]
    assert {t["what"] for t in report["targets"]} >= {"errors at 4 streams"}
    assert "service 4 streams / ctranslate2 batch of 4" in result.stdout


def test_bench_counts_errors_by_status_code(server: object, tmp_path: Path) -> None:
    from service.launcher import ServerProcess

    assert isinstance(server, ServerProcess)
    output = tmp_path / "errors.json"
    # 4000 tokens do not fit the 2048-token context: every request is INVALID_ARGUMENT
    result = subprocess.run(
        [
            "jachat-bench",
            "grpc",
            "--target",
            server.target,
            "-c",
            "2",
            "-n",
            "4",
            "--tokens",
            "4000",
            "-o",
            str(output),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    report = json.loads(output.read_text())["reports"]["service_n"]
    assert report["errors"] == {"INVALID_ARGUMENT": 4}, result.stderr
