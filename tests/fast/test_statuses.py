"""Every outcome's status on both edges, without a server: the kinds to gRPC codes (with google.rpc details) and to
HTTP statuses (in OpenAI's error shape), and a bug's text withheld on both."""

from __future__ import annotations

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from jachat.service.domain.errors import (
    MAX_REPORTED_VIOLATIONS,
    DeadlineExceeded,
    EngineFailure,
    EngineLost,
    FieldViolation,
    InvalidRequest,
    JachatError,
    Kind,
    ModelNotReady,
    NotFound,
    Overloaded,
    ShuttingDown,
    Unauthenticated,
    WriteStalled,
)
from jachat.service.edge.grpc.status import CODES, to_status
from jachat.service.edge.http.request import spell
from jachat.service.edge.http.status import STATUSES, BodyTooLarge, UnsupportedEncoding, to_http

ERRORS: list[tuple[JachatError, grpc.StatusCode, int]] = [
    (InvalidRequest([FieldViolation(("sampling", "top_p"), "out of range")]), grpc.StatusCode.INVALID_ARGUMENT, 400),
    (BodyTooLarge([FieldViolation(("body",), "too large")]), grpc.StatusCode.INVALID_ARGUMENT, 413),
    (UnsupportedEncoding([FieldViolation(("body",), "br")]), grpc.StatusCode.INVALID_ARGUMENT, 415),
    (Unauthenticated("no token"), grpc.StatusCode.UNAUTHENTICATED, 401),
    (NotFound("no such model"), grpc.StatusCode.NOT_FOUND, 404),
    (Overloaded("full", 2.5), grpc.StatusCode.RESOURCE_EXHAUSTED, 429),
    (ModelNotReady("loading"), grpc.StatusCode.UNAVAILABLE, 503),
    (ShuttingDown("draining"), grpc.StatusCode.UNAVAILABLE, 503),
    (EngineLost("killed"), grpc.StatusCode.UNAVAILABLE, 503),
    (DeadlineExceeded("late"), grpc.StatusCode.DEADLINE_EXCEEDED, 504),
    (WriteStalled("unread"), grpc.StatusCode.DEADLINE_EXCEEDED, 504),
    (EngineFailure("boom"), grpc.StatusCode.INTERNAL, 500),
]


@pytest.mark.parametrize(("error", "code", "status"), ERRORS)
def test_each_error_has_its_code_and_status_on_both_edges(
    error: JachatError, code: grpc.StatusCode, status: int
) -> None:
    assert to_status(error).code == code
    answer = to_http(error, spell)
    assert answer.status == status and answer.kind is error.kind
    error_body = answer.body()["error"]
    assert isinstance(error_body, dict) and set(error_body) == {"message", "type", "param", "code"}


def test_every_kind_a_caller_can_see_is_mapped_on_both_edges() -> None:
    assert set(CODES) == set(Kind)
    assert set(STATUSES) == set(Kind) - {Kind.CANCELLED}  # a caller that has gone hears nothing


def test_a_bug_is_internal_without_its_text_on_both_edges() -> None:
    bug = RuntimeError("secret detail")
    status = to_status(bug)
    assert status.code == grpc.StatusCode.INTERNAL and "secret" not in status.details
    answer = to_http(bug)
    assert answer.status == 500 and "secret" not in answer.message


def test_an_invalid_request_names_its_field_as_each_api_spells_it() -> None:
    error = InvalidRequest([FieldViolation(("sampling", "max_new_tokens"), "too many")])
    assert to_http(error, spell).param == "max_tokens"
    status = to_status(error)
    assert status.details.startswith("sampling.max_new_tokens: too many")
    [detail] = rpc_status.from_call(_Call(status)).details  # type: ignore[arg-type]
    bad = error_details_pb2.BadRequest()
    assert detail.Unpack(bad) and bad.field_violations[0].field == "sampling.max_new_tokens"


def test_hundreds_of_violations_fit_the_trailers() -> None:
    error = InvalidRequest([FieldViolation(("turns", i, "text"), "bad") for i in range(300)])
    [detail] = rpc_status.from_call(_Call(to_status(error))).details  # type: ignore[arg-type]
    bad = error_details_pb2.BadRequest()
    detail.Unpack(bad)
    assert len(bad.field_violations) == MAX_REPORTED_VIOLATIONS
    assert "291 more" in bad.field_violations[-1].description


def test_an_overload_says_when_to_retry_on_both_edges() -> None:
    error = Overloaded("full", 2.5)
    assert to_http(error).headers()["Retry-After"] == "3"  # whole seconds, rounded up
    [detail] = rpc_status.from_call(_Call(to_status(error))).details  # type: ignore[arg-type]
    retry = error_details_pb2.RetryInfo()
    assert detail.Unpack(retry) and retry.retry_delay.ToNanoseconds() == 2_500_000_000
    assert to_http(Unauthenticated("x")).headers() == {"WWW-Authenticate": "Bearer"}


class _Call:
    """What rpc_status.from_call reads of a finished call: its code, details and trailing metadata."""

    def __init__(self, status: grpc.Status) -> None:
        self._status = status

    def code(self) -> grpc.StatusCode:
        return self._status.code

    def details(self) -> str:
        return self._status.details

    def trailing_metadata(self) -> tuple[tuple[str, bytes | str], ...]:
        return tuple(self._status.trailing_metadata)
