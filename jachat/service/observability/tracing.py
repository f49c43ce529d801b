"""OpenTelemetry traces, off unless configured.

On with `--otlp-endpoint` (or the standard `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` / `OTEL_EXPORTER_OTLP_ENDPOINT`;
`OTEL_SDK_DISABLED=true` turns it off again). Spans go to an OTLP/gRPC collector through the SDK's batch processor,
which exports on a thread of its own, so the event loop only creates spans. The other standard variables apply as
the SDK reads them: `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_TRACES_SAMPLER`, `OTEL_BSP_*`,
`OTEL_EXPORTER_OTLP_HEADERS`/`_INSECURE`/`_CERTIFICATE`, `OTEL_PROPAGATORS`.

One span per call (SERVER kind), a child of the caller's W3C `traceparent` (gRPC metadata or HTTP header), with
children `jachat.prepare` (request preparation), `jachat.queue` (waiting for a batch) and `jachat.generate` (the
batch's start to the reply's end); a scoring job (Score, a completion's echo) is one `jachat.score` child, its
wait in the queue included. Queue and generation happen on generation threads, so their spans are written
when the reply ends, from the times the engine recorded. The API (opentelemetry-api, small) is a dependency; the
SDK and exporter are the `tracing` extra.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from importlib import metadata
from typing import Any

from opentelemetry import propagate, trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from jachat.service.domain.results import Completion

__all__ = ["Span", "Tracing", "configure"]

_ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
SHUTDOWN_SECONDS = 5.0  # the most the drain waits for the last spans to be exported
log = logging.getLogger("jachat.tracing")


class Tracing:
    """Spans of calls, or nothing at all (`Tracing()`): then every method is a cheap no-op."""

    def __init__(self, tracer: trace.Tracer | None = None, shutdown: Callable[[], None] | None = None) -> None:
        self.tracer = tracer
        self._shutdown = shutdown

    @property
    def enabled(self) -> bool:
        return self.tracer is not None

    def start_call(self, name: str, metadata: Any, attributes: Mapping[str, Any]) -> Span:
        """The call's span, continuing the caller's trace when its `metadata` (gRPC metadata or HTTP headers, as
        (key, value) pairs) has traceparent. With tracing off nothing is read."""
        if self.tracer is None:
            return trace.INVALID_SPAN
        carrier = {str(k).lower(): v for k, v in metadata or () if isinstance(v, str)}
        parent = propagate.extract(carrier)
        return self.tracer.start_span(name, context=parent, kind=SpanKind.SERVER, attributes=dict(attributes))

    @contextlib.contextmanager
    def child(self, parent: Span, name: str) -> Iterator[Span]:
        if self.tracer is None:
            yield trace.INVALID_SPAN
            return
        span = self.tracer.start_span(name, context=trace.set_span_in_context(parent))
        try:
            yield span
        except Exception as exc:
            span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
            raise
        finally:
            span.end()

    def completed(self, parent: Span, completion: Completion, arrived: float) -> None:
        """The queue and generation spans of a finished reply, and its figures on the call's span."""
        if self.tracer is None:
            return
        parent.set_attributes(
            {
                "gen_ai.usage.input_tokens": completion.prompt_tokens,
                "gen_ai.usage.output_tokens": completion.completion_tokens,
                "gen_ai.response.finish_reasons": [completion.finish_reason.value],
                "jachat.batch_size": completion.batch_size,
            }
        )
        if completion.started_at is None:
            return
        context = trace.set_span_in_context(parent)
        end = completion.finished_at or time.monotonic()
        queue = self.tracer.start_span("jachat.queue", context=context, start_time=_wall_ns(arrived))
        queue.end(_wall_ns(completion.started_at))
        generate = self.tracer.start_span(
            "jachat.generate",
            context=context,
            start_time=_wall_ns(completion.started_at),
            attributes={
                "jachat.batch_size": completion.batch_size,
                "gen_ai.usage.output_tokens": completion.completion_tokens,
                "jachat.time_to_first_token_ms": round(((completion.first_token_at or end) - arrived) * 1000, 3),
            },
        )
        generate.end(_wall_ns(end))

    @staticmethod
    def end(span: Span, code: str, error: str | None = None) -> None:
        """End the call's span with its outcome (a gRPC code name, whichever API took it)."""
        if not span.is_recording():
            return
        span.set_attribute("jachat.status_code", code)
        if error is not None:
            span.set_status(Status(StatusCode.ERROR, f"{code}: {error}"))
        span.end()

    def shutdown(self, timeout: float = SHUTDOWN_SECONDS) -> bool:
        """Export what is still buffered (at the end of the drain), for at most `timeout` seconds: a collector that
        does not answer must not hold the pod past its termination grace (the SDK would wait 30 s). Returns whether
        the spans went out; if not, they are dropped and the log says so."""
        if self._shutdown is None:
            return True
        exporting = threading.Thread(target=self._shutdown, name="jachat-trace-shutdown", daemon=True)
        exporting.start()
        exporting.join(timeout)
        if exporting.is_alive():
            log.warning("traces: the collector took nothing within %g s at shutdown; last spans dropped", timeout)
            return False
        return True


def _wall_ns(monotonic: float) -> int:
    """A time.monotonic() reading as nanoseconds since the epoch (what spans carry)."""
    return time.time_ns() - int((time.monotonic() - monotonic) * 1e9)


def configure(endpoint: str | None, environ: Mapping[str, str]) -> Tracing:
    """Tracing as the settings and the OTEL_* variables ask: off, or an SDK provider exporting OTLP over gRPC."""
    configured = endpoint or next((environ[v] for v in _ENDPOINT_VARIABLES if environ.get(v)), None)
    if not configured or environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return Tracing()
    try:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import SERVICE_NAME, SERVICE_VERSION, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError as exc:
        raise ValueError(
            f"tracing to {configured} needs the OpenTelemetry SDK and OTLP exporter: pip install 'jachat[tracing]' "
            f"({exc})"
        ) from None
    # OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES, when set, win over these defaults (Resource.create merges them)
    defaults: dict[str, Any] = {SERVICE_NAME: "jachat", SERVICE_VERSION: _version()}
    if environ.get("OTEL_SERVICE_NAME"):
        defaults[SERVICE_NAME] = environ["OTEL_SERVICE_NAME"]
    # shut down by the drain, within SHUTDOWN_SECONDS (not again at exit, where the SDK would wait on the collector)
    provider = TracerProvider(resource=Resource.create(defaults), shutdown_on_exit=False)
    # the exporter reads the other OTEL_EXPORTER_OTLP_* variables (headers, TLS, timeout) itself
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=configured)))
    return Tracing(provider.get_tracer("jachat", _version()), provider.shutdown)


def _version() -> str:
    try:
        return metadata.version("jachat")
    except metadata.PackageNotFoundError:
        return "unknown"
