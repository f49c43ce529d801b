"""A short soak (the README records the 10-minute one): 16 streams, 20% cancelled at random points."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest


@pytest.mark.slow
def test_short_soak_has_no_unexpected_errors_and_stays_serving(model_f32: Path, tmp_path: Path) -> None:
    output = tmp_path / "soak.json"
    result = subprocess.run(
        [
            "jachat-bench",
            "soak",
            "--model",
            str(model_f32),
            "--duration",
            "40",
            "--warmup",
            "10",
            "-c",
            "16",
            "--tokens",
            "48",
            "--cancel-fraction",
            "0.2",
            "-o",
            str(output),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    soak = json.loads(output.read_text())["soak"]
    report = soak["report"]
    assert report["errors"] == {}, report["errors"]
    assert soak["health_failures"] == [] and soak["server_exit_code"] == 0
    assert report["requests"] > 100 and 0.1 < report["cancelled"] / report["requests"] < 0.3
    # a guard against gross leaks only: resident memory oscillates and native allocators warm up for ~10 minutes under
    # this load; the 5% criterion is judged on the 30-minute soak (README, "Security and reliability")
    assert soak["rss_growth"] < 0.20, soak["rss_samples"]
    assert result.returncode in (0, 1), result.stdout  # 1: the strict 5% memory check missed (printed)
