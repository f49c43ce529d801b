"""Prometheus metrics. One module, one class, built on a registry so tests can use a fresh one."""

from __future__ import annotations

from collections.abc import Sequence
from importlib import metadata
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

if TYPE_CHECKING:
    from service.scheduler import Generation

# Latency buckets for LLM serving: time to first token spans ~10 ms (small prompt on GPU) to seconds (long
# prompt on CPU, queueing); whole requests run up to minutes for long replies on CPU.
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
# Waiting in the queue: from the batch-fill wait (~5 ms) to seconds under overload.
QUEUE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64)


class Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.requests = Counter(
            "jachat_requests", "Finished RPCs by method and gRPC status code.", ["rpc", "code"], registry=registry
        )
        self.request_duration = Histogram(
            "jachat_request_duration_seconds",
            "Time from receiving an RPC to its end.",
            ["rpc"],
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.time_to_first_token = Histogram(
            "jachat_time_to_first_token_seconds",
            "Time from receiving a generation RPC to its first token.",
            buckets=TTFT_BUCKETS,
            registry=registry,
        )
        self.prompt_tokens = Counter("jachat_prompt_tokens", "Prompt tokens of generation requests.", registry=registry)
        self.generated_tokens = Counter("jachat_generated_tokens", "Tokens generated.", registry=registry)
        self.finished = Counter("jachat_finished", "Generations by finish reason.", ["reason"], registry=registry)
        self.running = Gauge("jachat_running_requests", "Generation RPCs in progress.", registry=registry)
        self.queue_size = Gauge("jachat_queue_size", "Requests waiting for a batch.", registry=registry)
        self.queue_duration = Histogram(
            "jachat_queue_duration_seconds",
            "Time from arrival to the start of its batch.",
            buckets=QUEUE_BUCKETS,
            registry=registry,
        )
        self.batch_size = Histogram(
            "jachat_batch_size", "Requests per generate_batch call.", buckets=BATCH_BUCKETS, registry=registry
        )
        self.tokens_after_cancel = Histogram(
            "jachat_tokens_after_cancel",
            "Tokens a cancelled sequence generated after its cancellation was seen.",
            buckets=(0, 1, 2, 3, 5, 10),
            registry=registry,
        )
        self.model_info = Gauge(
            "jachat_model_info",
            "The served model (value 1).",
            ["model", "quantization", "compute_type", "device"],
            registry=registry,
        )
        self.build_info = Gauge(
            "jachat_build_info", "jachat and engine versions (value 1).", ["version", "ctranslate2"], registry=registry
        )
        self.build_info.labels(_version("jachat"), _version("ctranslate2")).set(1)

    # SchedulerObserver
    def queue_changed(self, size: int) -> None:
        self.queue_size.set(size)

    def batch_started(self, size: int, queued_seconds: Sequence[float]) -> None:
        self.batch_size.observe(size)
        for seconds in queued_seconds:
            self.queue_duration.observe(seconds)

    def generation_finished(self, gen: Generation) -> None:
        assert gen.finish_reason is not None
        self.finished.labels(gen.finish_reason.value).inc()
        self.prompt_tokens.inc(len(gen.prompt_ids))
        self.generated_tokens.inc(gen.steps)
        if gen.finish_reason.value == "cancelled":
            self.tokens_after_cancel.observe(gen.steps_after_cancel)

    def serve(self, port: int, host: str = "0.0.0.0") -> int:
        """Expose /metrics over HTTP on a background thread; returns the bound port."""
        self._http, _thread = start_http_server(port, addr=host, registry=self.registry)
        bound: int = self._http.server_address[1]
        return bound

    def close(self) -> None:
        http = getattr(self, "_http", None)
        if http is not None:
            http.shutdown()
            http.server_close()


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "unknown"
