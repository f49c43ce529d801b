"""The one call frame of both edges (edge/calls.py's Calls.serve) without a model or a transport: every outcome is
recorded once, under its code, and rendered by the edge; a bug's traceback is logged; a caller gone is a cancel,
or OK once it had the whole answer; a deadline is kept whatever the work waits for."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import pytest
from prometheus_client import CollectorRegistry

from jachat.service.domain.errors import FieldViolation, InvalidRequest, Overloaded
from jachat.service.edge.calls import Call, Calls, Opening
from jachat.service.observability.metrics import Metrics


class Gone(Exception):
    """A transport's own "the caller is gone" error."""


def serve(
    work: Callable[[Call], Awaitable[str]], timeout: float | None = None
) -> tuple[str | BaseException, dict[str, float], Calls]:
    """Run one call of `work` through the frame: (its answer or what escaped, the recorded codes, the Calls)."""
    calls = Calls(Metrics(CollectorRegistry()))
    opening = Opening("http", "/v1/test", "test", (), timeout, gone=(Gone,))

    async def render(call: Call, exc: BaseException) -> str:
        return f"rendered {type(exc).__name__}"

    async def run() -> str | BaseException:
        try:
            return await calls.serve(opening, work, render)
        except BaseException as exc:
            return exc

    answer = asyncio.run(run())
    codes = {
        sample.labels["code"]: sample.value
        for family in calls.metrics.registry.collect()
        if family.name == "jachat_requests"
        for sample in family.samples
        if sample.name == "jachat_requests_total" and sample.value
    }
    return answer, codes, calls


async def answered(call: Call) -> str:
    return "answer"


def test_an_answer_is_recorded_ok_once() -> None:
    answer, codes, calls = serve(answered)
    assert answer == "answer" and codes == {"OK": 1.0}
    assert calls.in_flight == 0 and calls.idle.is_set()


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (InvalidRequest([FieldViolation(("model",), "missing")]), "INVALID_ARGUMENT"),
        (Overloaded("full", 1.0), "RESOURCE_EXHAUSTED"),
        (RuntimeError("a bug"), "INTERNAL"),
    ],
)
def test_a_failure_is_recorded_under_its_code_and_rendered_by_the_edge(error: Exception, code: str) -> None:
    async def failing(call: Call) -> str:
        raise error

    answer, codes, _ = serve(failing)
    assert answer == f"rendered {type(error).__name__}" and codes == {code: 1.0}


def test_a_bug_has_its_traceback_logged(caplog: pytest.LogCaptureFixture) -> None:
    async def buggy(call: Call) -> str:
        raise KeyError("oops")

    with caplog.at_level(logging.ERROR, "jachat.calls"):
        serve(buggy)
    [record] = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert record.exc_info is not None and "KeyError" in caplog.text


def test_a_caller_gone_is_a_cancel_and_the_cancellation_goes_on_up() -> None:
    async def left(call: Call) -> str:
        raise Gone

    answer, codes, _ = serve(left)
    assert isinstance(answer, asyncio.CancelledError) and codes == {"CANCELLED": 1.0}


def test_a_caller_gone_after_the_whole_answer_has_had_it() -> None:
    async def whole_then_gone(call: Call) -> str:
        call.answered = True
        raise Gone

    _, codes, _ = serve(whole_then_gone)
    assert codes == {"OK": 1.0}


def test_the_deadline_is_kept_whatever_the_work_waits_for() -> None:
    async def stuck(call: Call) -> str:
        await asyncio.Event().wait()  # a stalled engine, a body that never comes
        return "never"

    answer, codes, _ = serve(stuck, timeout=0.05)
    assert answer == "rendered DeadlineExceeded" and codes == {"DEADLINE_EXCEEDED": 1.0}
