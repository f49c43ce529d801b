"""Server lifecycle in-process (health before and after load) and the command-line programs as processes."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2
from prometheus_client import CollectorRegistry

from jachat.service.server import Service
from jachat.service.settings import Settings, env_names, load_settings
from jachat.v1 import chat_pb2, chat_pb2_grpc
from tests.helpers import details, health_stub, user, wait_until
from tests.servers import Server, serving, start


def test_health_is_not_serving_until_the_model_is_loaded(model_f32: Path) -> None:
    async def scenario() -> None:
        settings = Settings(model=model_f32, host="127.0.0.1", port=0, metrics_port=-1, device="cpu")
        service = await Service.start(settings, CollectorRegistry())
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{service.port}") as channel:
                health = health_stub(channel)
                chat = chat_pb2_grpc.ChatServiceStub(channel)
                before = await health.Check(health_pb2.HealthCheckRequest(service="jachat.v1.ChatService"))
                assert before.status == health_pb2.HealthCheckResponse.NOT_SERVING
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await chat.Generate(chat_pb2.GenerateRequest(turns=[user("やあ")]))
                assert info.value.code() == grpc.StatusCode.UNAVAILABLE
                assert "loading" in (details(info.value) or "")
                await service.load_model()
                after = await health.Check(health_pb2.HealthCheckRequest(service=""))
                assert after.status == health_pb2.HealthCheckResponse.SERVING
                reply = await chat.Generate(
                    chat_pb2.GenerateRequest(turns=[user("やあ")], sampling=chat_pb2.SamplingParams(max_new_tokens=3))
                )
                assert reply.usage.completion_tokens >= 1
        finally:
            await service.stop(grace=1)

    asyncio.run(scenario())


def test_every_flag_has_an_environment_variable(tmp_path: Path) -> None:
    environ = {
        "JACHAT_MODEL": str(tmp_path),
        "JACHAT_PORT": "6000",
        "JACHAT_DEVICE": "cpu",
        "JACHAT_VERIFY_CHECKSUMS": "false",
        "JACHAT_GRACE_SECONDS": "2.5",
    }
    settings = load_settings([], environ)
    assert (settings.model, settings.port, settings.device) == (tmp_path, 6000, "cpu")
    assert settings.verify_checksums is False and settings.grace_seconds == 2.5
    assert load_settings(["--port", "7000"], environ).port == 7000  # a flag beats its variable
    assert "JACHAT_METRICS_PORT" in env_names() and "JACHAT_COMPUTE_TYPE" in env_names()
    help_text = subprocess.run(
        [sys.executable, "-m", "jachat.service", "--help"], capture_output=True, text=True
    ).stdout
    for name in env_names():
        assert name in help_text


def test_serve_fails_with_one_clear_line_when_the_model_is_missing(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    result = subprocess.run(
        [sys.executable, "-m", "jachat.service", "--model", str(missing), "--port", "0", "--metrics-port", "-1"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("jachat-serve: error:")]
    assert len(errors) == 1 and str(missing) in errors[0] and "jachat-convert" in errors[0]
    assert "Traceback" not in result.stderr


def test_sigterm_drains_and_exits_zero(model_f32: Path) -> None:
    from tests.servers import start

    server = start(model_f32, "--grace-seconds", "5", process=True)  # SIGTERM: a real process
    assert server.stop() == 0
    assert any("stopping" in line for line in server.log)


def test_chat_client_whose_reader_goes_away_ends_quietly(server: Server) -> None:
    """`jachat-chat ... | head -c 10`: the pipe closes mid-reply; the client stops with status 0, no traceback."""
    command = ["jachat-chat", "--target", server.target, "--temperature", "0", "--max-new-tokens", "64", "こんにちは"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert process.stdout is not None and process.stderr is not None
    process.stdout.close()  # the reader is gone before the first token
    assert process.wait(timeout=60) == 0
    with process.stderr:
        assert process.stderr.read() == b""


def test_chat_client_streams_one_reply(server: Server) -> None:
    result = subprocess.run(
        ["jachat-chat", "--target", server.target, "--temperature", "0", "--max-new-tokens", "8", "こんにちは"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    with server.channel() as channel:
        expected = (
            server.stub(channel)
            .Generate(
                chat_pb2.GenerateRequest(
                    turns=[user("こんにちは")], sampling=chat_pb2.SamplingParams(temperature=0, max_new_tokens=8)
                ),
                timeout=30,
            )
            .text
        )
    assert result.stdout == expected + "\n"


def test_chat_client_prints_each_token_with_its_logprob(server: Server) -> None:
    command = ["jachat-chat", "--target", server.target, "--temperature", "0", "--max-new-tokens", "5", "--logprobs"]
    result = subprocess.run([*command, "こんにちは"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    with server.channel() as channel:
        request = chat_pb2.GenerateRequest(
            turns=[user("こんにちは")],
            sampling=chat_pb2.SamplingParams(temperature=0, max_new_tokens=5),
            response=chat_pb2.ResponseOptions(token_logprobs=True),
        )
        reply = server.stub(channel).Generate(request, timeout=30)
    rows = [line.split(maxsplit=2) for line in result.stdout.splitlines()[1:]]
    assert [(int(i), float(lp)) for i, lp, *_ in rows] == [(t.id, round(t.logprob, 4)) for t in reply.tokens]
    assert result.stdout.splitlines()[0] == reply.text


def test_chat_client_interactive_keeps_the_history(server: Server) -> None:
    result = subprocess.run(
        ["jachat-chat", "--target", server.target, "--temperature", "0", "--max-new-tokens", "4"],
        input="こんにちは\n元気ですか?\n/quit\n",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    with server.channel() as channel:
        stub = server.stub(channel)
        params = chat_pb2.SamplingParams(temperature=0, max_new_tokens=4)
        first = stub.Generate(chat_pb2.GenerateRequest(turns=[user("こんにちは")], sampling=params)).text
        history = [user("こんにちは"), chat_pb2.Turn(speaker=chat_pb2.SPEAKER_SYSTEM, text=first), user("元気ですか?")]
        second = stub.Generate(chat_pb2.GenerateRequest(turns=history, sampling=params)).text
        alone = stub.Generate(chat_pb2.GenerateRequest(turns=[user("元気ですか?")], sampling=params)).text
    assert second != alone  # so the transcript below can only come from a client that kept the history
    assert f"システム> {first}\n" in result.stdout
    assert f"システム> {second}\n" in result.stdout  # the second reply saw the first exchange


def test_chat_client_reports_errors(tmp_path: Path) -> None:
    result = subprocess.run(
        ["jachat-chat", "--target", "127.0.0.1:1", "--timeout", "3", "やあ"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ},
    )
    assert result.returncode == 1 and "UNAVAILABLE" in result.stderr


def test_max_connection_age_closes_connections_and_calls_in_flight_finish(model_f32: Path) -> None:
    """Clients reconnect (and spread over pods) when the server ends a connection at its max age."""
    import threading
    import time

    from tests.helpers import greedy

    age = 0.25  # well below the call's length on any machine (1900 tokens took 0.9 s on a fast 2-core one)
    server = start(model_f32, "--max-connection-age-seconds", str(age), "--max-connection-age-grace-seconds", "30")
    try:
        states: list[grpc.ChannelConnectivity] = []
        with grpc.insecure_channel(server.target) as channel:
            channel.subscribe(states.append, try_to_connect=True)
            stub = chat_pb2_grpc.ChatServiceStub(channel)
            long = chat_pb2.GenerateRequest(turns=[user("やあ")], sampling=greedy(1900, min_new_tokens=1900))
            replies: list[chat_pb2.GenerateResponse] = []
            started = time.monotonic()
            worker = threading.Thread(target=lambda: replies.append(stub.Generate(long, timeout=60)))
            worker.start()
            worker.join(60)
            took = time.monotonic() - started
            assert replies and replies[0].usage.completion_tokens == 1900
            assert took > age + 0.1, f"the call took {took:.2f} s: too short to outlive the {age} s max age"
            wait_until(
                lambda: grpc.ChannelConnectivity.IDLE in states[1:],
                "the server closed the connection at its max age (the channel IDLE again)",
                timeout=10,
            )
            again = stub.Generate(chat_pb2.GenerateRequest(turns=[user("やあ")], sampling=greedy(2)), timeout=30)
            assert again.usage.completion_tokens == 2  # and the client simply reconnected
    finally:
        assert server.stop() == 0


def test_sigterm_drain_finishes_short_calls_ends_long_ones_and_exits_zero(model_f32: Path) -> None:
    """SIGTERM: health NOT_SERVING, new calls UNAVAILABLE, in-flight calls get the grace to finish, the rest end
    with UNAVAILABLE (not at their own end), and the process exits 0. (The short call needs ~0.1 s, the long one
    over 1 s, the grace is 0.5 s.)"""
    import threading

    from tests.helpers import greedy

    server = start(model_f32, "--grace-seconds", "0.5", process=True)  # SIGTERM: a real process
    outcomes: dict[str, object] = {}
    with grpc.insecure_channel(server.target) as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        health = health_stub(channel)

        def stream(name: str, tokens: int) -> None:
            request = chat_pb2.GenerateStreamRequest(
                turns=[user("やあ")], sampling=greedy(tokens, min_new_tokens=tokens)
            )
            try:
                outcomes[name] = list(stub.GenerateStream(request, timeout=30))[-1].usage.completion_tokens
            except grpc.RpcError as exc:
                outcomes[name] = exc.code()

        workers = [
            threading.Thread(target=stream, args=("long", 1900)),
            threading.Thread(target=stream, args=("short", 60)),
        ]
        for w in workers:
            w.start()
        wait_until(lambda: server.scrape().get("jachat_running_requests") == 2, "both streams generating")
        server.process.terminate()

        def serving_status() -> int:
            reply = health.Check(health_pb2.HealthCheckRequest(service="jachat.v1.ChatService"), timeout=1)
            return int(reply.status)

        wait_until(lambda: serving_status() == health_pb2.HealthCheckResponse.NOT_SERVING, "health NOT_SERVING")
        with pytest.raises(grpc.RpcError) as refused:
            stub.Generate(chat_pb2.GenerateRequest(turns=[user("やあ")], sampling=greedy(2)), timeout=5)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE and "shutting down" in details(refused.value)
        for w in workers:
            w.join(30)
    assert server.process.wait(30) == 0
    # the short stream finished within the grace; the long one (1900 tokens) was ended when the grace ran out
    assert outcomes == {"short": 60, "long": grpc.StatusCode.UNAVAILABLE}, outcomes
    server.stop()


def _serve_and_fail(model: Path, *args: str, port: int = 0) -> str:
    """Run jachat-serve expecting it to fail at start; returns its one error line."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "jachat.service",
            "--model",
            str(model),
            "--port",
            str(port),
            "--metrics-port",
            "-1",
            "--device",
            "cpu",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("jachat-serve: error:")]
    assert len(errors) == 1, result.stderr
    return errors[0]


def test_start_up_failures_exit_with_one_clear_line(
    model_f32: Path, demo_checkpoint_split_nl: Path, tmp_path: Path
) -> None:
    import json
    import shutil
    import socket

    from jachat.manifest import MANIFEST_NAME, checksum_folder

    corrupt = tmp_path / "corrupt"
    shutil.copytree(model_f32, corrupt)
    with (corrupt / "model.bin").open("r+b") as f:
        f.seek(4096)
        f.write(b"\xff" * 16)
    line = _serve_and_fail(corrupt)
    assert "model.bin: sha256 mismatch" in line and str(corrupt) in line

    truncated = tmp_path / "truncated"
    shutil.copytree(model_f32, truncated)
    with (truncated / "model.bin").open("r+b") as f:
        f.truncate(1000)
    line = _serve_and_fail(truncated, "--verify-checksums", "false")  # so the engine itself meets the damage
    assert str(truncated) in line

    mismatched = tmp_path / "mismatched"
    shutil.copytree(model_f32, mismatched)
    shutil.copy(demo_checkpoint_split_nl / "spiece.model", mismatched / "spiece.model")  # another vocabulary
    manifest = json.loads((mismatched / MANIFEST_NAME).read_text())
    manifest["files"] = checksum_folder(mismatched)  # checksums agree: only the vocabularies differ
    (mismatched / MANIFEST_NAME).write_text(json.dumps(manifest))
    line = _serve_and_fail(mismatched)
    assert "does not match the model's vocabulary" in line and "first difference at id" in line

    # a manifest that vouches for nothing, or for too little, or for an impossible shape, is refused
    cases: list[tuple[str, Callable[[dict[str, Any]], object], str]] = [
        ("empty-files", lambda m: m.update(files={}), "no checksum for model.bin, config.json, vocabulary.json"),
        ("partial-files", lambda m: m["files"].pop("model.bin"), "no checksum for model.bin"),
        ("no-context", lambda m: m["shape"].update(context_length=0), "context_length is 0"),
        ("no-heads", lambda m: m["shape"].update(num_heads=0), "num_heads is 0"),
    ]
    for name, change, expected in cases:
        broken = tmp_path / name
        shutil.copytree(model_f32, broken)
        manifest = json.loads((broken / MANIFEST_NAME).read_text())
        change(manifest)
        (broken / MANIFEST_NAME).write_text(json.dumps(manifest))
        with (broken / "model.bin").open("r+b") as f:  # damaged too: an incomplete manifest must not hide it
            f.seek(4096)
            f.write(b"\xff" * 16)
        line = _serve_and_fail(broken)
        assert expected in line and str(broken) in line, line

    with socket.socket(socket.AF_INET6 if socket.has_ipv6 else socket.AF_INET) as taken:
        taken.bind(("::" if socket.has_ipv6 else "0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        line = _serve_and_fail(model_f32, port=port)
    assert str(port) in line


def test_a_stream_in_flight_at_sigterm_finishes_within_the_grace(model_f32: Path) -> None:
    """The drain refuses new calls, not the messages of calls already running (each message of a stream still needs
    the model's pieces for its tokens)."""
    import threading

    from tests.helpers import greedy

    server = start(model_f32, "--grace-seconds", "30", process=True)  # SIGTERM: a real process
    received: list[chat_pb2.GenerateStreamResponse] = []
    errors: list[grpc.RpcError] = []
    started = threading.Event()
    with grpc.insecure_channel(server.target) as channel:
        request = chat_pb2.GenerateStreamRequest(turns=[user("やあ")], sampling=greedy(1500, min_new_tokens=1500))

        def read() -> None:
            try:
                for message in server.stub(channel).GenerateStream(request, timeout=60):
                    received.append(message)
                    started.set()
            except grpc.RpcError as exc:
                errors.append(exc)
                started.set()

        reader = threading.Thread(target=read)
        reader.start()
        assert started.wait(30)
        server.process.terminate()
        reader.join(60)
    assert not errors, errors
    assert received[-1].usage.completion_tokens == 1500
    assert sum(len(m.tokens) for m in received) == 1500
    assert server.process.wait(30) == 0


def test_asking_for_a_gpu_where_there_is_none_is_one_line(model_f32: Path) -> None:
    """--device cuda on a machine without a GPU (or without a driver): one line, no traceback, exit 1."""
    import ctranslate2

    if ctranslate2.get_cuda_device_count() > 0:
        pytest.skip("this machine has a GPU")
    line = _serve_and_fail(model_f32, "--device", "cuda")
    assert "--device cuda, but" in line and ("no NVIDIA driver" in line or "sees no GPU" in line), line


def test_every_replica_warms_up_before_health_turns_serving(model_f32: Path) -> None:
    """The warm start runs inside the model load, before SERVING, on every replica, and says how long it took;
    --warm-up false skips it."""
    with serving(model_f32, "--replicas", "2", "--decode-loop", "static") as warm:
        lines = warm.log
        warmed = next(i for i, line in enumerate(lines) if "warm start:" in line)
        serving_at = next(i for i, line in enumerate(lines) if "serving " in line and " on port " in line)
        assert warmed < serving_at
        assert re.search(
            r"warm start: \d+ shapes \(batches up to \d+, prompts up to \d+ tokens\) on 2 replicas in", lines[warmed]
        )
    with serving(model_f32, "--warm-up", "false") as cold:
        assert not any("warm start:" in line for line in cold.log)


def test_the_soft_open_file_limit_is_raised_to_the_hard_one_at_start_up() -> None:
    """A soft limit of 1024 (a common container default) would let a thousand idle connections make every
    accept() fail, gRPC health checks included; the server lifts it to the hard limit."""
    import resource

    from jachat.service.server import raise_open_file_limit

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    lowered = min(soft, 256)
    resource.setrlimit(resource.RLIMIT_NOFILE, (lowered, hard))
    try:
        assert raise_open_file_limit() == (hard if hard != resource.RLIM_INFINITY else lowered)
        assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == (hard if hard != resource.RLIM_INFINITY else lowered)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
