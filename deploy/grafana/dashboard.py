"""Build the jachat Grafana dashboard with grafana-foundation-sdk (Grafana's own dashboards-as-code library).

    python deploy/grafana/dashboard.py > deploy/grafana/jachat-dashboard.json

The JSON is committed so it can be imported as it is (Grafana 10 and later: Dashboards > New > Import); a test
rebuilds it and fails if the two differ. The Prometheus datasource is the `datasource` variable; `pod` picks pods.
"""

from __future__ import annotations

import json
import sys
from typing import Any, cast

from grafana_foundation_sdk.builders import common as common_builders
from grafana_foundation_sdk.builders import dashboard, prometheus, stat, table, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models.dashboard import DataSourceRef, GridPos, VariableRefresh
from grafana_foundation_sdk.models.prometheus import PromQueryFormat

DATASOURCE = DataSourceRef(type_val="prometheus", uid="${datasource}")
POD = 'pod=~"$pod"'
RATE = "$__rate_interval"
PERCENTILES = (("p50", 0.5), ("p90", 0.9), ("p99", 0.99))


def query(expr: str, legend: str, ref: str = "A", instant: bool = False) -> prometheus.Dataquery:
    q = prometheus.Dataquery().expr(expr).legend_format(legend).ref_id(ref).datasource(DATASOURCE)
    return cast(prometheus.Dataquery, q.instant().format(PromQueryFormat.TABLE) if instant else q.range())


def quantiles(metric: str, by: str = "") -> list[prometheus.Dataquery]:
    group = f"le{', ' + by if by else ''}"
    return [
        query(
            f"histogram_quantile({q}, sum by ({group}) (rate({metric}_bucket{{{POD}}}[{RATE}])))",
            f"{name}{' {{' + by + '}}' if by else ''}",
            ref,
        )
        for (name, q), ref in zip(PERCENTILES, "ABC", strict=True)
    ]


class Layout:
    """Places panels left to right in rows of 24 columns, with unique ids."""

    def __init__(self) -> None:
        self.x = self.y = self.row_height = 0
        self.next_id = 1

    def place(self, panel: Any, width: int, height: int = 8) -> Any:
        if self.x + width > 24:
            self.x, self.y, self.row_height = 0, self.y + self.row_height, 0
        panel = panel.grid_pos(GridPos(h=height, w=width, x=self.x, y=self.y)).id(self.next_id)
        self.x += width
        self.row_height = max(self.row_height, height)
        self.next_id += 1
        return panel


def series(title: str, unit: str, targets: list[prometheus.Dataquery], description: str) -> timeseries.Panel:
    panel = timeseries.Panel().title(title).unit(unit).description(description).datasource(DATASOURCE)
    panel = panel.legend(
        common_builders.VizLegendOptions()
        .show_legend(True)
        .display_mode(common.LegendDisplayMode.LIST)
        .placement(common.LegendPlacement.BOTTOM)
    )
    for target in targets:
        panel = panel.with_target(target)
    return cast(timeseries.Panel, panel)


def build() -> dashboard.Dashboard:
    layout = Layout()
    board = (
        dashboard.Dashboard("jachat")
        .uid("jachat")
        .description(
            "jachat: rinna/japanese-gpt-neox-3.6b-instruction-ppo on CTranslate2, served over gRPC and an "
            "OpenAI-compatible HTTP API"
        )
        .tags(["jachat", "llm", "grpc", "openai"])
        .refresh("30s")
        .time("now-1h", "now")
        .editable()
        .with_variable(dashboard.DatasourceVariable("datasource").label("Prometheus").type("prometheus"))
        .with_variable(
            dashboard.QueryVariable("pod")
            .label("Pod")
            .datasource(DATASOURCE)
            .query({"query": "label_values(jachat_build_info, pod)", "refId": "pods"})
            .multi(True)
            .include_all(True)
            .all_value(".*")
            .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
        )
    )
    panels = [
        (
            series(
                "Time to first token",
                "s",
                quantiles("jachat_time_to_first_token_seconds"),
                "From a request's arrival to its first token, queueing included.",
            ),
            8,
        ),
        (
            series(
                "Inter-token latency",
                "s",
                quantiles("jachat_inter_token_latency_seconds"),
                "Time between consecutive tokens of one reply.",
            ),
            8,
        ),
        (
            series(
                "Output tokens/s",
                "short",
                [
                    query(f"sum(rate(jachat_generated_tokens_total{{{POD}}}[{RATE}]))", "generated", "A"),
                    query(f"sum(rate(jachat_prompt_tokens_total{{{POD}}}[{RATE}]))", "prompt", "B"),
                ],
                "Tokens generated per second (and prompt tokens read), all selected pods.",
            ),
            8,
        ),
        (
            series(
                "Requests by status code",
                "reqps",
                [
                    query(f"sum by (code) (rate(jachat_requests_total{{{POD}}}[{RATE}]))", "{{code}}"),
                ],
                "Finished RPCs per second by gRPC status code.",
            ),
            8,
        ),
        (
            series(
                "Calls by API",
                "reqps",
                [
                    query(
                        f"sum by (api, code) (rate(jachat_requests_total{{{POD}}}[{RATE}]))",
                        "{{api}} {{code}}",
                    ),
                ],
                "Finished calls per second by API (grpc, or http: the OpenAI-compatible API) and status (gRPC code "
                "names for both: an HTTP 429 is RESOURCE_EXHAUSTED, 400 INVALID_ARGUMENT).",
            ),
            8,
        ),
        (
            series(
                "Queue and running requests",
                "short",
                [
                    query(f"sum(jachat_queue_size{{{POD}}})", "queued", "A"),
                    query(f"sum(jachat_running_requests{{{POD}}})", "running", "B"),
                    query(f"sum(jachat_queue_capacity{{{POD}}})", "queue capacity", "C"),
                ],
                "Requests waiting for a batch, requests in progress, and the queue's capacity.",
            ),
            8,
        ),
        (
            series(
                "KV cache in use by pod (the Inference Gateway's KV-cache gauge)",
                "percentunit",
                [
                    query(f"max by (pod) (jachat_kv_cache_usage_ratio{{{POD}}})", "{{pod}} busy", "A"),
                ],
                "jachat_kv_cache_usage_ratio per pod, which the endpoint picker reads as KV-cache use. The decode "
                "loop: the share of its KV-cache budget its running rows hold (rows x the longest a row may "
                "reach); near 100% a new call waits for rows to leave. Static batches: replicas running a batch "
                "over all replicas (a running static batch admits no one). Sequences running: "
                "jachat_batch_sequences.",
            ),
            8,
        ),
        (
            series(
                "Batch size",
                "short",
                [
                    query(
                        f"sum(rate(jachat_batch_size_sum{{{POD}}}[{RATE}])) / sum(rate(jachat_batch_size_count{{{POD}}}"
                        f"[{RATE}]))",
                        "mean",
                        "A",
                    ),
                    *quantiles("jachat_batch_size")[2:],
                ],
                "Requests per generate_batch call (static batches; the decode loop runs each call as a job of its "
                "own, so 1: its batch is jachat_batch_sequences).",
            ),
            8,
        ),
        (
            series(
                "Finish reasons",
                "reqps",
                [
                    query(f"sum by (reason) (rate(jachat_finished_total{{{POD}}}[{RATE}]))", "{{reason}}"),
                ],
                "How generations ended: eos, length, stop, cancelled, deadline, error.",
            ),
            8,
        ),
        (
            series(
                "Rejections",
                "reqps",
                [
                    query(
                        f"sum by (reason, priority, api) (rate(jachat_rejected_total{{{POD}}}[{RATE}]))",
                        "{{reason}} ({{priority}}, {{api}})",
                    ),
                ],
                "Requests refused before any generation (invalid, overloaded: queue full, unavailable), and batch "
                "calls shed for interactive ones, by priority.",
            ),
            8,
        ),
        (
            series(
                "Queue wait by priority",
                "s",
                quantiles("jachat_queue_duration_seconds", "priority"),
                "From a request's arrival to the start of its batch; interactive calls never wait behind batch ones.",
            ),
            8,
        ),
        (
            series(
                "Event-loop lag by pod",
                "s",
                quantiles("jachat_event_loop_lag_seconds", "pod"),
                "How late each pod's event loop runs a timer set 50 ms ahead. Over 50 ms, streams and health "
                "checks stall; the JachatEventLoopStalled alert fires at a p99 over 100 ms.",
            ),
            8,
        ),
        (
            series(
                "Output tokens/s by pod",
                "short",
                [
                    query(f"sum by (pod) (rate(jachat_generated_tokens_total{{{POD}}}[{RATE}]))", "{{pod}}"),
                ],
                "Per-pod throughput: an uneven split means connections are not balanced.",
            ),
            8,
        ),
        (
            series(
                "Output tokens/s by tenant",
                "short",
                [
                    query(
                        f"sum by (tenant) (rate(jachat_tenant_generated_tokens_total{{{POD}}}[{RATE}]))", "{{tenant}}"
                    ),
                ],
                "Each tenant's share of the generated tokens (the first 32 tenants a pod sees; the rest as other).",
            ),
            8,
        ),
        (
            series(
                "Time to first token p99 by pod",
                "s",
                [
                    query(
                        f"histogram_quantile(0.99, sum by (le, pod) (rate(jachat_time_to_first_token_seconds_bucket"
                        f"{{{POD}}}[{RATE}])))",
                        "{{pod}}",
                    ),
                ],
                "Per-pod TTFT p99.",
            ),
            8,
        ),
        (
            series(
                "Resident memory by pod and process",
                "bytes",
                [
                    query(f"sum by (pod) (jachat_engine_resident_memory_bytes{{{POD}}})", "{{pod}} engine", "A"),
                    query(f"sum by (pod) (process_resident_memory_bytes{{{POD}}})", "{{pod}} server", "B"),
                ],
                "The engine process holds the weights and CTranslate2's buffers; the server process holds the edge. "
                "The engine's drops to 0 when it dies (the server then exits and the pod restarts).",
            ),
            8,
        ),
        (
            series(
                "Request duration p99 by API and method",
                "s",
                [
                    query(
                        f"histogram_quantile(0.99, sum by (le, api, rpc) (rate(jachat_request_duration_seconds_bucket"
                        f"{{{POD}}}[{RATE}])))",
                        "{{api}} {{rpc}}",
                    ),
                ],
                "Whole-call latency by API and method (an HTTP route, or a gRPC method).",
            ),
            8,
        ),
        (
            stat.Panel()
            .title("Serving pods")
            .description("Pods exporting jachat metrics.")
            .datasource(DATASOURCE)
            .with_target(query(f"count(jachat_model_info{{{POD}}})", "pods")),
            4,
        ),
        (
            stat.Panel()
            .title("Tokens after cancel (p99)")
            .unit("short")
            .datasource(DATASOURCE)
            .description("Tokens a cancelled sequence generated after its cancellation was seen (promise: <= 2).")
            .with_target(
                query(
                    f"histogram_quantile(0.99, sum by (le) (rate(jachat_tokens_after_cancel_bucket{{{POD}}}[{RATE}])))",
                    "p99",
                )
            ),
            4,
        ),
        (
            table.Panel()
            .title("Model")
            .description("Served model, quantization, compute type and device per pod.")
            .datasource(DATASOURCE)
            .with_target(
                query(
                    f"max by (pod, model, quantization, compute_type, device) (jachat_model_info{{{POD}}})",
                    "",
                    "A",
                    instant=True,
                )
            )
            .with_target(
                query(f"max by (pod, version, ctranslate2) (jachat_build_info{{{POD}}})", "", "B", instant=True)
            ),
            16,
        ),
    ]
    for panel, width in panels:
        board = board.with_panel(layout.place(panel, width))
    return cast(dashboard.Dashboard, board)


def render() -> str:
    return json.dumps(build().build(), cls=JSONEncoder, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render())
