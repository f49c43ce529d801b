"""The gRPC status of every outcome: a domain error's kind becomes its code, an invalid request's violations a
google.rpc.BadRequest (paths spelled as the protobuf fields), an overload a google.rpc.RetryInfo."""

from __future__ import annotations

import grpc
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from jachat.service.domain.errors import MAX_DESCRIPTION, InvalidRequest, JachatError, Kind, Overloaded, dotted

CODES = {kind: getattr(grpc.StatusCode, kind.value) for kind in Kind}


def to_status(exc: BaseException) -> grpc.Status:
    """The gRPC status for exc. Anything that is not a JachatError is a bug: INTERNAL, without its text."""
    if not isinstance(exc, JachatError):
        code, text = grpc.StatusCode.INTERNAL, "internal error"
    else:
        code, text = CODES[exc.kind], str(exc)
    status = status_pb2.Status(code=getattr(code_pb2, code.name), message=text)
    if isinstance(exc, InvalidRequest):
        detail = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(
                    field=dotted(v.path)[:MAX_DESCRIPTION], description=v.description[:MAX_DESCRIPTION]
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
