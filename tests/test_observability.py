"""Metrics, dashboard, alert rules and logs, checked against the running service."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from jachat.v1 import chat_pb2
from tests.helpers import REPO, greedy, user, wait_until
from tests.servers import Server, ServerProcess, serving

DASHBOARD = REPO / "deploy" / "grafana" / "jachat-dashboard.json"
ALERTS = REPO / "deploy" / "prometheus" / "jachat-alerts.yaml"
ALERT_TESTS = REPO / "deploy" / "prometheus" / "jachat-alerts.test.yaml"
PROMTOOL = shutil.which("promtool")


@pytest.fixture(scope="module")
def json_server(model_f32: Path) -> Iterator[ServerProcess]:
    """A child process: what is tested is the JSON it writes to stderr."""
    with serving(model_f32, "--log-format", "json", "--max-queued-requests", "64", process=True) as server:
        yield server


def delta(before: dict[str, float], after: dict[str, float], name: str) -> float:
    return after.get(name, 0.0) - before.get(name, 0.0)


def test_known_traffic_moves_counters_exactly(json_server: Server) -> None:
    with json_server.channel() as channel:
        stub = json_server.stub(channel)
        prompt_tokens = stub.Tokenize(chat_pb2.TokenizeRequest(turns=[user("やあ")])).token_count
        before = json_server.scrape()
        for _ in range(3):
            reply = stub.Generate(chat_pb2.GenerateRequest(turns=[user("やあ")], sampling=greedy(5, min_new_tokens=5)))
            assert reply.usage.completion_tokens == 5
        with pytest.raises(grpc.RpcError):
            stub.Generate(chat_pb2.GenerateRequest(turns=[]))
        after = json_server.scrape()

    def d(name: str) -> float:
        return delta(before, after, name)

    assert d("jachat_generated_tokens_total") == 15
    assert d("jachat_prompt_tokens_total") == 3 * prompt_tokens
    assert d("jachat_request_generated_tokens_count") == 3 and d("jachat_request_generated_tokens_sum") == 15
    assert d("jachat_request_prompt_tokens_sum") == 3 * prompt_tokens
    assert d("jachat_time_to_first_token_seconds_count") == 3
    assert d("jachat_inter_token_latency_seconds_count") == 12  # 4 gaps between 5 tokens, 3 times
    assert d('jachat_finished_total{reason="length"}') == 3
    assert d('jachat_requests_total{api="grpc",code="OK",rpc="Generate"}') == 3
    assert d('jachat_requests_total{api="grpc",code="INVALID_ARGUMENT",rpc="Generate"}') == 1
    assert d('jachat_rejected_total{api="grpc",priority="interactive",reason="invalid"}') == 1
    assert d("jachat_batch_size_sum") == 3 and d('jachat_queue_duration_seconds_count{priority="interactive"}') == 3
    assert after["jachat_queue_capacity"] == 64 and after["jachat_running_requests"] == 0
    assert (
        after[
            'jachat_model_info{compute_type="float32",device="cpu",model="'
            + _model_name(json_server)
            + '",quantization="float32"}'
        ]
        == 1
    )


def test_the_inference_gateways_gauges_follow_a_running_batch(json_server: Server) -> None:
    """jachat_batch_sequences and jachat_kv_cache_usage_ratio (the endpoint picker's running and KV-cache gauges)
    rise while a batch runs and fall to 0 when it ends."""
    with json_server.channel() as channel:
        request = chat_pb2.GenerateStreamRequest(turns=[user("やあ")], sampling=greedy(1000, min_new_tokens=1000))
        stream = json_server.stub(channel).GenerateStream(request)
        next(stream)  # the batch runs
        running = json_server.scrape()
        assert running["jachat_batch_sequences"] == 1
        assert 0 < running["jachat_kv_cache_usage_ratio"] <= 1  # one busy replica of all
        stream.cancel()
        wait_until(
            lambda: json_server.scrape()["jachat_kv_cache_usage_ratio"] == 0, "the replica freed after the cancel"
        )
        assert json_server.scrape()["jachat_batch_sequences"] == 0


def _model_name(server: Server) -> str:
    with server.channel() as channel:
        return str(server.stub(channel).GetModelInfo(chat_pb2.GetModelInfoRequest()).model_name)


def _names(expr: str) -> set[str]:
    return {n for n in re.findall(r"\b(jachat_[a-z0-9_]+)", expr)}


def dashboard_exprs() -> list[str]:
    board = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in board["panels"] for t in p.get("targets", [])]


def alert_exprs() -> list[str]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [r["expr"] for g in groups for r in g["rules"]]


def test_every_metric_on_the_dashboard_and_in_alerts_is_exported(json_server: Server) -> None:
    with json_server.channel() as channel:  # traffic, so that labelled series exist
        json_server.stub(channel).Generate(chat_pb2.GenerateRequest(turns=[user("やあ")], sampling=greedy(3)))
    exported = {name.split("{")[0] for name in json_server.scrape()}
    used = set().union(*map(_names, dashboard_exprs() + alert_exprs()))
    assert used, "no metric names found"
    assert sorted(used - exported) == []
    assert {
        "jachat_time_to_first_token_seconds_bucket",
        "jachat_inter_token_latency_seconds_bucket",
        "jachat_queue_size",
        "jachat_rejected_total",
        "jachat_finished_total",
    } <= used


def test_dashboard_structure() -> None:
    board = json.loads(DASHBOARD.read_text())
    assert board["schemaVersion"] >= 36  # Grafana 10.0
    assert board["uid"] == "jachat" and board["title"]
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert variables["pod"]["type"] == "query" and variables["pod"]["datasource"]["uid"] == "${datasource}"
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    cells: set[tuple[int, int]] = set()
    for panel in board["panels"]:
        assert panel["type"] in {"timeseries", "stat", "table"} and panel["title"]
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        pos = panel["gridPos"]
        assert pos["w"] > 0 and pos["h"] > 0 and pos["x"] + pos["w"] <= 24
        mine = {(x, y) for x in range(pos["x"], pos["x"] + pos["w"]) for y in range(pos["y"], pos["y"] + pos["h"])}
        assert not cells & mine, f"panel {panel['title']!r} overlaps another"
        cells |= mine
        refs = [t["refId"] for t in panel["targets"]]
        assert refs and len(refs) == len(set(refs))
        assert all(t["expr"] and t["datasource"]["uid"] == "${datasource}" for t in panel["targets"])
    titles = " ".join(p["title"] for p in board["panels"])
    for needed in (
        "Time to first token",
        "Inter-token latency",
        "Output tokens/s",
        "status code",
        "Queue",
        "Batch size",
        "Finish reasons",
        "Rejections",
        "by pod",
        "Model",
    ):
        assert needed in titles


def test_dashboard_json_is_what_the_builder_makes() -> None:
    sys.path.insert(0, str(DASHBOARD.parent))
    try:
        import dashboard  # deploy/grafana/dashboard.py
    finally:
        sys.path.pop(0)
    assert DASHBOARD.read_text() == dashboard.render(), "run: python deploy/grafana/dashboard.py > " + str(DASHBOARD)


def test_alert_tests_are_up_to_date() -> None:
    sys.path.insert(0, str(ALERTS.parent))
    try:
        import build_tests  # deploy/prometheus/build_tests.py
    finally:
        sys.path.pop(0)
    assert ALERT_TESTS.read_text() == build_tests.render(), "run: python deploy/prometheus/build_tests.py"
    alerts = [r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"] if "alert" in r]
    assert all(r["annotations"].get("runbook") and r["annotations"].get("summary") for r in alerts)


@pytest.mark.skipif(not PROMTOOL and not os.environ.get("CI"), reason="promtool not installed (apt install prometheus)")
def test_promtool_checks_and_unit_tests_pass() -> None:
    assert PROMTOOL, "CI must install promtool (Debian's prometheus package; see scripts/test)"
    check = subprocess.run([PROMTOOL, "check", "rules", str(ALERTS)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    test = subprocess.run(
        [PROMTOOL, "test", "rules", str(ALERT_TESTS)], capture_output=True, text=True, cwd=ALERT_TESTS.parent
    )
    assert test.returncode == 0, test.stdout + test.stderr
    assert test.stdout.count("SUCCESS") == 1


def test_request_id_is_returned_and_on_every_log_line(json_server: Server) -> None:
    with json_server.channel() as channel:
        stub = json_server.stub(channel)
        _, call = stub.Generate.with_call(
            chat_pb2.GenerateRequest(turns=[user("やあ")], sampling=greedy(3)), metadata=(("x-request-id", "req-42"),)
        )
        assert dict(call.initial_metadata())["x-request-id"] == "req-42"
        stream = stub.GenerateStream(chat_pb2.GenerateStreamRequest(turns=[user("やあ")], sampling=greedy(3)))
        generated = dict(stream.initial_metadata())["x-request-id"]
        list(stream)
        with pytest.raises(grpc.RpcError) as bad:
            stub.Generate(chat_pb2.GenerateRequest(turns=[]), metadata=(("x-request-id", "bad-1"),))
        assert dict(bad.value.initial_metadata())["x-request-id"] == "bad-1"  # type: ignore[attr-defined]
    assert re.fullmatch(r"[0-9a-f]{32}", str(generated))

    def read_records() -> list[dict[str, Any]]:
        return [json.loads(line) for line in list(json_server.log) if line.startswith("{")]

    # the server's stderr reaches us through a pipe and a reader thread
    wait_until(lambda: any(r.get("request_id") == "bad-1" for r in read_records()), "bad-1's log line", timeout=5)
    records = read_records()
    assert records and all({"time", "level", "logger", "message"} <= set(r) for r in records)
    ours = [r for r in records if r.get("request_id") == "req-42"]
    assert ours and ours[-1]["rpc"] == "Generate" and ours[-1]["code"] == "OK" and ours[-1]["duration_ms"] > 0
    assert any(r.get("request_id") == generated and r.get("rpc") == "GenerateStream" for r in records)
    assert any(r.get("request_id") == "bad-1" and r.get("code") == "INVALID_ARGUMENT" for r in records)
