"""The service's errors and the one place that maps them to statuses: gRPC status codes, and the HTTP API's statuses
with OpenAI's error shape."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import grpc
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status


@dataclass(frozen=True)
class FieldViolation:
    field: str  # request field path, e.g. "turns[2].speaker" or "sampling.top_p"
    description: str

    def __str__(self) -> str:
        return f"{self.field}: {self.description}"


class JachatError(Exception):
    """Base of the errors that reach a caller with a status code."""

    code = grpc.StatusCode.INTERNAL


# A status travels in the trailers, which clients cap (8 KiB by default): a request with hundreds of violations must
# still get INVALID_ARGUMENT, not a RESOURCE_EXHAUSTED from its own oversized error. So the message names the first
# few violations and the BadRequest detail lists at most MAX_REPORTED_VIOLATIONS, each saying how many were left out.
MAX_MESSAGE_VIOLATIONS = 3
MAX_REPORTED_VIOLATIONS = 10
MAX_DESCRIPTION = 240


class InvalidRequest(JachatError):
    """The request breaks a rule; each broken rule names its field."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, violations: list[FieldViolation]) -> None:
        self.violations = violations
        shown = "; ".join(str(v)[:MAX_DESCRIPTION] for v in violations[:MAX_MESSAGE_VIOLATIONS])
        more = len(violations) - MAX_MESSAGE_VIOLATIONS
        super().__init__(shown + (f" (and {more} more violations)" if more > 0 else ""))

    def reported(self) -> list[FieldViolation]:
        """The violations the BadRequest detail lists: the first ones, and a last entry counting the rest."""
        if len(self.violations) <= MAX_REPORTED_VIOLATIONS:
            return self.violations
        head = self.violations[: MAX_REPORTED_VIOLATIONS - 1]
        rest = len(self.violations) - len(head)
        return [*head, FieldViolation("request", f"{rest} more violations are not listed")]


class ModelNotReady(JachatError):
    code = grpc.StatusCode.UNAVAILABLE


class ShuttingDown(JachatError):
    """The server is draining: retry on another replica."""

    code = grpc.StatusCode.UNAVAILABLE


class Overloaded(JachatError):
    """The queue is full. Clients should retry after `retry_after` seconds (sent as google.rpc.RetryInfo)."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, message: str, retry_after: float) -> None:
        self.retry_after = retry_after
        super().__init__(message)


class DeadlineExceeded(JachatError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Unauthenticated(JachatError):
    code = grpc.StatusCode.UNAUTHENTICATED


class NotFound(JachatError):
    code = grpc.StatusCode.NOT_FOUND


class WriteStalled(DeadlineExceeded):
    """A stream's client read nothing for the write timeout: nothing more can reach it, not even an error."""


class EngineFailure(JachatError):
    """Generation failed inside the engine; details are logged, not sent."""

    code = grpc.StatusCode.INTERNAL


def to_status(exc: BaseException) -> grpc.Status:
    """The gRPC status for exc: its code and message, with a google.rpc.BadRequest for invalid requests.

    Anything that is not a JachatError is a bug: it becomes INTERNAL without leaking its text.
    """
    if not isinstance(exc, JachatError):
        code, message = grpc.StatusCode.INTERNAL, "internal error"
    else:
        code, message = exc.code, str(exc)
    status = status_pb2.Status(code=getattr(code_pb2, code.name), message=message)
    if isinstance(exc, InvalidRequest):
        detail = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(
                    field=v.field[:MAX_DESCRIPTION], description=v.description[:MAX_DESCRIPTION]
                )
                for v in exc.reported()
            ]
        )
        status.details.add().Pack(detail)
    if isinstance(exc, Overloaded):
        retry = error_details_pb2.RetryInfo()
        retry.retry_delay.FromNanoseconds(int(exc.retry_after * 1e9))
        status.details.add().Pack(retry)
    result: grpc.Status = rpc_status.to_status(status)
    return result


# The HTTP API's statuses: Google's mapping of the gRPC codes, and OpenAI's error type and code for each.
HTTP_STATUSES = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.INTERNAL: 500,
}
_OPENAI_ERRORS = {  # HTTP status -> (error.type, error.code)
    400: ("invalid_request_error", None),
    401: ("invalid_request_error", "invalid_api_key"),
    404: ("invalid_request_error", "model_not_found"),
    413: ("invalid_request_error", "request_too_large"),
    429: ("rate_limit_error", "rate_limit_exceeded"),
    500: ("server_error", None),
    503: ("server_error", "service_unavailable"),
    504: ("timeout_error", "timeout"),
}


@dataclass(frozen=True)
class HttpError:
    """What the HTTP API answers for an error, in OpenAI's shape; `code` is the gRPC code name the metrics use."""

    status: int
    code: str
    message: str
    kind: str
    error_code: str | None
    param: str | None = None
    retry_after: int | None = None  # whole seconds, for the Retry-After header

    def body(self) -> dict[str, object]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.error_code}}


def to_http(exc: BaseException, rename: Callable[[str], str] = str) -> HttpError:
    """The HTTP answer for exc; `rename` spells an invalid request's field as the API names it. Anything that is
    not a JachatError is a bug: 500 without its text."""
    if not isinstance(exc, JachatError):
        return http_error(500, "INTERNAL", "internal error")
    if isinstance(exc, InvalidRequest):
        shown = exc.violations[:MAX_MESSAGE_VIOLATIONS]
        message = "; ".join(f"{rename(v.field)}: {v.description}"[:MAX_DESCRIPTION] for v in shown)
        more = len(exc.violations) - len(shown)
        message += f" (and {more} more violations)" if more > 0 else ""
        param = rename(exc.violations[0].field) if exc.violations else None
        return http_error(400, exc.code.name, message, param)
    retry = max(1, math.ceil(exc.retry_after)) if isinstance(exc, Overloaded) else None
    return http_error(HTTP_STATUSES.get(exc.code, 500), exc.code.name, str(exc), retry_after=retry)


def http_error(
    status: int, code: str, message: str, param: str | None = None, retry_after: int | None = None
) -> HttpError:
    kind, error_code = _OPENAI_ERRORS.get(status, ("server_error", None))
    return HttpError(status, code, message, kind, error_code, param, retry_after)
