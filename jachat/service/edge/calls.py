"""The one call frame, and the calls in flight, whichever edge took them (gRPC or the OpenAI-compatible HTTP API).

Both edges share one `Calls`: the engine (refused while it loads or once the server drains), the count of calls in
flight that the drain waits for, and the steps of a call that do not depend on the protocol. `Calls.serve` is the
frame of every RPC and route: it resolves the caller (request id, token, tenant), counts the call in flight, opens
its span, keeps the call's deadline from the moment it arrived (whatever the work waits for: the body, the queue, a
stalled engine), tells a cancel from a deadline, logs a bug's traceback, and records the end (metrics, log line,
span) exactly once under the API's label, for every outcome. An edge passes only its work and how to render a
failure; it never ends a call itself.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import TypeVar

from jachat.service.domain.errors import (
    DeadlineExceeded,
    FieldPath,
    InvalidRequest,
    JachatError,
    Kind,
    ModelNotReady,
    ShuttingDown,
    WriteStalled,
    dotted,
    message,
)
from jachat.service.domain.request import ChatRequest, ScoreRequest, TextRequest
from jachat.service.domain.results import (
    DEADLINE_SLACK,
    Completion,
    Delta,
    GeneratedToken,
    Priority,
    PromptScores,
    Scored,
)
from jachat.service.edge.identity import Headers, Tokens, request_id_from, tenant_of
from jachat.service.engine.engine import Engine
from jachat.service.engine.preparation import PreparedRequest, Prompt
from jachat.service.observability.logs import request_id
from jachat.service.observability.metrics import Metrics
from jachat.service.observability.tracing import Span, Tracing
from jachat.service.text.prompt import Turn

log = logging.getLogger("jachat.calls")
R = TypeVar("R")

# outcomes (canonical code names, for both APIs) that mean the request was refused: jachat_rejected_total{reason}
REJECTIONS = {
    "INVALID_ARGUMENT": "invalid",
    "RESOURCE_EXHAUSTED": "overloaded",
    "UNAVAILABLE": "unavailable",
    "UNAUTHENTICATED": "unauthenticated",
    "NOT_FOUND": "invalid",
}


@dataclass(frozen=True)
class Opening:
    """How an edge opens a call: what the frame needs to know of its transport."""

    api: str  # "grpc" or "http": labels its metrics, log line and span
    method: str  # the RPC's name, or the HTTP route
    span_name: str
    headers: Headers  # gRPC metadata or HTTP headers: request id, token, tenant, traceparent
    timeout: float | None = None  # seconds the caller gave the call, to tell its deadline from a cancel
    authenticated: str | None = None  # the tenant the transport has already authenticated
    gone: tuple[type[BaseException], ...] = ()  # the transport's own "the caller is gone" errors
    spell: Callable[[FieldPath], str] = dotted  # how this API names a request field


@dataclass
class Call:
    """One call: who made it, through which API, and what its frame learns while it runs."""

    api: str  # "grpc" or "http": labels its metrics, log line and span
    method: str  # the RPC's name, or the HTTP route
    request_id: str
    span: Span
    priority: Priority = Priority.INTERACTIVE
    tenant: str = "default"
    # the engine's pieces, taken when the call starts: a call in flight keeps them through a drain, when engine()
    # refuses new work
    pieces: Sequence[str] = ()
    token_bytes: Sequence[bytes] = ()  # each token's UTF-8 bytes (OpenAI's logprobs)
    received: float = field(default_factory=time.monotonic)  # the server's receipt of the call (timings' origin)
    started: float = field(default_factory=time.perf_counter)
    ended: bool = False
    deadline: float | None = None  # monotonic time by which the caller's deadline passes
    answered: bool = False  # the whole answer was written: a caller that leaves now has had it (OK)


class Calls:
    def __init__(self, metrics: Metrics, tracing: Tracing | None = None, tokens: Tokens | None = None) -> None:
        self.metrics = metrics
        self.tracing = tracing or Tracing()
        self.tokens = tokens  # bearer tokens (None: no auth), the same for both edges
        self.engine_: Engine | None = None
        self.draining = False
        self.stalled = False  # the engine has been silent too long (watch.py): health says NOT_SERVING
        self.in_flight = 0
        self.idle = asyncio.Event()
        self.idle.set()

    def attach(self, engine: Engine) -> None:
        self.engine_ = engine

    @property
    def serving(self) -> bool:
        """What health says of the model: loaded, not draining, its engine not stalled."""
        return self.engine_ is not None and not self.draining and not self.stalled

    def engine(self) -> Engine:
        """The engine for a new piece of work: refused while the model loads and once the server drains."""
        if self.draining:
            raise ShuttingDown("the server is shutting down; retry on another replica")
        if self.engine_ is None:
            raise ModelNotReady("the model is still loading; retry shortly")
        return self.engine_

    async def serve(
        self,
        opening: Opening,
        work: Callable[[Call], Awaitable[R]],
        render: Callable[[Call, BaseException], Awaitable[R]],
    ) -> R:
        """The frame of every call of either edge: `work` runs the call; `render` turns a failure into the edge's
        answer (an error status or body), after the outcome is recorded. A caller that goes away (a cancel, or its
        deadline) is recorded as such and the cancellation goes on up.

        Each call runs in a task of its own, with its own copy of the context, so the request id is never reset: a
        stream's generator may be closed from another context, where reset() raises."""
        rid = request_id_from(opening.headers)
        request_id.set(rid)
        attributes = {"jachat.api": opening.api, "jachat.request_id": rid}
        span = self.tracing.start_call(opening.span_name, opening.headers, attributes)
        call = Call(opening.api, opening.method, rid, span)
        if opening.timeout is not None:
            call.deadline = call.received + opening.timeout
        self.in_flight += 1
        self.idle.clear()
        try:
            try:
                call.tenant = tenant_of(opening.headers, self.tokens, opening.authenticated)
                result = await within(call, work)
            except (asyncio.CancelledError, GeneratorExit, *opening.gone) as exc:  # type: ignore[misc]
                expired = call.deadline is not None and time.monotonic() + DEADLINE_SLACK >= call.deadline
                self.end(call, "OK" if call.answered else Kind.DEADLINE if expired else Kind.CANCELLED)
                if isinstance(exc, opening.gone):
                    raise asyncio.CancelledError from None
                raise
            except Exception as exc:
                if not isinstance(exc, JachatError):
                    log.exception("%s %s failed", opening.api, opening.method)
                self.end(call, kind_of(exc), describe(exc, opening.spell))
                return await render(call, exc)
            self.end(call, "OK")
            return result
        finally:
            self.in_flight -= 1
            if self.in_flight == 0:
                self.idle.set()
            if not call.ended:  # the edge did not get to say how it ended: the caller went away
                self.end(call, Kind.CANCELLED)

    def end(self, call: Call, outcome: Kind | str, error: str | None = None) -> None:
        """Record how the call ended, once: metrics, the log line, the span. The outcome is a canonical code name
        for both APIs ("OK" or a Kind), so one error-ratio alert covers them; `error` is the message a failed call
        was given."""
        if call.ended:
            return
        code = outcome.value if isinstance(outcome, Kind) else outcome
        call.ended = True
        seconds = time.perf_counter() - call.started
        if code in REJECTIONS:  # (gRPC's refused tokens never get here: its interceptor counts them)
            self.metrics.rejected.labels(REJECTIONS[code], call.priority.value, call.api).inc()
        self.metrics.requests.labels(call.api, call.method, code).inc()
        self.metrics.request_duration.labels(call.api, call.method).observe(seconds)
        call.span.set_attributes({"jachat.tenant": call.tenant, "jachat.priority": call.priority.value})
        self.tracing.end(call.span, code, error)
        log.info(
            "%s %s %s in %.1f ms",
            call.api,
            call.method,
            code,
            seconds * 1000,
            extra={"api": call.api, "rpc": call.method, "code": code, "duration_ms": round(seconds * 1000, 1)},
        )

    def admit(self, call: Call) -> Engine:
        """The door of a call's model work: the engine, the queue's room first (a full server refuses before doing
        any work), and the vocabulary the edge spells the call's tokens with."""
        engine = self.engine()
        engine.check_capacity(call.priority, call.tenant)
        call.pieces, call.token_bytes = engine.tokenizer.pieces, engine.tokenizer.token_bytes
        return engine

    async def prepare(self, call: Call, request: ChatRequest) -> PreparedRequest:
        """Through the door (`admit`), then request preparation, in a span."""
        engine = self.admit(call)
        with self.tracing.child(call.span, "jachat.prepare") as span:
            prepared = await engine.prepare(request)
            span.set_attribute("gen_ai.usage.input_tokens", len(prepared.prompt.ids))
        return prepared

    async def prepare_text(self, call: Call, request: TextRequest, where: FieldPath = ("prompt",)) -> PreparedRequest:
        """A raw prompt's preparation (a completions call), through the door (`admit`), in a span."""
        engine = self.admit(call)
        with self.tracing.child(call.span, "jachat.prepare") as span:
            prepared = await engine.prepare_text(request, where)
            span.set_attribute("gen_ai.usage.input_tokens", len(prepared.prompt.ids))
        return prepared

    async def score_prompts(self, call: Call, prompts: list[list[int]], top: bool) -> list[PromptScores]:
        """Prepared prompts' own log-probabilities (a completion's echo): one scoring job through the door
        (`admit`), in a span."""
        engine = self.admit(call)
        with self.tracing.child(call.span, "jachat.score") as span, self._running():
            scores = await engine.score_prompts(prompts, top, call.deadline, call.priority, call.tenant)
            span.set_attribute("gen_ai.usage.input_tokens", sum(map(len, prompts)))
        return scores

    async def score(self, call: Call, request: ScoreRequest) -> Scored:
        """Scoring, through the same door (`admit`), in a span."""
        engine = self.admit(call)
        with self.tracing.child(call.span, "jachat.score") as span, self._running():
            scored = await engine.score(request, call.deadline, call.priority, call.tenant)
            span.set_attribute("gen_ai.usage.input_tokens", scored.prompt_tokens)
        return scored

    @contextmanager
    def _running(self) -> Iterator[None]:
        """The call's model work counts as running (jachat_running_requests) while it lasts."""
        self.metrics.running.inc()
        try:
            yield
        finally:
            self.metrics.running.dec()

    async def tokenize(self, call: Call, turns: Sequence[Turn]) -> Prompt:
        """Tokenize's preparation, through the same door (`admit`), then the pool, in a span."""
        engine = self.admit(call)
        with self.tracing.child(call.span, "jachat.prepare") as span:
            prompt = await engine.tokenize(turns)
            span.set_attribute("gen_ai.usage.input_tokens", len(prompt.ids))
        return prompt

    async def generate(
        self,
        call: Call,
        request: PreparedRequest,
        include_stop: bool,
        logprobs: bool = False,
        streaming: bool = True,
        raw: bool = False,
    ) -> AsyncGenerator[Delta | Completion, None]:
        """The reply's deltas, then its Completion; closing the generator early stops the sequence. Tokens carry
        their log-probabilities only with `logprobs` (computing them costs the engine). The sequence ends at the
        call's deadline."""
        engine = self.engine()
        with self._running():
            stream = engine.stream(
                request.prompt.ids,
                request.options,
                request.max_new_tokens,
                deadline=call.deadline,
                include_stop=include_stop,
                priority=call.priority,
                tenant=call.tenant,
                logprobs=logprobs,
                streaming=streaming,
                raw=raw,
            )
            try:
                async for item in stream:
                    if isinstance(item, Completion):
                        self.tracing.completed(call.span, item, call.received)
                    yield item
            finally:
                await stream.aclose()  # stops the sequence now if the caller left early

    async def reply(
        self, call: Call, request: PreparedRequest, include_stop: bool, logprobs: bool, raw: bool = False
    ) -> Reply:
        """The whole reply of a unary call (its deltas are held to the end: no wake-up of the loop per token)."""
        return await whole(self.generate(call, request, include_stop, logprobs, streaming=False, raw=raw))

    async def drain(self, grace: float) -> None:
        """Refuse new work, give the calls in flight `grace` seconds, then end those still running."""
        self.draining = True
        try:
            await asyncio.wait_for(self.idle.wait(), grace)
        except asyncio.TimeoutError:
            log.warning("drain: %d calls still running after %.1f s; ending them", self.in_flight, grace)
            if self.engine_ is not None:
                self.engine_.abandon(ShuttingDown("the server shut down before the reply ended"))
            with suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.idle.wait(), 2.0)

    def detach(self) -> Engine | None:
        engine, self.engine_ = self.engine_, None
        return engine


async def within(call: Call, work: Callable[[Call], Awaitable[R]]) -> R:
    """Run the call's work within its deadline: DEADLINE_SLACK after it passes, whatever the work waits for, it is
    cancelled and the call ends DeadlineExceeded (the engine ends a sequence or a queued job at the deadline itself:
    this catches the rest, a stalled engine among it). One rule for both edges, from the call's arrival."""
    if call.deadline is None:
        return await work(call)
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    expired = False

    def expire() -> None:
        nonlocal expired
        expired = True
        task.cancel()

    timer = loop.call_later(max(0.0, call.deadline + DEADLINE_SLACK - time.monotonic()), expire)
    try:
        return await work(call)
    except asyncio.CancelledError:
        if not expired:
            raise
        uncancel = getattr(task, "uncancel", None)  # Python 3.11+: this cancellation is handled here
        if uncancel is not None:
            uncancel()
        raise DeadlineExceeded("the call's deadline passed") from None
    finally:
        timer.cancel()


def kind_of(exc: BaseException) -> Kind:
    return exc.kind if isinstance(exc, JachatError) else Kind.INTERNAL


def describe(exc: BaseException, spell: Callable[[FieldPath], str] = dotted) -> str:
    """What the caller is told of a failure: an invalid request's violations spelled as its API names the fields;
    a bug's text is never sent."""
    if isinstance(exc, InvalidRequest):
        return message(exc.violations, spell)
    return str(exc) if isinstance(exc, JachatError) else "internal error"


@dataclass(frozen=True)
class Reply:
    text: str
    tokens: list[GeneratedToken]
    completion: Completion


async def whole(items: AsyncIterator[Delta | Completion]) -> Reply:
    """The whole reply, read to the stream's end, so its cleanup (the running gauge, the sequence) is done before
    the caller answers."""
    parts: list[str] = []
    tokens: list[GeneratedToken] = []
    completion: Completion | None = None
    async for item in items:
        if isinstance(item, Completion):
            completion = item
        else:
            parts.append(item.text)
            tokens.extend(item.tokens)
    if completion is None:  # pragma: no cover - the engine always ends a stream with its Completion
        raise AssertionError("engine stream ended without a Completion")
    return Reply("".join(parts), [*tokens, *completion.tokens], completion)


async def write_within(write: Awaitable[None], seconds: float) -> None:
    """One stream write, either API's: a client that reads nothing for `seconds` (its flow-control window or socket
    buffer stays full) loses the stream, so it stops holding a sequence and counting as running."""
    try:
        await asyncio.wait_for(write, seconds)
    except asyncio.TimeoutError:
        raise WriteStalled(f"the client read nothing for {seconds:g} s; the stream was ended") from None
