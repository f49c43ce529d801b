"""Prometheus metrics. One module, one class, built on a registry so tests can use a fresh one.

Names follow Prometheus conventions: prefix `jachat_`, base units in the name (`_seconds`), counters end in
`_total`. The per-request token histograms are `jachat_request_prompt_tokens` / `jachat_request_generated_tokens`,
not `jachat_prompt_tokens` / `jachat_generated_tokens`: those names belong to the `_total` counters' families, and
one family cannot be both a counter and a histogram (prometheus-client refuses it; OpenMetrics forbids it).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from importlib import metadata

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector

from jachat.service.domain.results import FinishedGeneration, FinishReason, Priority

PRIORITIES = tuple(priority.value for priority in Priority)
# tenants come from callers: the first MAX_TENANT_LABELS seen get a label of their own, the rest share "other"
MAX_TENANT_LABELS = 32

# Bucket choices, for LLM serving:
# - time to first token: from ~10 ms (short prompt, GPU, idle) through the 0.5-2.5 s of a long prompt on a CPU or a
#   wait for a batch, to 30 s under overload; the 2.5 s bucket is the TTFT SLO's threshold (alert rules).
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# - inter-token latency: ~5-20 ms per token on a GPU, 15-60 ms on a CPU, more in large batches; 100 ms and above
#   is a reader-visible stall.
ITL_BUCKETS = (0.0025, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5)
# - whole requests: replies of up to 2048 tokens run from 50 ms to minutes on a CPU.
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
# - queueing: the batch window is 2-50 ms; seconds mean a backlog.
QUEUE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# - tokens per request: powers of two up to the 2048-token context.
TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)
BATCH_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64)
# - event-loop lag: how late a timer fires. A healthy loop answers in well under 5 ms; 50 ms delays every stream
#   and health check visibly; a gRPC liveness probe (1 s timeout) fails at 1 s.
LOOP_LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
LOOP_LAG_INTERVAL = 0.05  # seconds between two samples
MAX_MISSED_SAMPLES = 1200  # a stall's samples recorded at most (a minute's worth): bounded work on waking

# finished_total{reason} and rejected_total{reason} label values
FINISH_REASONS = tuple(reason.value for reason in FinishReason)
REJECT_REASONS = ("invalid", "overloaded", "unavailable", "unauthenticated")
APIS = ("grpc", "http")  # the api label: which front end took the call


class Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        r = registry
        ProcessCollector(registry=r)  # the server process's process_* (memory, CPU, open files); the engine's below
        self.requests = Counter(
            "jachat_requests",
            "Finished calls by API (grpc, http), method and status code (gRPC code names for both APIs).",
            ["api", "rpc", "code"],
            registry=r,
        )
        self.request_duration = Histogram(
            "jachat_request_duration_seconds",
            "Time from receiving a call to its end, by API and method.",
            ["api", "rpc"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.time_to_first_token = Histogram(
            "jachat_time_to_first_token_seconds",
            "Time from a generation request's arrival to its first token.",
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.inter_token_latency = Histogram(
            "jachat_inter_token_latency_seconds",
            "Time between consecutive tokens of one sequence.",
            buckets=ITL_BUCKETS,
            registry=r,
        )
        self.queue_duration = Histogram(
            "jachat_queue_duration_seconds",
            "Time from a request's arrival to the start of its batch (or scoring job), by priority.",
            ["priority"],
            buckets=QUEUE_BUCKETS,
            registry=r,
        )
        self.request_prompt_tokens = Histogram(
            "jachat_request_prompt_tokens", "Prompt tokens per generation request.", buckets=TOKEN_BUCKETS, registry=r
        )
        self.request_generated_tokens = Histogram(
            "jachat_request_generated_tokens",
            "Tokens generated per generation request.",
            buckets=TOKEN_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter("jachat_prompt_tokens", "Prompt tokens of generation requests.", registry=r)
        self.generated_tokens = Counter(
            "jachat_generated_tokens", "Tokens generated (cancelled requests' too).", registry=r
        )
        self.finished = Counter("jachat_finished", "Generations by how they ended.", ["reason"], registry=r)
        self.rejected = Counter(
            "jachat_rejected",
            "Requests refused before any generation (or shed from the queue), by reason, priority and API.",
            ["reason", "priority", "api"],
            registry=r,
        )
        self.tenant_tokens = Counter(
            "jachat_tenant_generated_tokens",
            f"Tokens generated per tenant (the first {MAX_TENANT_LABELS} tenants seen; the rest as other).",
            ["tenant"],
            registry=r,
        )
        self._tenants: set[str] = set()
        self.running = Gauge(
            "jachat_running_requests",
            "Calls with model work in progress (generation or scoring; queued or running).",
            registry=r,
        )
        self.queue_size = Gauge(
            "jachat_queue_size", "Model work waiting for a replica (generations and scoring jobs).", registry=r
        )
        self.scored_tokens = Counter(
            "jachat_scored_tokens", "Positions scored teacher-forced (Score, completions echo).", registry=r
        )
        # the Inference Gateway's model-server protocol: queued (jachat_queue_size), running, and KV-cache use
        self.batch_sequences = Gauge(
            "jachat_batch_sequences",
            "Sequences in the batches running on the engine (a row that ended early keeps its place until its batch "
            "ends).",
            registry=r,
        )
        self.kv_cache_usage = Gauge(
            "jachat_kv_cache_usage_ratio",
            "Share of the engine's KV cache in use. The decode loop: the positions its running rows hold of the "
            "KV-cache budget (rows x the longest a row may reach). Static batches: the replicas running a batch over "
            "all replicas (a static batch admits no sequence once it runs, so a busy replica's cache is taken "
            "whatever its rows hold). 1: a new call waits.",
            registry=r,
        )
        self.queue_capacity = Gauge(
            "jachat_queue_capacity", "Most requests that may wait (--max-queued-requests).", registry=r
        )
        self.batch_size = Histogram(
            "jachat_batch_size", "Requests per generate_batch call.", buckets=BATCH_BUCKETS, registry=r
        )
        self.tokens_after_cancel = Histogram(
            "jachat_tokens_after_cancel",
            "Tokens a cancelled sequence generated after its cancellation was seen.",
            buckets=(0, 1, 2, 3, 5, 10),
            registry=r,
        )
        self.event_loop_lag = Histogram(
            "jachat_event_loop_lag_seconds",
            f"How late the event loop ran a timer set {LOOP_LAG_INTERVAL * 1000:g} ms ahead (sampled every "
            f"{LOOP_LAG_INTERVAL * 1000:g} ms, through stalls too: a stall counts for as long as it lasted).",
            buckets=LOOP_LAG_BUCKETS,
            registry=r,
        )
        self.engine_memory = Gauge(
            "jachat_engine_resident_memory_bytes",
            "Resident memory of the engine process (CTranslate2: the weights and its buffers; 0 once it is gone). "
            "The server process's own is process_resident_memory_bytes.",
            registry=r,
        )
        self.model_info = Gauge(
            "jachat_model_info",
            "The served model (value 1).",
            ["model", "quantization", "compute_type", "device"],
            registry=r,
        )
        self.build_info = Gauge(
            "jachat_build_info", "jachat and engine versions (value 1).", ["version", "ctranslate2"], registry=r
        )
        self.build_info.labels(_version("jachat"), _version("ctranslate2")).set(1)
        for reason in FINISH_REASONS:  # every series exists from the start, so rates and alerts see zeros
            self.finished.labels(reason)
        for priority in PRIORITIES:
            self.queue_duration.labels(priority)
            for reason in REJECT_REASONS:
                for api in APIS:
                    self.rejected.labels(reason, priority, api)

    # SchedulerObserver: called from the event loop and from generation threads
    def queue_changed(self, size: int) -> None:
        self.queue_size.set(size)

    def replicas_changed(self, busy: int, replicas: int, sequences: int) -> None:
        self.batch_sequences.set(sequences)
        self.kv_cache_usage.set(busy / replicas if replicas else 0.0)

    def work_started(self, queued: Sequence[tuple[float, Priority]]) -> None:
        for seconds, priority in queued:
            self.queue_duration.labels(priority.value).observe(seconds)

    def batch_started(self, size: int) -> None:
        self.batch_size.observe(size)

    def scored(self, tokens: int) -> None:
        self.scored_tokens.inc(tokens)

    def first_token(self, seconds: float) -> None:
        self.time_to_first_token.observe(seconds)

    def token_interval(self, seconds: float) -> None:
        self.inter_token_latency.observe(seconds)

    def generation_finished(self, record: FinishedGeneration) -> None:
        self.finished.labels(record.reason.value).inc()
        self.prompt_tokens.inc(record.prompt_tokens)
        self.generated_tokens.inc(record.generated_tokens)
        self.request_prompt_tokens.observe(record.prompt_tokens)
        self.request_generated_tokens.observe(record.generated_tokens)
        self.tenant_tokens.labels(self._tenant_label(record.tenant)).inc(record.generated_tokens)
        if record.reason is FinishReason.CANCELLED:
            self.tokens_after_cancel.observe(record.tokens_after_cancel)

    def _tenant_label(self, tenant: str) -> str:
        if tenant not in self._tenants and len(self._tenants) < MAX_TENANT_LABELS:
            self._tenants.add(tenant)
        return tenant if tenant in self._tenants else "other"

    async def sample_event_loop_lag(self, interval: float = LOOP_LAG_INTERVAL) -> None:
        """Forever: sleep `interval` and record how much later than asked the loop woke up. Work that blocks the
        loop (CPU work on it, a blocking call) shows here before health checks start to time out.

        A stall counts for as long as it lasted: the sampler cannot run while the loop is frozen, so when it wakes
        L seconds late it also records the samples it would have taken meanwhile (L - interval, L - 2 x interval,
        ...). Otherwise a 3.5 s freeze every 10 s is one late sample among 130 on time, and the p99 shows nothing."""
        loop = asyncio.get_running_loop()
        while True:
            asked = loop.time() + interval
            await asyncio.sleep(interval)
            late = max(0.0, loop.time() - asked)
            missed = min(int(late / interval), MAX_MISSED_SAMPLES)
            for k in range(missed + 1):
                self.event_loop_lag.observe(late - k * interval)


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "unknown"
