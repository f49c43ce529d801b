"""The HTTP status of every outcome, in OpenAI's error shape: Google's mapping of the canonical codes, and OpenAI's
error type and code for each status; an invalid request's field paths spelled as the JSON body names them."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from jachat.service.domain.errors import FieldPath, InvalidRequest, JachatError, Kind, Overloaded, dotted, message

STATUSES = {
    Kind.INVALID: 400,
    Kind.UNAUTHENTICATED: 401,
    Kind.NOT_FOUND: 404,
    Kind.OVERLOADED: 429,
    Kind.INTERNAL: 500,
    Kind.UNAVAILABLE: 503,
    Kind.DEADLINE: 504,
}
_OPENAI_ERRORS = {  # HTTP status -> (error.type, error.code)
    400: ("invalid_request_error", None),
    401: ("invalid_request_error", "invalid_api_key"),
    404: ("invalid_request_error", "model_not_found"),
    413: ("invalid_request_error", "request_too_large"),
    415: ("invalid_request_error", "unsupported_content_encoding"),
    417: ("invalid_request_error", None),
    431: ("invalid_request_error", "request_header_fields_too_large"),
    429: ("rate_limit_error", "rate_limit_exceeded"),
    500: ("server_error", None),
    503: ("server_error", "service_unavailable"),
    504: ("timeout_error", "timeout"),
}


class BodyTooLarge(InvalidRequest):
    """A body over the limit: 413 here (an invalid request in the metrics)."""


class UnsupportedEncoding(InvalidRequest):
    """A Content-Encoding other than gzip or deflate: 415 here (an invalid request in the metrics)."""


@dataclass(frozen=True)
class HttpError:
    """What the HTTP API answers for an error, in OpenAI's shape; `kind` is what the metrics record."""

    status: int
    kind: Kind
    message: str
    param: str | None = None
    retry_after: int | None = None  # whole seconds, for the Retry-After header

    def body(self) -> dict[str, object]:
        kind, code = _OPENAI_ERRORS.get(self.status, ("server_error", None))
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": code}}

    def headers(self) -> dict[str, str]:
        headers = {}
        if self.retry_after is not None or self.status == 503:
            headers["Retry-After"] = str(self.retry_after or 1)
        if self.status == 401:
            headers["WWW-Authenticate"] = "Bearer"
        return headers


def to_http(exc: BaseException, spell: Callable[[FieldPath], str] = dotted) -> HttpError:
    """The HTTP answer for exc; `spell` writes a field path as the body names it. Anything that is not a
    JachatError is a bug: 500 without its text."""
    if not isinstance(exc, JachatError):
        return HttpError(500, Kind.INTERNAL, "internal error")
    if isinstance(exc, InvalidRequest):
        param = spell(exc.violations[0].path) if exc.violations else None
        status = 413 if isinstance(exc, BodyTooLarge) else 415 if isinstance(exc, UnsupportedEncoding) else 400
        return HttpError(status, exc.kind, message(exc.violations, spell), param)
    retry = max(1, math.ceil(exc.retry_after)) if isinstance(exc, Overloaded) else None
    return HttpError(STATUSES.get(exc.kind, 500), exc.kind, str(exc), retry_after=retry)
