"""A real Prometheus (Debian's package) scrapes a live jachat under gRPC and HTTP traffic; then every dashboard panel
query and every alerting and recording rule is evaluated through its HTTP API, as Grafana and the rule manager
would run them."""

from __future__ import annotations

import datetime
import json
import os
import re
import shutil
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import openai
import pytest
import yaml

from jachat.v1 import chat_pb2
from tests.helpers import REPO, greedy, user, wait_until
from tests.servers import Server, free_port, serving

PROMETHEUS = shutil.which("prometheus")
DASHBOARD = REPO / "deploy" / "grafana" / "jachat-dashboard.json"
ALERTS = REPO / "deploy" / "prometheus" / "jachat-alerts.yaml"
POD = "jachat-test-0"
RATE_WINDOW = "30s"  # what $__rate_interval stands for: several 1 s scrapes
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not PROMETHEUS and not os.environ.get("CI"), reason="prometheus not installed (apt install prometheus)"
    ),
]


def api(port: int, path: str, **params: str) -> Any:
    url = f"http://127.0.0.1:{port}/api/v1/{path}?{urllib.parse.urlencode(params)}"
    with urllib.request.urlopen(url, timeout=10) as response:
        body = json.loads(response.read())
    assert body["status"] == "success", body
    return body["data"]


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory: pytest.TempPathFactory, model_f32: Path) -> Iterator[tuple[int, Server]]:
    """Prometheus scraping a live jachat every second (job jachat, one pod), with the project's rules loaded."""
    assert PROMETHEUS, "CI must install prometheus (Debian's package; see scripts/test)"
    folder = tmp_path_factory.mktemp("prometheus")
    with serving(model_f32, "--http-host", "127.0.0.1", "--http-port", "0") as server:
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(ALERTS)],
            "scrape_configs": [
                {
                    "job_name": "jachat",
                    "static_configs": [
                        {"targets": [f"127.0.0.1:{server.metrics_port}"], "labels": {"pod": POD, "namespace": "test"}}
                    ],
                }
            ],
        }
        (folder / "prometheus.yml").write_text(yaml.safe_dump(config))
        port = free_port()
        process = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={folder / 'prometheus.yml'}",
                f"--storage.tsdb.path={folder / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            wait_ready(port, process)
            traffic(server, seconds=8)
            # two more scrapes and rule evaluations after the traffic, so every counter has moved in the window
            ended = time.time()
            wait_until(lambda: settled_since(port, ended + 1.0), "two scrapes and evaluations after the traffic", 60)
            yield port, server
        finally:
            process.terminate()
            process.wait(30)
            assert process.stderr is not None
            process.stderr.close()


def settled_since(port: int, moment: float) -> bool:
    """Whether Prometheus has scraped jachat and evaluated every rule group since `moment` (a Unix time)."""
    scraped = api(port, "query", query='timestamp(up{job="jachat"})')["result"]
    if not scraped or float(scraped[0]["value"][1]) <= moment:
        return False
    evaluated = [group["lastEvaluation"] for group in api(port, "rules")["groups"]]
    return bool(evaluated) and all(_unix(stamp) > moment for stamp in evaluated)


def _unix(stamp: str) -> float:
    """An RFC 3339 time as Prometheus writes it (up to nanoseconds; Z or an offset) as a Unix time."""
    match = re.fullmatch(r"([^.]+?)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)", stamp)
    assert match, stamp
    zone = "+00:00" if match[3] == "Z" else match[3]
    return datetime.datetime.fromisoformat(match[1] + zone).timestamp() + float("0." + (match[2] or "0"))


def wait_ready(port: int, process: subprocess.Popen[str]) -> None:
    def ready() -> bool:
        assert process.poll() is None, process.stderr.read() if process.stderr else "prometheus exited"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/-/ready", timeout=2) as response:
                return bool(response.status == 200)
        except OSError:
            return False

    wait_until(ready, "prometheus ready (/-/ready answering 200)", timeout=60)


def traffic(server: Server, seconds: float) -> None:
    """What an operator's dashboard should show: both APIs, both priorities, two tenants, replies that end by
    length and by cancellation, invalid calls."""
    assert server.http_port is not None
    sdk = openai.OpenAI(base_url=f"http://127.0.0.1:{server.http_port}/v1", api_key="-", max_retries=0)
    model = sdk.models.list().data[0].id
    stop = time.monotonic() + seconds

    def grpc_caller(priority: chat_pb2.Priority.ValueType, tenant: str) -> None:
        with server.channel() as channel:
            stub = server.stub(channel)
            # the batch caller cancels its streams: long ones, so that the cancel finds them generating
            sampling = greedy(400, min_new_tokens=400) if priority == chat_pb2.PRIORITY_BATCH else greedy(8)
            while time.monotonic() < stop:
                turns = [user("こんにちは")]
                request = chat_pb2.GenerateStreamRequest(turns=turns, sampling=sampling, priority=priority)
                stream = stub.GenerateStream(request, metadata=(("x-jachat-tenant", tenant),), timeout=30)
                for i, _ in enumerate(stream):
                    if i == 2 and priority == chat_pb2.PRIORITY_BATCH:
                        stream.cancel()  # a cancellation: tokens after cancel are observed
                        break
                with pytest.raises(grpc.RpcError):
                    stub.Generate(chat_pb2.GenerateRequest(), timeout=30)  # invalid: no turns

    def http_caller() -> None:
        while time.monotonic() < stop:
            sdk.chat.completions.create(model=model, messages=[{"role": "user", "content": "やあ"}], max_tokens=6)

    callers = [
        threading.Thread(target=grpc_caller, args=(chat_pb2.PRIORITY_INTERACTIVE, "team-a")),
        threading.Thread(target=grpc_caller, args=(chat_pb2.PRIORITY_BATCH, "team-b")),
        threading.Thread(target=http_caller),
    ]
    for caller in callers:
        caller.start()
    for caller in callers:
        caller.join(60)


def panel_queries() -> list[tuple[str, str]]:
    board = json.loads(DASHBOARD.read_text())
    found = []
    for panel in board["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"].replace("$__rate_interval", RATE_WINDOW).replace("$pod", ".*")
            assert "$" not in expr, f"{panel['title']}: a variable this test does not know: {expr}"
            found.append((panel["title"], expr))
    return found


def rules() -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]


def test_every_dashboard_panel_returns_series_from_the_live_server(prometheus: tuple[int, Server]) -> None:
    port, _ = prometheus
    queries = panel_queries()
    assert len(queries) >= 20
    empty = []
    for title, expr in queries:
        result = api(port, "query", query=expr)["result"]
        if not result:
            empty.append(f"{title}: {expr}")
    assert not empty, "panels without data under traffic:\n" + "\n".join(empty)
    # the pod variable's query finds the pod
    assert POD in api(port, "label/pod/values", **{"match[]": "jachat_build_info"})


def test_the_panels_show_what_the_traffic_did(prometheus: tuple[int, Server]) -> None:
    port, _ = prometheus

    def values(expr: str) -> dict[str, float]:
        result = api(port, "query", query=expr)["result"]
        return {",".join(f"{k}={v}" for k, v in sorted(r["metric"].items())): float(r["value"][1]) for r in result}

    window = RATE_WINDOW
    assert values(f"sum(rate(jachat_generated_tokens_total[{window}]))")[""] > 0
    by_api = values(f'sum by (api) (increase(jachat_requests_total{{code="OK"}}[{window}]))')
    assert by_api["api=grpc"] > 0 and by_api["api=http"] > 0
    invalid = values(f'sum by (api) (increase(jachat_rejected_total{{reason="invalid"}}[{window}]))')
    assert invalid["api=grpc"] > 0
    tenants = values(f"sum by (tenant) (increase(jachat_tenant_generated_tokens_total[{window}]))")
    assert tenants["tenant=team-a"] > 0 and tenants["tenant=team-b"] > 0 and tenants["tenant=default"] > 0
    waited = values(f"sum by (priority) (increase(jachat_queue_duration_seconds_count[{window}]))")
    assert waited["priority=interactive"] > 0 and waited["priority=batch"] > 0
    assert values(f"sum(increase(jachat_tokens_after_cancel_count[{window}]))")[""] > 0
    assert values(f"sum(increase(jachat_event_loop_lag_seconds_count[{window}]))")[""] > 0


def test_every_rule_evaluates_without_error_and_reads_live_series(prometheus: tuple[int, Server]) -> None:
    port, _ = prometheus
    expected = rules()
    loaded = {rule.get("name"): rule for group in api(port, "rules")["groups"] for rule in group["rules"]}
    names = {rule.get("record") or rule.get("alert") for rule in expected}
    assert names <= set(loaded), names - set(loaded)
    for name in names:
        assert loaded[name]["health"] == "ok", (name, loaded[name].get("lastError"))
    exported = set(api(port, "label/__name__/values"))
    for rule in expected:
        name = rule.get("record") or rule.get("alert")
        api(port, "query", query=rule["expr"])  # parses and runs (a failure is an error status)
        # every series a rule reads exists: a renamed metric would leave it silently empty
        read = set(re.findall(r"\b(jachat[:_][a-z0-9_:]+|up)\b", rule["expr"]))
        assert read <= exported, (name, read - exported)
        if "record" in rule:  # a recording rule's output is there once it has been evaluated
            assert api(port, "query", query=rule["record"])["result"], name
    # a healthy server under normal traffic fires nothing
    firing = [a["labels"]["alertname"] for a in api(port, "alerts")["alerts"] if a["state"] == "firing"]
    assert firing == []
