"""jachat-bench runs every mode on the demo model and writes a complete report (figures are not asserted)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO
from tests.servers import InProcessServer


@pytest.mark.slow
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
    assert "service 4 streams / ctranslate2 best for 4" in result.stdout
    # the baseline names the layout it found best (replicas x threads, one batch per replica)
    assert reports["ct2_n"]["name"].startswith("ctranslate2 best: ")


@pytest.mark.slow
def test_bench_loop_compares_both_engines_the_loop_alone_and_raw_ctranslate2_with_memory(
    model_f32: Path, tmp_path: Path
) -> None:
    output = tmp_path / "loop.json"
    command = ["jachat-bench", "loop", "--model", str(model_f32), "-c", "4", "-n", "8", "--tokens", "6"]
    result = subprocess.run([*command, "-o", str(output)], capture_output=True, text=True, timeout=600)
    assert result.returncode in (0, 1), result.stderr  # 1: a target was missed (printed, not an error)
    report = json.loads(output.read_text())
    reports = report["reports"]
    assert set(reports) == {"static_1", "static_n", "loop_1", "loop_n", "loop_mixed_n", "alone_n", "ct2_1", "ct2_n"}
    for key in ("static_n", "loop_n", "loop_mixed_n", "alone_n", "ct2_n"):
        assert reports[key]["errors"] == {} and reports[key]["output_tokens"] == 6 * 8, key
    assert reports["loop_n"]["ttft_after_opening"]["p99"] > 0  # the 4 calls after the opening burst of 4
    memory = report["meta"]["memory"]
    assert set(memory) == {"static", "loop", "flood"} and all(m["errors"] == 0 for m in memory.values())
    assert all(m["peak_mib"] >= m["idle_mib"] > 0 for m in memory.values())
    said = {t["what"] for t in report["targets"]} | {t["what"] for t in report["meta"]["memory_targets"]}
    assert "loop alone, 4 rows / ctranslate2 best for 4" in said and "loop RSS peak at 4 rows x 512 / static's" in said


def test_bench_counts_errors_by_status_code(server: InProcessServer, tmp_path: Path) -> None:
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


@pytest.mark.slow
def test_bench_abuse_reports_every_figure_and_the_expected_outcomes(model_f32: Path, tmp_path: Path) -> None:
    """The mode runs end to end; its figures are printed and recorded, not asserted (they depend on the machine)."""
    output = tmp_path / "abuse.json"
    result = subprocess.run(
        ["jachat-bench", "abuse", "--model", str(model_f32), "--duration", "3", "--clients", "2", "-o", str(output)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode in (0, 1), result.stderr
    document = json.loads(output.read_text())
    abuse = document["abuse"]
    for key in ("health_p50_ms", "health_p99_ms", "health_max_ms", "stream_worst_gap_ms", "refusal_max_ms"):
        assert abuse[key] > 0, key
    assert abuse["health_checks"] > 10 and abuse["stream_gaps"] > 10 and abuse["event_loop_lag"]["samples"] > 10
    outcomes = abuse["abuse_outcomes"]
    for name in ("generate_4mb", "generate_4mb_drop", "tokenize_4mb", "generate_256_turns_drop"):  # over the budget
        assert set(outcomes[name]) <= {"INVALID_ARGUMENT"}, outcomes
    for name in ("generate_budget_drop", "tokenize_budget"):  # the heaviest that pass are served
        assert set(outcomes[name]) <= {"OK"}, outcomes
    assert all(set(codes) == {"RESOURCE_EXHAUSTED"} for codes in abuse["refusal_codes"].values())
    assert abuse["server_exit_code"] == 0
    # the HTTP phase: connections held, compressed bodies refused past the limit, unread streams hung up on
    assert abuse["http_health_checks"] > 10 and abuse["http_connections_held"] > 0
    answers = abuse["http_answers"]
    assert set(answers["gzip_bomb"]) == {"413"} and set(answers["gzip_to_health"]) == {"200"}, answers
    assert set(answers["unread_stream"]) <= {"200", "closed"}, answers  # a stream began (and was reset, unread)
    # the Score/echo phase: the heaviest calls were answered (or refused while the small queue was full), and the
    # engine's memory was sampled throughout
    scoring = abuse["scoring_outcomes"]
    assert set(scoring["score_16"]) <= {"OK", "RESOURCE_EXHAUSTED"} and set(scoring["echo_16"]) <= {"200", "429"}
    assert "OK" in scoring["score_16"] or "200" in scoring["echo_16"], scoring
    assert abuse["scoring_health_checks"] > 10 and not abuse["scoring_health_failures"]
    assert abuse["scoring_engine_rss_peak_mib"] >= abuse["scoring_engine_rss_idle_mib"] > 0
    assert [c["what"] for c in document["checks"]][:9] == [
        "health check p99",
        "health check max",
        "normal stream's worst gap",
        "HTTP abuse: health check p99",
        "HTTP abuse: health check max",
        "HTTP abuse: stream's worst gap",
        "full server refuses (max)",
        "Score/echo: health check p99",
        "Score/echo: engine RSS above idle (MiB)",
    ]


def test_the_open_loop_keeps_at_most_the_concurrency_in_flight(server: InProcessServer) -> None:
    """--rate: Poisson arrivals, but never more than -c calls in flight (it once waited on the bound and let go)."""
    import asyncio

    from jachat.bench.clients import run_grpc
    from jachat.bench.workload import Workload

    workload = Workload(tokens=24, temperature=0.0)
    report = asyncio.run(run_grpc(server.target, workload, concurrency=2, requests=12, rate=1000.0))
    assert report.requests == 12 and report.errors == {}
    assert report.max_in_flight == 2  # arrivals every millisecond, calls of tens: the bound is what holds them


def test_bench_fairness_reports_both_floods(model_f32: Path, tmp_path: Path) -> None:
    output = tmp_path / "fairness.json"
    command = ["jachat-bench", "fairness", "--model", str(model_f32), "--flood", "6", "--few", "2", "--tokens", "8"]
    command += ["--promotion", "0.5"]
    result = subprocess.run([*command, "-o", str(output)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    report = json.loads(output.read_text())["fairness"]
    for scenario in ("tenants", "priorities"):
        figures = report[scenario]
        assert set(figures) == {
            "light_alone_ttft_p50_s",
            "light_under_flood_ttft_p50_s",
            "light_under_flood_ttft_max_s",
            "flood_ttft_p50_s",
            "flood_ttft_max_s",
        }
        assert all(value > 0 for value in figures.values())
    assert "tenant B under tenant A's flood" in result.stdout and "interactive under a batch flood" in result.stdout
    starved = report["starvation"]  # the batch call got its first token while the interactive load went on
    assert starved["promotion_s"] == 0.5 and starved["batch_ttft_s"] > 0 and starved["interactive_calls"] > 6
    assert "a batch call under interactive load" in result.stdout


@pytest.mark.slow
def test_bench_sweep_reports_each_rate_the_best_under_the_slo_and_a_plot(model_f32: Path, tmp_path: Path) -> None:
    output = tmp_path / "sweep.json"
    command = ["jachat-bench", "sweep", "--model", str(model_f32), "--rates", "2,4", "--step-duration", "2"]
    result = subprocess.run(
        [*command, "--tokens", "4", "--slo", "1", "-o", str(output)], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(output.read_text())
    steps = report["steps"]
    assert [s["rate"] for s in steps] == [2.0, 4.0]  # explicit rates all run
    for step in steps:
        assert step["requests"] > 0 and step["errors"] == 0 and step["tokens_per_second"] > 0
        assert 0 < step["ttft_p50"] <= step["ttft_p99"] and step["e2e_p50"] <= step["e2e_p99"]
    within = [s["rate"] for s in steps if s["errors"] == 0 and s["ttft_p99"] <= report["slo_seconds"]]
    assert report["best_rate"] == (max(within) if within else None)
    assert "highest rate with TTFT p99 <= 1 s" in result.stdout
    assert output.with_suffix(".png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_bench_sweep_measures_any_openai_server_with_the_same_schedule_and_draws_a_comparison(
    model_f32: Path, tmp_path: Path
) -> None:
    """--openai-base-url: the sweep's own schedule, prompts and token count against an OpenAI-compatible server
    (jachat's HTTP API here); --compare draws another report's curves beside it."""
    from tests.servers import serving

    first, second = tmp_path / "openai.json", tmp_path / "compared.json"
    with serving(model_f32, "--http-port", "0") as server:
        base = f"http://127.0.0.1:{server.http_port}/v1"
        command = ["jachat-bench", "sweep", "--openai-base-url", base, "--rates", "3", "--step-duration", "2"]
        for output, more in ((first, []), (second, ["--compare", str(first)])):
            result = subprocess.run(
                [*command, "--tokens", "4", "-o", str(output), *more], capture_output=True, text=True, timeout=600
            )
            assert result.returncode == 0, result.stdout + result.stderr
    (step,) = json.loads(first.read_text())["steps"]
    assert step["requests"] == 6 and step["errors"] == 0  # exactly rate x duration calls, all answered
    assert abs(step["offered_rate"] - 3.0) <= 0.3 and step["tokens_per_second"] > 0
    assert json.loads(first.read_text())["meta"]["server"]["openai_base_url"] == base
    assert second.with_suffix(".png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_bench_warmstart_times_the_first_calls_with_and_without_the_warm_start(model_f32: Path, tmp_path: Path) -> None:
    output = tmp_path / "warmstart.json"
    result = subprocess.run(
        ["jachat-bench", "warmstart", "--model", str(model_f32), "-o", str(output)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    warm, cold = json.loads(output.read_text())["runs"]
    assert warm["warm_up"] and warm["warm_up_seconds"] is not None and warm["warm_up_seconds"] >= 0
    assert not cold["warm_up"] and cold["warm_up_seconds"] is None
    for run in (warm, cold):
        assert len(run["call_seconds"]) == 10 and all(s > 0 for s in run["call_seconds"])
        assert run["first_over_tenth"] == run["call_seconds"][0] / run["call_seconds"][-1]


def test_bench_regime_compares_the_service_with_the_floor_in_one_run(model_f32: Path, tmp_path: Path) -> None:
    output = tmp_path / "regime.json"
    command = ["jachat-bench", "regime", "--model", str(model_f32), "-c", "4", "-n", "2", "--tokens", "8"]
    result = subprocess.run([*command, "-o", str(output)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    figures = json.loads(output.read_text())["figures"]
    floor = figures["ctranslate2_trivial_callback"]
    assert floor == (figures["ctranslate2_trivial_callback_before"] + figures["ctranslate2_trivial_callback_after"]) / 2
    assert figures["unary_ratio"] == figures["service_unary"] / floor > 0
    assert figures["streaming_ratio"] == figures["service_streaming"] / floor > 0
    for run in ("unary", "streaming"):
        assert set(figures[f"{run}_cpu_microseconds_per_token"]) == {"server", "engine"}
    assert figures["errors"] == {}
    assert "service, GenerateStream" in result.stdout and "CPU per token, streaming: server" in result.stdout


def test_bench_gil_runs_the_engine_in_and_out_of_process_with_and_without_a_busy_thread(
    model_f32: Path, tmp_path: Path
) -> None:
    output = tmp_path / "gil.json"
    command = ["jachat-bench", "gil", "--model", str(model_f32), "-c", "4", "-n", "2", "--tokens", "8"]
    result = subprocess.run([*command, "-o", str(output)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    speeds = json.loads(output.read_text())["tokens_per_second"]
    runs = {"in_process", "in_process_busy", "engine_process", "engine_process_busy"}
    assert set(speeds) == runs and all(speeds[run] > 0 for run in runs)
    assert "in the engine process" in result.stdout


@pytest.mark.slow
def test_gpu_check_runs_end_to_end_in_dry_mode(tmp_path: Path) -> None:
    """scripts/gpu-check --dry-run: every step of the GPU check (environment, device tests, closed loops, replicas,
    sweep, roofline, recommendation) on the CPU with a tiny model, into one report."""
    output = tmp_path / "gpu-check.json"
    env = {**os.environ, "PYTHON": sys.executable}
    command = [str(REPO / "scripts" / "gpu-check"), "--dry-run", "--work", str(tmp_path / "work"), "-o", str(output)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(output.read_text())
    assert report["dry_run"] is True and report["device"] == "cpu"
    assert report["environment"]["compute_types"] and report["environment"]["ctranslate2"]
    assert report["tests"]["passed"] is True and "passed" in report["tests"]["summary"]
    bench = report["runs"]["bench"]
    assert [row["concurrency"] for row in bench["closed_loops"]] == [1, 4, 8]
    assert [row["concurrency"] for row in bench["static_closed_loops"]] == [4, 8]
    for row in bench["closed_loops"] + bench["static_closed_loops"]:
        assert row["errors"] == {} and row["tokens_per_second"] > 0
    assert all("self-test passed" in row["engine"] for row in bench["closed_loops"])  # the loop ran, checked
    assert [row["serve_args"][-1] for row in bench["replicas"]] == ["1", "2"]
    assert bench["sweep"]["steps"] and bench["roofline"]["weights_bytes"] > 0
    fastest = max(bench["replicas"], key=lambda row: row["tokens_per_second"])
    assert bench["recommended"]["static_replicas"] == int(fastest["serve_args"][-1])
    assert f"written to {output}" in result.stdout
