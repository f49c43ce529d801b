"""Prometheus metrics. One module, one class, built on a registry so tests can use a fresh one."""

from __future__ import annotations

from importlib import metadata

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

# Latency buckets for LLM serving: time to first token spans ~10 ms (small prompt on GPU) to seconds (long
# prompt on CPU, queueing); whole requests run up to minutes for long replies on CPU.
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


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
