"""Run jachat-serve as a child process on free loopback ports (the benchmark and the tests use it)."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2_grpc

from jachat.v1 import chat_pb2_grpc


def free_port() -> int:
    """A loopback port free now, for a program that cannot pick its own (Prometheus in the tests)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def scrape_metrics(port: int) -> dict[str, float]:
    """The jachat_ samples of a loopback server's /metrics, by name with labels."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    samples = {}
    for line in text.splitlines():
        if line.startswith("jachat_") and " " in line:
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


def health_stub(channel: grpc.Channel | grpc.aio.Channel) -> Any:
    """grpc.health.v1's stub. Typed Any: types-grpcio-health-checking declares HealthStub without its methods."""
    return health_pb2_grpc.HealthStub(channel)


class LoopbackServer:
    """A jachat on loopback as its clients see it: where to call, a channel, a stub, its metrics."""

    port: int
    metrics_port: int

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(self.target)

    def stub(self, channel: grpc.Channel) -> chat_pb2_grpc.ChatServiceStub:
        return chat_pb2_grpc.ChatServiceStub(channel)

    def scrape(self) -> dict[str, float]:
        return scrape_metrics(self.metrics_port)


@dataclass
class ServerProcess(LoopbackServer):
    """jachat-serve as a child process."""

    process: subprocess.Popen[str]
    port: int
    metrics_port: int
    log: list[str] = field(default_factory=list)
    http_port: int | None = None  # the OpenAI-compatible HTTP API's, when --http-port turned it on

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, wait for the graceful exit (SIGKILL after timeout); returns the exit code."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process.stderr is not None:
            self.process.stderr.close()
        return self.process.returncode


def spawn(model: Path, *args: str, timeout: float = 120.0) -> ServerProcess:
    """Start `python -m jachat.service` on free loopback ports; returns once its health is SERVING."""
    cmd = [
        sys.executable,
        "-m",
        "jachat.service",
        "--model",
        str(model),
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--metrics-host",
        "127.0.0.1",
        "--metrics-port",
        "0",
        *args,
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    lines: list[str] = []
    ready = threading.Event()
    ports: dict[str, int] = {}

    def read() -> None:
        assert process.stderr is not None
        for line in process.stderr:
            lines.append(line)
            if m := re.search(r"listening on .*:(\d+) \(metrics on (\d+)\)", line):
                ports["grpc"], ports["metrics"] = int(m.group(1)), int(m.group(2))
            if m := re.search(r"HTTP API on .*:(\d+)", line):
                ports["http"] = int(m.group(1))
            if "serving" in line and " on port " in line:
                ready.set()

    threading.Thread(target=read, daemon=True).start()
    deadline = time.monotonic() + timeout
    while not ready.wait(0.1):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError("jachat-serve did not start:\n" + "".join(lines))
    return ServerProcess(process, ports["grpc"], ports["metrics"], lines, ports.get("http"))
