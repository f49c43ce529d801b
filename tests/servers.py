"""The one server factory of the tests: `serving(model, *flags)` yields a running jachat on free loopback ports and
always stops it. By default the server runs in this process (its own event loop on a thread): fast to start, and
enough wherever the process itself is not what is tested. `process=True` runs a real `jachat-serve` child process,
for signals, exit codes, stderr, start-up and per-process resources."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Coroutine, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar, overload

import grpc
from prometheus_client import CollectorRegistry

from jachat.bench.launcher import LoopbackServer, ServerProcess, free_port, spawn
from jachat.service.observability.logs import RequestIdFilter, TextFormatter
from jachat.service.server import Service
from jachat.service.settings import load_settings
from jachat.v1 import chat_pb2_grpc

__all__ = ["InProcessServer", "Server", "ServerProcess", "free_port", "serving", "start"]

T = TypeVar("T")


class Server(Protocol):
    """What the tests use of a server, in-process or a child process."""

    log: list[str]

    @property
    def port(self) -> int: ...
    @property
    def target(self) -> str: ...
    @property
    def metrics_port(self) -> int: ...
    @property
    def http_port(self) -> int | None: ...
    def channel(self) -> grpc.Channel: ...
    def stub(self, channel: grpc.Channel) -> chat_pb2_grpc.ChatServiceStub: ...
    def scrape(self) -> dict[str, float]: ...
    def alive(self) -> bool: ...
    def stop(self, timeout: float = 30.0) -> int: ...


class _Lines(logging.Handler):
    def __init__(self, lines: list[str]) -> None:
        super().__init__(logging.INFO)
        self.lines = lines
        self.addFilter(RequestIdFilter())
        self.setFormatter(TextFormatter())

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record) + "\n")


class InProcessServer(LoopbackServer):
    """jachat's Service on an event loop of its own, on a thread of this process."""

    def __init__(self, model: Path, *flags: str) -> None:
        args = ["--model", str(model), "--host", "127.0.0.1", "--port", "0", "--metrics-host", "127.0.0.1"]
        settings = load_settings([*args, "--metrics-port", "0", "--device", "cpu", *flags], environ={})
        self.log: list[str] = []
        self._handler = _Lines(self.log)
        self._logger = logging.getLogger("jachat")
        self._logger.addHandler(self._handler)
        self._logger.setLevel(logging.INFO)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="jachat-test-server", daemon=True)
        self._thread.start()
        self._stopped = False
        try:
            self.service = self._run(self._start(settings))
        except BaseException:
            self._close()
            raise
        assert self.service.metrics_port is not None
        self.port, self.metrics_port = self.service.port, self.service.metrics_port
        self.http_port = self.service.http_port

    async def _start(self, settings: Any) -> Service:
        service = await Service.start(settings, CollectorRegistry())
        await service.load_model()
        return service

    def _run(self, work: Coroutine[Any, Any, T], timeout: float = 120.0) -> T:
        return asyncio.run_coroutine_threadsafe(work, self._loop).result(timeout)

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The server's event loop (its edge): a test can hold it busy."""
        return self._loop

    def alive(self) -> bool:
        return not self._stopped and self._thread.is_alive()

    def stop(self, timeout: float = 30.0) -> int:
        """The graceful stop SIGTERM runs; 0 once it is done (as the process's exit code would be)."""
        if not self._stopped:
            self._stopped = True
            try:
                self._run(self.service.stop(), timeout)
            finally:
                self._close()
        return 0

    def _close(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()
        self._logger.removeHandler(self._handler)


# Tests read the metrics right after what they count: every scrape renders afresh (a test's own flag wins).
FRESH = ("--metrics-cache-seconds", "0")


@overload
def start(model: Path, *flags: str, process: Literal[True]) -> ServerProcess: ...
@overload
def start(model: Path, *flags: str, process: Literal[False] = False) -> InProcessServer: ...


def start(model: Path, *flags: str, process: bool = False) -> Server:
    """The factory: a running, SERVING server on the model with these jachat-serve flags, on the CPU (in this
    process, or as a child process with process=True). The caller stops it; `serving` does that for you."""
    flags = (*FRESH, *flags)
    return spawn(model, "--device", "cpu", *flags) if process else InProcessServer(model, *flags)


@overload
def serving(model: Path, *flags: str, process: Literal[True]) -> AbstractContextManager[ServerProcess]: ...
@overload
def serving(model: Path, *flags: str, process: Literal[False] = False) -> AbstractContextManager[InProcessServer]: ...


def serving(model: Path, *flags: str, process: bool = False) -> AbstractContextManager[Server]:
    """`start`, stopped on exit."""
    flags = (*FRESH, *flags)
    return _serving(spawn(model, "--device", "cpu", *flags) if process else InProcessServer(model, *flags))


@contextmanager
def _serving(server: Server) -> Iterator[Server]:
    try:
        yield server
    finally:
        server.stop()
