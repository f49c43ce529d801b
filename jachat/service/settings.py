"""Service settings: one definition that yields the command-line flags and the environment variables.

Every field `name` is the flag `--name-with-dashes` and the variable `JACHAT_NAME`; a flag beats its variable,
which beats the default.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ENV_PREFIX = "JACHAT_"
COMPUTE_TYPES = (
    "default",
    "auto",
    "int8",
    "int8_float32",
    "int8_float16",
    "int8_bfloat16",
    "int16",
    "float16",
    "bfloat16",
    "float32",
)


def _opt(help: str, **kwargs: Any) -> dict[str, Any]:
    return {"help": help, **kwargs}


@dataclass(frozen=True)
class Settings:
    model: Path = field(metadata=_opt("converted model folder (from jachat-convert)"))
    host: str = field(default="[::]", metadata=_opt("address to listen on for gRPC"))
    port: int = field(default=50051, metadata=_opt("gRPC port (0 picks a free one)"))
    metrics_host: str = field(default="0.0.0.0", metadata=_opt("address for the Prometheus /metrics endpoint"))
    metrics_port: int = field(default=9090, metadata=_opt("port for /metrics (0 picks a free one, -1 disables)"))
    metrics_cache_seconds: float = field(
        default=1.0,
        metadata=_opt("a /metrics render is reused this long, so a storm of scrapes costs one render (0: never)"),
    )
    device: str = field(default="auto", metadata=_opt("where to run the model", choices=("auto", "cpu", "cuda")))
    compute_type: str = field(
        default="default",
        metadata=_opt(
            "CTranslate2 compute type; default keeps the converted type (an unsupported one falls back, logged)",
            choices=COMPUTE_TYPES,
        ),
    )
    device_index: int = field(default=0, metadata=_opt("GPU index"))
    decode_loop: str = field(
        default="auto",
        metadata=_opt(
            "auto: jachat's decode loop on the native decoder (scripts/build-native), calls joining one running "
            "batch at any step, where it is built and passes its start-up self-test, else static, said in one line; "
            "native: the loop, or the start fails; static: CTranslate2's generate_batch, fixed batches",
            choices=("static", "native", "auto"),
        ),
    )
    prefill_tokens_per_step: int = field(
        default=64,
        metadata=_opt(
            "the decode loop's prompt tokens prefilled between two steps beyond the first waiting call's (which is "
            "always admitted when there is room): fewer hold the running rows less per step and spread a burst of "
            "arrivals over steps"
        ),
    )
    kv_cache_tokens: int = field(
        default=0,
        metadata=_opt(
            "the decode loop's KV cache, in positions (rows x the longest row: the cache is dense); a call that "
            "cannot fit alone is refused, rows that do not fit beside the running ones wait; 0: half the memory "
            "free once the model is loaded, at most rows x context"
        ),
    )
    intra_threads: int = field(
        default=0, metadata=_opt("CPU threads per replica (0: auto, the CPU cores shared out among the replicas)")
    )
    max_batch_size: int = field(
        default=16, metadata=_opt("most calls in one batch: the decode loop's row limit, or a static batch's size")
    )
    max_batch_wait_ms: float = field(
        default=50.0,
        metadata=_opt("static batches: the longest a batch waits for more requests, from its oldest request's arrival"),
    )
    batch_idle_ms: float = field(
        default=2.0, metadata=_opt("static batches: a batch starts once no request has arrived for this long")
    )
    max_queued_requests: int = field(
        default=256, metadata=_opt("requests that may wait for a batch; more are refused with RESOURCE_EXHAUSTED")
    )
    replicas: int = field(
        default=0,
        metadata=_opt(
            "CTranslate2 replicas sharing the weights (inter_threads): batches that run at the same time "
            "(0: auto, one per CPU core up to 4 on CPU, 1 on GPU)"
        ),
    )
    spare_replicas: int = field(
        default=0,
        metadata=_opt(
            "replicas beyond --replicas that take a batch only while the load is light (all replicas busy, at most "
            "2 calls waiting, no batch about to end): an arrival starts at once instead of waiting a whole reply, "
            "sharing the cores meanwhile (measured worse on a 2-core CPU; see the README)"
        ),
    )
    stagger_batches: bool = field(
        default=True,
        metadata=_opt(
            "static batches: under load (a running batch of 2 or more calls), start a batch half a batch after the "
            "last one, so the replicas free in turn rather than together"
        ),
    )
    batch_promotion_seconds: float = field(
        default=10.0,
        metadata=_opt(
            "a batch call that has waited this long competes as an interactive one, so interactive load can delay "
            "batch work but never starve it"
        ),
    )
    max_queued_per_tenant: int = field(
        default=64,
        metadata=_opt(
            "requests one tenant may have waiting (its token's name, or x-jachat-tenant without auth), so no tenant "
            "fills the queue; more get RESOURCE_EXHAUSTED"
        ),
    )
    max_prompt_length_spread: int = field(
        default=64,
        metadata=_opt(
            "most prompt tokens by which requests in one batch may differ (the excess is decoded step by step)"
        ),
    )
    max_connection_age_seconds: float = field(
        default=0.0,
        metadata=_opt(
            "close client connections after this long (0: never), so clients reconnect and spread over new pods; "
            "calls in flight get --max-connection-age-grace-seconds to finish"
        ),
    )
    max_connection_age_grace_seconds: float = field(
        default=300.0, metadata=_opt("how long calls may finish on a connection past its max age")
    )
    max_concurrent_rpcs: int = field(
        default=1024,
        metadata=_opt(
            "calls in progress at once on this server, health and streams included; more get RESOURCE_EXHAUSTED "
            "(above --max-queued-requests, so generation calls meet the queue limit first)"
        ),
    )
    max_streams_per_connection: int = field(
        default=128, metadata=_opt("concurrent calls one client connection may open (HTTP/2 max concurrent streams)")
    )
    max_health_watchers: int = field(
        default=64, metadata=_opt("grpc.health.v1 Watch streams at once (unauthenticated); more get RESOURCE_EXHAUSTED")
    )
    stream_write_timeout_seconds: float = field(
        default=30.0,
        metadata=_opt(
            "a GenerateStream whose client reads nothing for this long is ended (DEADLINE_EXCEEDED) and stops "
            "counting as running"
        ),
    )
    http_port: int = field(
        default=-1,
        metadata=_opt(
            "port of the OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions, /v1/models, /health) on "
            "--http-host; "
            "0 picks a free one, -1 (the default) turns it off (needs the http extra: pip install 'jachat[http]')"
        ),
    )
    completions: bool = field(
        default=True,
        metadata=_opt(
            "serve /v1/completions on the HTTP port: raw prompts, written whole by the caller, so the chat format's "
            "turn defence cannot apply (false: the route answers 404, for deployments that rely on turn integrity)"
        ),
    )
    http_host: str = field(default="0.0.0.0", metadata=_opt("address to listen on for the HTTP API"))
    http_request_timeout_seconds: float = field(
        default=600.0,
        metadata=_opt(
            "the longest an HTTP call may run (HTTP carries no deadline; a caller may ask for less with the "
            "x-jachat-timeout header, in seconds); past it the call gets 504"
        ),
    )
    max_http_connections: int = field(
        default=1024,
        metadata=_opt(
            "HTTP connections open at once; one more takes the place of the slowest that is not being answered, "
            "else only GET /health is answered on it (the soft open-file limit is raised to the hard one at "
            "start-up, so this cap decides, not the limit)"
        ),
    )
    max_http_connections_per_peer: int = field(
        default=0,
        metadata=_opt(
            "HTTP connections one peer address may hold (0: a quarter of --max-http-connections), so one client "
            "cannot take every place; behind a gateway, whose addresses are the peers, raise it"
        ),
    )
    otlp_endpoint: str = field(
        default="",
        metadata=_opt(
            "OpenTelemetry collector for traces (OTLP over gRPC, e.g. http://otel-collector:4317); empty: the "
            "OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT variables, else no tracing (needs the tracing extra)"
        ),
    )
    tls_cert: Path | None = field(default=None, metadata=_opt("PEM certificate chain: serve TLS (reloaded on change)"))
    tls_key: Path | None = field(default=None, metadata=_opt("PEM private key for --tls-cert"))
    tls_client_ca: Path | None = field(
        default=None, metadata=_opt("PEM CA bundle: require client certificates signed by it (mutual TLS)")
    )
    http_plaintext: bool = field(
        default=False,
        metadata=_opt(
            "serve the HTTP API without TLS even when --tls-cert is set (only where something in front of it "
            "terminates TLS: the bearer tokens cross this port)"
        ),
    )
    auth_token_file: Path | None = field(
        default=None,
        metadata=_opt("file of bearer tokens, one per line: calls (not health, reflection) must carry one"),
    )
    verify_checksums: bool = field(default=True, metadata=_opt("check the model files against the manifest"))
    warm_up: bool = field(
        default=True,
        metadata=_opt(
            "static batches: before health turns SERVING, each replica generates a few tokens at the shapes that "
            "bring the kernels in (on a GPU the wheel's kernels are JIT-compiled at first use), so the first caller "
            "does not pay (the decode loop's start-up self-test runs its decoder instead)"
        ),
    )
    grace_seconds: float = field(default=10.0, metadata=_opt("on SIGTERM, how long in-flight calls may finish"))
    engine_stall_seconds: float = field(
        default=3.0,
        metadata=_opt(
            "health (jachat.v1.ChatService, and HTTP /health) turns NOT_SERVING while the engine process has said "
            "nothing for this long (it speaks at least twice a second: a hung device call, a stopped or "
            "page-thrashing process), and SERVING again when it speaks"
        ),
    )
    engine_watchdog_seconds: float = field(
        default=120.0,
        metadata=_opt(
            "the server kills the engine and exits 1 when the engine has said nothing, or made no progress while "
            "work is in flight (no token, no scoring piece, no job's end), for this long (0: never); a batch's "
            "first token waits for its prompts: on a CPU, very long prompts of a large model may need more"
        ),
    )
    log_format: str = field(
        default="text", metadata=_opt("log lines as plain text or JSON (one object per line)", choices=("text", "json"))
    )
    log_level: str = field(default="info", metadata=_opt("log level", choices=("debug", "info", "warning", "error")))


def env_name(name: str) -> str:
    return ENV_PREFIX + name.upper()


def env_names() -> list[str]:
    """Every environment variable the service reads."""
    return [env_name(f.name) for f in dataclasses.fields(Settings)]


def _parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _converter(f: dataclasses.Field[Any]) -> Any:
    kind = {"Path": Path, "Path | None": Path, "int": int, "float": float, "bool": _parse_bool}.get(str(f.type), str)
    return kind


def build_parser(environ: Mapping[str, str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jachat-serve",
        description="Serve rinna's chat model over gRPC (jachat.v1.ChatService). Every flag can also be set "
        f"through an environment variable {ENV_PREFIX}<FLAG> (e.g. {ENV_PREFIX}PORT).",
    )
    for f in dataclasses.fields(Settings):
        flag = "--" + f.name.replace("_", "-")
        env = env_name(f.name)
        convert = _converter(f)
        kwargs: dict[str, Any] = {"type": convert, "dest": f.name}
        if "choices" in f.metadata:
            kwargs["choices"] = f.metadata["choices"]
        if env in environ:
            try:
                kwargs["default"] = convert(environ[env])
            except (ValueError, argparse.ArgumentTypeError) as exc:
                parser.error(f"{env}={environ[env]!r}: {exc}")
        elif f.default is not dataclasses.MISSING:
            kwargs["default"] = f.default
        else:
            kwargs["required"] = True
        default_text = "required" if kwargs.get("required") else f"default: {kwargs['default']}"
        kwargs["help"] = f"{f.metadata['help']} (env {env}; {default_text})"
        if convert is _parse_bool:
            kwargs["metavar"] = "{true,false}"
        parser.add_argument(flag, **kwargs)
    return parser


def load_settings(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    environ = os.environ if environ is None else environ
    args = build_parser(environ).parse_args(argv)
    return Settings(**vars(args))
