"""The server: gRPC (ChatService, grpc.health.v1, reflection), the OpenAI-compatible HTTP API when asked, the metrics
endpoint; start-up, model loading and graceful stop. Both APIs share one `Calls` (engine, drain, metrics, traces)."""

from __future__ import annotations

import asyncio
import logging
import os
import resource
import signal
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry

from jachat.service.edge.calls import Calls
from jachat.service.edge.grpc.health import HealthServicer
from jachat.service.edge.grpc.protocol import CHAT_SERVICE, method_handlers
from jachat.service.edge.grpc.security import TokenAuthInterceptor, server_credentials
from jachat.service.edge.grpc.servicer import ChatServicer
from jachat.service.edge.identity import Tokens
from jachat.service.engine.engine import Engine
from jachat.service.engine.options import EngineOptions, SchedulerOptions
from jachat.service.observability.exposition import MetricsEndpoint
from jachat.service.observability.metrics import Metrics
from jachat.service.observability.tracing import configure
from jachat.service.settings import Settings
from jachat.service.watch import EngineWatch

if TYPE_CHECKING:
    from jachat.service.edge.http.app import HttpApi

log = logging.getLogger("jachat.server")

MAX_MESSAGE_BYTES = 4 * 1024 * 1024


def server_options(settings: Settings | None = None) -> list[tuple[str, int]]:
    options = [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        # keepalive: ping idle clients every 60 s and drop the dead; clients may ping at most every 10 s (also
        # without calls), and one that pings more often twice is sent GOAWAY (too_many_pings)
        ("grpc.keepalive_time_ms", 60_000),
        ("grpc.keepalive_timeout_ms", 20_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.http2.max_ping_strikes", 2),
    ]
    if settings is not None:
        options.append(("grpc.max_concurrent_streams", settings.max_streams_per_connection))
    if settings is not None and settings.max_connection_age_seconds > 0:
        options += [
            ("grpc.max_connection_age_ms", int(settings.max_connection_age_seconds * 1000)),
            ("grpc.max_connection_age_grace_ms", int(settings.max_connection_age_grace_seconds * 1000)),
        ]
    return options


def create_server(
    address: str,
    servicer: ChatServicer,
    health_servicer: health.aio.HealthServicer,
    options: list[tuple[str, int]] | None = None,
    credentials: grpc.ServerCredentials | None = None,
    interceptors: list[grpc.aio.ServerInterceptor] | None = None,
    max_concurrent_rpcs: int | None = None,
) -> tuple[grpc.aio.Server, int]:
    """A gRPC server with ChatService, health and reflection, bound to address (not started)."""
    server = grpc.aio.server(
        options=options if options is not None else server_options(),
        interceptors=interceptors or None,
        maximum_concurrent_rpcs=max_concurrent_rpcs,
    )
    server.add_generic_rpc_handlers((method_handlers(servicer),))
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((CHAT_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    return server, port


def security(
    settings: Settings, metrics: Metrics, tokens: Tokens | None
) -> tuple[grpc.ServerCredentials | None, list[Any]]:
    """TLS credentials and interceptors that the settings ask for."""
    if (settings.tls_cert is None) != (settings.tls_key is None):
        raise ValueError("--tls-cert and --tls-key go together")
    if settings.tls_client_ca is not None and settings.tls_cert is None:
        raise ValueError("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key")
    credentials = None
    if settings.tls_cert is not None and settings.tls_key is not None:
        credentials = server_credentials(settings.tls_cert, settings.tls_key, settings.tls_client_ca)
    interceptors: list[Any] = []
    if tokens is not None:
        interceptors.append(
            TokenAuthInterceptor(tokens, metrics.rejected.labels("unauthenticated", "interactive", "grpc").inc)
        )
    return credentials, interceptors


def http_api(settings: Settings, calls: Calls) -> HttpApi:
    """The HTTP API (the http extra: aiohttp), sharing the calls, limits, tokens and TLS files of gRPC: encrypted
    whenever gRPC is, unless --http-plaintext says something in front terminates TLS."""
    try:
        from jachat.service.edge.http.app import HttpApi
        from jachat.service.edge.http.tls import ReloadingTLS
    except ImportError as exc:
        raise ValueError(f"--http-port needs the http extra: pip install 'jachat[http]' ({exc})") from None
    tls = None
    if settings.tls_cert is not None and settings.tls_key is not None and not settings.http_plaintext:
        tls = ReloadingTLS(settings.tls_cert, settings.tls_key, settings.tls_client_ca)
    return HttpApi(
        calls,
        settings.max_concurrent_rpcs,
        settings.http_request_timeout_seconds,
        settings.stream_write_timeout_seconds,
        settings.max_http_connections,
        tls,
        settings.max_http_connections_per_peer or None,
        settings.completions,
    )


async def set_serving(health_servicer: health.aio.HealthServicer, serving: bool) -> None:
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for service in ("", CHAT_SERVICE):
        await health_servicer.set(service, status)


def raise_open_file_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard one (a container's default soft limit is often 1024, where a
    thousand idle connections would make every accept() fail); returns the soft limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:  # not allowed here: keep the soft limit, and say so
            log.warning("cannot raise the open-file limit from %d to %d: %s", soft, hard, exc)
    return soft


@dataclass
class Service:
    """A running jachat: gRPC server, metrics endpoint and engine."""

    settings: Settings
    server: grpc.aio.Server
    port: int
    metrics: Metrics
    metrics_port: int | None
    calls: Calls
    servicer: ChatServicer
    health: HealthServicer
    metrics_endpoint: MetricsEndpoint
    lag_sampler: asyncio.Task[None]
    http: HttpApi | None = None
    http_port: int | None = None
    lost: str | None = None  # why the engine process died, once it has
    lost_event: asyncio.Event = field(default_factory=asyncio.Event)
    watch: asyncio.Task[None] | None = None  # the engine's watch (watch.py), once the model is loaded

    @classmethod
    async def start(cls, settings: Settings, registry: CollectorRegistry | None = None) -> Service:
        """Listen at once (health NOT_SERVING), then load the model off the event loop."""
        metrics = Metrics(registry or CollectorRegistry())
        open_files = raise_open_file_limit()
        tokens = None if settings.auth_token_file is None else Tokens(settings.auth_token_file)
        calls = Calls(metrics, configure(settings.otlp_endpoint or None, os.environ), tokens)
        servicer = ChatServicer(calls, settings.stream_write_timeout_seconds, MAX_MESSAGE_BYTES)
        health_servicer = HealthServicer(settings.max_health_watchers)
        await set_serving(health_servicer, False)
        credentials, interceptors = security(settings, metrics, tokens)  # checks the TLS flags first
        http = None if settings.http_port < 0 else http_api(settings, calls)  # every port flag: 0 free, -1 off
        server, port = create_server(
            f"{settings.host}:{settings.port}",
            servicer,
            health_servicer,
            server_options(settings),
            credentials,
            interceptors,
            settings.max_concurrent_rpcs,
        )
        endpoint = MetricsEndpoint(metrics.registry, cache_seconds=settings.metrics_cache_seconds)
        metrics_port = (
            None if settings.metrics_port < 0 else await endpoint.start(settings.metrics_host, settings.metrics_port)
        )
        http_port = None if http is None else await http.start(settings.http_host, settings.http_port)
        lag_sampler = asyncio.create_task(metrics.sample_event_loop_lag(), name="jachat-loop-lag")
        await server.start()
        log.info("listening on %s:%d (metrics on %s), loading %s", settings.host, port, metrics_port, settings.model)
        if http_port is not None:
            log.info(
                "OpenAI-compatible HTTP API on %s://%s:%d (at most %d connections; open-file limit %d)",
                "http" if http is None or http.tls is None else "https",
                settings.http_host,
                http_port,
                settings.max_http_connections,
                open_files,
            )
        if calls.tracing.enabled:
            log.info("tracing: spans go to %s", settings.otlp_endpoint or "the OTEL_EXPORTER_OTLP_* endpoint")
        return cls(
            settings,
            server,
            port,
            metrics,
            metrics_port,
            calls,
            servicer,
            health_servicer,
            endpoint,
            lag_sampler,
            http,
            http_port,
        )

    async def load_model(self) -> Engine:
        options = EngineOptions(
            model_dir=self.settings.model,
            device=self.settings.device,
            compute_type=self.settings.compute_type,
            device_index=self.settings.device_index,
            decode_loop=self.settings.decode_loop,
            kv_cache_tokens=self.settings.kv_cache_tokens,
            prefill_tokens=self.settings.prefill_tokens_per_step,
            intra_threads=self.settings.intra_threads,
            verify_checksums=self.settings.verify_checksums,
            warm_up=self.settings.warm_up,
            scheduler=SchedulerOptions(
                max_batch_size=self.settings.max_batch_size,
                max_batch_wait=self.settings.max_batch_wait_ms / 1000,
                batch_idle=self.settings.batch_idle_ms / 1000,
                max_queued=self.settings.max_queued_requests,
                max_queued_per_tenant=self.settings.max_queued_per_tenant,
                batch_promotion=self.settings.batch_promotion_seconds,
                replicas=self.settings.replicas,
                spare_replicas=self.settings.spare_replicas,
                stagger=self.settings.stagger_batches,
                max_prompt_length_spread=self.settings.max_prompt_length_spread,
            ),
        )
        loop = asyncio.get_running_loop()

        def lost(reason: str) -> None:  # on the engine's receiver thread
            loop.call_soon_threadsafe(self._engine_lost, reason)

        engine = await asyncio.to_thread(Engine, options, self.metrics, lost)
        self.calls.attach(engine)
        self.metrics.engine_memory.set_function(lambda: engine.core.rss())  # read at each scrape
        if engine.loop:  # the share of the KV-cache budget the running rows hold, not of the replicas
            budget = max(1, engine.kv_cache_tokens)
            self.metrics.kv_cache_usage.set_function(lambda: min(1.0, engine.core.cache_used / budget))
        info = engine.info
        self.metrics.queue_capacity.set(self.settings.max_queued_requests)
        self.metrics.model_info.labels(info.model_name, info.quantization, info.compute_type, info.device).set(1)
        await set_serving(self.health, True)
        watch = EngineWatch(
            engine.core.liveness,
            self.settings.engine_stall_seconds,
            self.settings.engine_watchdog_seconds,
            self._engine_stalled,
            lambda reason: self._engine_dead(engine, reason),
        )
        self.watch = asyncio.create_task(watch.run(), name="jachat-engine-watch")
        log.info("serving %s on port %d", info.model_name, self.port)
        return engine

    async def _engine_stalled(self, serving: bool) -> None:
        """The engine stalled (or speaks again): the model's health says so, not the process's (a stall may pass;
        the watchdog ends one that does not)."""
        self.calls.stalled = not serving
        if not self.calls.draining:
            status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
            await self.health.set(CHAT_SERVICE, status)

    def _engine_dead(self, engine: Engine, reason: str) -> None:
        """The watchdog's verdict: the engine is killed (its calls end UNAVAILABLE) and the server exits 1."""
        engine.core.kill(f"watchdog: {reason}")
        self._engine_lost(f"watchdog: {reason}")

    def _engine_lost(self, reason: str) -> None:
        """The engine process died: its calls have ended UNAVAILABLE; `run` stops the server, which exits 1."""
        self.lost = reason
        self.lost_event.set()

    async def stop(self, grace: float | None = None) -> None:
        """Drain: health NOT_SERVING at once, new calls refused with UNAVAILABLE, calls in flight get `grace`
        seconds to finish; those still running then end with UNAVAILABLE. Then the model is released."""
        grace = self.settings.grace_seconds if grace is None else grace
        if self.watch is not None:
            self.watch.cancel()
        await self.health.enter_graceful_shutdown()
        await self.calls.drain(grace)  # both APIs: new calls get UNAVAILABLE / 503, calls in flight their grace
        await self.server.stop(0.5)
        if self.http is not None:
            await self.http.close()
        engine = self.calls.detach()
        if engine is not None:
            await asyncio.to_thread(engine.close)
        self.lag_sampler.cancel()
        await self.metrics_endpoint.close()
        await asyncio.to_thread(self.calls.tracing.shutdown)  # exports the spans still buffered


async def run(settings: Settings) -> None:
    """Serve until SIGTERM or SIGINT, then stop gracefully."""
    service = await Service.start(settings)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    grace = None
    try:
        loader = asyncio.create_task(service.load_model())
        stopper = asyncio.create_task(stopping.wait())
        await asyncio.wait({loader, stopper}, return_when=asyncio.FIRST_COMPLETED)
        if loader.done():
            loader.result()  # a load failure ends the process
            lost = asyncio.create_task(service.lost_event.wait())
            await asyncio.wait({stopper, lost}, return_when=asyncio.FIRST_COMPLETED)
            lost.cancel()
        else:
            loader.cancel()
        if service.lost is not None:  # nothing left to drain: stop now and exit 1, for Kubernetes to restart the pod
            grace = 0.0
            log.error("stopping: %s", service.lost)
        else:
            log.info("stopping: draining for up to %.1f s", settings.grace_seconds)
    finally:
        await service.stop(grace)
    if service.lost is not None:
        raise RuntimeError(service.lost)
